"""The `cifarlab` command package: every command registered from its own module, `python -m cifarlab.cli`,
the shared error handling."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from cifarlab import cli
from cifarlab.errors import UserError


def test_every_command_module_registers_itself():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == list(cli.COMMANDS)
    for name in cli.COMMANDS:
        assert callable(importlib.import_module(f"cifarlab.cli.{name}").add_parser)
    assert not hasattr(cli, "CliError")


def test_python_dash_m_and_version():
    proc = subprocess.run([sys.executable, "-m", "cifarlab.cli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("cifarlab ")


def test_the_command_exits_with_its_status_without_tearing_the_interpreter_down():
    # A usage error (argparse's SystemExit) and a user error keep their status and their one message.
    bad = subprocess.run([sys.executable, "-m", "cifarlab.cli", "nosuchcommand"], capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
    err = subprocess.run(
        [sys.executable, "-m", "cifarlab.cli", "config", "--recipe", "nosuchrecipe"], capture_output=True, text=True
    )
    assert err.returncode == 2 and err.stderr.count("\n") == 1 and "nosuchrecipe" in err.stderr
    # exit_now does what a normal exit does that matters, in its order: waits for a thread that is not a daemon,
    # then runs the exit handlers, flushes buffered output; and skips the rest (a __del__ at teardown).
    code = """
import atexit, sys, threading, time
from cifarlab.cli import exit_now
class Teardown:
    def __del__(self): print("teardown ran")
keep = Teardown()
atexit.register(lambda: print("exit handler ran"))
threading.Thread(target=lambda: (time.sleep(0.2), print("thread finished"))).start()
sys.stdout.write("buffered, no newline")
exit_now(3)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 3
    assert proc.stdout == "buffered, no newlinethread finished\nexit handler ran\n"
    # A thread pool left open (a library's, a plugin's): its idle workers are stopped as at a normal exit, not
    # waited for forever.
    pool = (
        "from concurrent.futures import ThreadPoolExecutor\n"
        "from cifarlab.cli import exit_now\n"
        "pool = ThreadPoolExecutor(2)\n"
        "print(pool.submit(lambda: 'pool ran').result())\n"
        "exit_now(0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", pool], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == "pool ran\n"
    # A reader that went away (`cifarlab ... | head`) does not turn the exit into a traceback.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # so that the line waits in a buffer
    pipe = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from cifarlab.cli import exit_now; print('x' * 99); time.sleep(1); exit_now(0)",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert pipe.stdout is not None and pipe.stderr is not None
    pipe.stdout.close()  # before the child flushes its buffered line
    assert pipe.wait(timeout=60) == 0 and pipe.stderr.read() == b""


def test_help_and_runs_build_only_what_they_need(tmp_path):
    """`cifarlab --help` and `cifarlab runs` built every command's parser, whose recipe and model choices import
    torch (~1 s); now only the named command's parser is built, the others list their one line."""
    code = (
        "import sys, contextlib, io\n"
        "from cifarlab import cli\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "    cli.main(['--help'])\n"
        "assert all(cli.importlib.import_module('cifarlab.cli.' + c).HELP in ' '.join(out.getvalue().split())"
        " for c in cli.COMMANDS), out.getvalue()\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert cli.main(['runs', '--runs-dir', sys.argv[1]]) == 0\n"
        "print('torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


_HEAVY = ("torch", "numpy", "sklearn", "matplotlib", "scipy", "PIL", "optuna")


def test_every_help_and_usage_error_imports_no_torch():
    """`cifarlab train --help` (and tune's, config's, a mistyped option) listed the recipes by importing
    cifarlab.recipes, hence torch: ~1-3 s before a help text or usage error on a 2-core CPU. Every command's
    parser now builds without torch, numpy or the evaluation libraries."""
    code = (
        "import sys, contextlib, io\n"
        "from cifarlab import cli\n"
        "heavy = sys.argv[1].split(',')\n"
        "for argv in [[c, '--help'] for c in cli.COMMANDS] + [['model', 'summary', '--help'], ['train', '--bgt'],"
        " ['tune', '--recipe'], ['config', '--set']]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        "        with contextlib.suppress(SystemExit):\n"
        "            cli.main(argv)\n"
        "    assert not [m for m in heavy if m in sys.modules], (argv, [m for m in heavy if m in sys.modules])\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, ",".join(_HEAVY)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr
    # The whole command as typed, entry point included: no torch module is imported at all.
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cifarlab.cli", "train", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--recipe NAME" in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert imported and not {m.split(".")[0] for m in imported} & set(_HEAVY)


def test_recipe_help_lists_the_registered_recipes_plugins_included(tmp_path):
    """The help lists the built-in recipes from `registry.BUILTIN_RECIPES` (no torch): they must be RECIPES' own
    names and default; a plugin's recipe (it loads cifarlab.recipes first) shows up too."""
    code = (
        "from cifarlab import recipes, registry\n"
        "assert tuple(recipes.RECIPES) == registry.BUILTIN_RECIPES, recipes.RECIPES\n"
        "assert recipes.DEFAULT_RECIPE in registry.BUILTIN_RECIPES\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CIFARLAB_PLUGINS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr
    plugin = tmp_path / "plug.py"
    plugin.write_text(
        "import dataclasses\n"
        "from cifarlab.recipes import FAST, register_recipe\n"
        "register_recipe(dataclasses.replace(FAST, name='plugged_recipe'))\n"
    )
    for extra_env, argv in [({"CIFARLAB_PLUGINS": str(plugin)}, []), ({}, ["--plugin", str(plugin)])]:
        proc = subprocess.run(
            [sys.executable, "-m", "cifarlab.cli", *argv, "train", "--help"],
            capture_output=True,
            text=True,
            env={**env, **extra_env, "COLUMNS": "200"},
        )
        assert proc.returncode == 0, proc.stderr
        assert "base recipe: reference, fast, air94, resnet18, wrn16_8, effnet_b0, plugged_recipe (default:" in (
            proc.stdout
        )


def test_training_imports_no_evaluation_or_report_library():
    """scikit-learn (~0.8 s), matplotlib and captum are for evaluation and reports: the train command and
    `cifarlab.fit` import them only once a run is evaluated, not before their first training step."""
    code = (
        "import sys\n"
        "import cifarlab.api, cifarlab.cli.train, cifarlab.experiment, cifarlab.train.loop\n"
        "print(sorted(m for m in ('sklearn', 'matplotlib', 'captum') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_submodules_are_reachable_from_a_plain_import_cifarlab():
    """docs/API.md writes `cifarlab.errors.UserError`, `cifarlab.data.from_arrays`, `cifarlab.train.TrainingDiverged`
    after a bare `import cifarlab`: the package imports its submodules on first use; other names stay errors."""
    code = (
        "import cifarlab\n"
        "print(cifarlab.errors.UserError.__name__, cifarlab.data.from_arrays.__name__,"
        " cifarlab.train.TrainingDiverged.__name__, cifarlab.finetune.apply_init.__name__)\n"
        "try:\n"
        "    cifarlab.nosuchmodule\n"
        "except AttributeError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "UserError from_arrays TrainingDiverged apply_init",
        "module 'cifarlab' has no attribute 'nosuchmodule'",
    ]


@pytest.mark.parametrize(
    "argv", [["train", "--runs-dir", ""], ["data", "info", "--data-dir", " "], ["runs", "--root", ""]]
)
def test_an_empty_folder_option_is_a_usage_error_not_the_current_folder(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and "an empty path; give a folder" in capsys.readouterr().err


def test_the_named_command_gets_its_whole_parser(capsys):
    assert cli._command(["--plugin", "p.py", "train", "--set", "epochs=1"]) == "train"
    assert cli._command(["--plugin=p.py", "runs"]) == "runs" and cli._command(["-h"]) is None
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "--budget" in capsys.readouterr().out  # the full train parser
    with pytest.raises(SystemExit):
        cli.main(["tarin"])
    assert "invalid choice: 'tarin'" in capsys.readouterr().err


def test_model_summary(capsys):
    assert cli.main(["model", "summary", "reference"]) == 0
    assert "Total params" in capsys.readouterr().out


def test_user_errors_are_one_line_with_control_characters_escaped(capsys):
    from cifarlab.cli.common import run_command

    def fails(args):
        raise UserError("bad name \x1b[31mred\nsecond line")

    assert run_command(fails, None) == 2
    err = capsys.readouterr().err
    assert err == "error: bad name \\x1b[31mred\\nsecond line\n"

    def bug(args):
        raise RuntimeError("a bug keeps its traceback")

    with pytest.raises(RuntimeError):
        run_command(bug, None)


def test_ctrl_c_exits_130_with_one_line(capsys):
    """A bare Ctrl-C gets the CLI's "interrupted"; one the command has explained (`Interrupted`) gets no second
    line."""
    from cifarlab.cli.common import run_command
    from cifarlab.errors import Interrupted

    def plain(args):
        raise KeyboardInterrupt

    def explained(args):
        print("interrupted; run the same command again", file=sys.stderr)
        raise Interrupted

    assert run_command(plain, None) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert run_command(explained, None) == 130
    assert capsys.readouterr().err == "interrupted; run the same command again\n"


def test_train_refuses_before_any_work(tmp_path, capsys, monkeypatch):
    """Combinations that cannot work are refused on the command line: no data read (none exists here), no
    torchrun started, no folder written."""
    monkeypatch.setattr("os.execv", lambda *a: pytest.fail("torchrun was started"))
    cases = [
        (["--resume", str(tmp_path), "--recipe", "fast"], "--recipe/--set/--config cannot change it"),
        (["--nproc", "3", "--set", "batch_size=16"], "batch_size=16 is not a multiple of --nproc 3"),
    ]
    for extra, needle in cases:
        assert cli.main(["train", "--data-dir", str(tmp_path / "none"), "--runs-dir", str(tmp_path / "r"), *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists()


def test_a_relative_dataset_path_is_recorded_absolute(tmp_path, monkeypatch):
    """`--set dataset=imgs` from one folder: the run must find its data later from any other folder."""
    from cifarlab.config import resolve_recipe

    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("reference", sets=["dataset=imgs"]).dataset == str(tmp_path / "imgs")
    assert resolve_recipe("reference", sets=["dataset=CIFAR-10"]).dataset == "cifar10"  # a name stays a name


def test_data_preview_output_checks(tmp_path, capsys):
    """The suffix picks the format (a .txt is refused before the data is read); --per-class is bounded."""
    assert cli.main(["data", "preview", "--out", str(tmp_path / "grid.txt"), "--data-dir", str(tmp_path)]) == 2
    assert "write a .png, .jpg, .pdf or .svg file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["data", "preview", "--per-class", "100000"])
    assert "must be from 1 to 64" in capsys.readouterr().err


def test_out_of_range_options_are_usage_errors_not_tracebacks(tmp_path, capsys):
    for argv, needle in (
        (["explain", str(tmp_path), "x.png", "--steps", "0"], "--steps: expected an integer from 1 to 1024"),
        (["tune", "--seed", "-1"], "--seed: must be from 0 to"),
    ):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and needle in capsys.readouterr().err


def test_a_device_cifarlab_does_not_run_on_is_one_line():
    from cifarlab.device import resolve_device
    from cifarlab.errors import ConfigError

    with pytest.raises(ConfigError, match="--device mps: cifarlab runs on cpu or cuda devices only"):
        resolve_device("mps")


def test_a_device_index_that_is_not_there_is_one_line(monkeypatch):
    import torch

    from cifarlab.device import resolve_device
    from cifarlab.errors import ConfigError

    assert resolve_device("cpu:0") == torch.device("cpu:0")
    with pytest.raises(ConfigError, match="--device cpu:5: there is one CPU device"):
        resolve_device("cpu:5")  # torch would accept it and train on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ConfigError, match="--device cuda:2: this machine has 2 CUDA device\\(s\\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_a_hand_edited_recipe_value_of_the_wrong_type_names_the_key():
    from cifarlab.errors import ConfigError
    from cifarlab.recipes import Recipe, get_recipe

    d = get_recipe("fast").to_dict()
    assert Recipe.from_dict(d) == get_recipe("fast")  # the saved form loads back as it was
    for key, bad in (("epochs", "two"), ("lr", [1, 2]), ("widths", "a,b,c"), ("channels_last", "maybe")):
        with pytest.raises(ConfigError, match=key):
            Recipe.from_dict({**d, key: bad})


def test_corruption_options_without_corruptions_are_refused(tmp_path, capsys):
    assert cli.main(["evaluate", str(tmp_path), "--severities", "1", "--corruption-limit", "10"]) == 2
    assert "--severities, --corruption-limit only apply with --corruptions" in capsys.readouterr().err


def test_a_runs_dir_that_cannot_take_a_run_is_refused_before_any_data_is_loaded(tmp_path, capsys, monkeypatch):
    """`train --runs-dir FILE` was refused only once the data was loaded and decoded (seconds), and an error
    about the data hid it. Now it comes first, from the same check that creates the run folder; so in fit()."""
    import numpy as np

    import cifarlab
    from cifarlab.runs import check_runs_root

    a_file = tmp_path / "runs"
    a_file.write_text("not a folder")
    # No data exists at --data-dir: an error about it would come first if data were read before the check.
    assert cli.main(["train", "--data-dir", str(tmp_path / "none"), "--runs-dir", str(a_file)]) == 2
    assert capsys.readouterr().err == f"error: --runs-dir {a_file} is a file, not a folder\n"
    monkeypatch.setattr("cifarlab.experiment.run_experiment", lambda *a, **k: pytest.fail("data was loaded"))
    assert cli.main(["train", "--runs-dir", str(a_file / "below"), "--set", "epochs=1"]) == 2
    assert "cannot create a run folder under" in capsys.readouterr().err
    monkeypatch.setattr("cifarlab.api.as_dataset", lambda *a, **k: pytest.fail("data was loaded"))
    data = (np.zeros((4, 3, 8, 8), np.uint8), np.arange(4) % 2, np.zeros((2, 3, 8, 8), np.uint8), np.arange(2) % 2)
    with pytest.raises(UserError, match=r"^runs_dir='.*' is a file, not a folder$"):
        cifarlab.fit("reference", data=data, runs_dir=a_file)
    # A folder that exists, or that mkdir could create, passes; one without write access does not.
    assert check_runs_root(tmp_path / "new" / "runs") == tmp_path / "new" / "runs"
    assert not (tmp_path / "new").exists()  # the check creates nothing
    monkeypatch.setattr("os.access", lambda *a, **k: False)
    with pytest.raises(
        UserError,
        match=r"cannot create a run folder under .* \((Permission denied|Read-only file system)\); pick --runs-dir$",
    ):
        check_runs_root(tmp_path / "new" / "runs")
