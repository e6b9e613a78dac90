"""QA of plugins and registries: a plugin overrides a built-in (or is told, at its line, to pass replace=True), its
errors point into its file, one file under two spellings loads once, a factory that returns the wrong thing is
named in one line, an OSError from user code keeps its traceback, and `cifarlab config` and the report show what
each registered name is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import cifarlab
import cifarlab.plugins
from cifarlab import cli
from cifarlab.errors import ConfigError, UserError
from cifarlab.recipes import RECIPES, get_recipe
from cifarlab.registry import AUGMENTS, CALLBACKS, MODELS, OPTIMIZERS, SCHEDULES
from cifarlab.train import Callback

REGISTRIES = (MODELS, AUGMENTS, OPTIMIZERS, SCHEDULES, CALLBACKS)
TRAIN = [
    "--recipe",
    "reference",
    "--set",
    "widths=4,8,8",
    "--set",
    "dense_width=8",
    "--set",
    "batch_size=16",
    "--set",
    "epochs=1",
    "--set",
    "precision=fp32",
    "--set",
    "early_stopping_patience=0",
    "--quiet",
    "--no-report",
]


@pytest.fixture
def isolated(monkeypatch) -> Iterator[None]:
    """What a test registers or loads is gone afterwards (built-ins it overrides come back), as if each test
    were a process of its own."""
    saved = [(reg, dict(reg._entries)) for reg in REGISTRIES]
    recipes = dict(RECIPES)
    modules = set(sys.modules)
    monkeypatch.setattr(cifarlab.plugins, "_loaded", {})
    monkeypatch.delenv(cifarlab.plugins.ENV, raising=False)
    try:
        yield
    finally:
        for reg, entries in saved:
            reg._entries.clear()
            reg._entries.update(entries)
        RECIPES.clear()
        RECIPES.update(recipes)
        for name in set(sys.modules) - modules:
            if name.startswith("cifarlab_plugin_") or name.startswith("qa_"):
                del sys.modules[name]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two classes told apart by brightness, as an ImageFolder tree (40 train, 8 test images of 32x32)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 8)):
        for i in range(n):
            d = root / split / f"c{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8) + (150 if i % 2 else 0)
            Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.png")
    return root


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`cifarlab ARGS` in a fresh process: the built-ins are registered there only as the command itself does."""
    return subprocess.run(
        [sys.executable, "-m", "cifarlab.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def _write(path: Path, code: str) -> Path:
    path.write_text(textwrap.dedent(code).lstrip())
    return path


# -- 1. a plugin overrides a built-in, in every registry, whatever loads first ------------------------------------

OVERRIDES = """
import cifarlab
from cifarlab.registry import AUGMENTS, CALLBACKS, MODELS, OPTIMIZERS, SCHEDULES

@MODELS.register("airnet", replace=True)
def airnet(recipe, num_classes, input_shape):
    \"\"\"plugin airnet\"\"\"

@AUGMENTS.register("flip_translate", replace=True)
def flip_translate(recipe):
    \"\"\"plugin flip_translate\"\"\"

@OPTIMIZERS.register("muon", replace=True)
def muon(model, recipe):
    \"\"\"plugin muon\"\"\"

@SCHEDULES.register("onecycle", replace=True)
def onecycle(recipe, has_val):
    \"\"\"plugin onecycle\"\"\"

@CALLBACKS.register("dropblock_schedule", replace=True)
def dropblock_schedule(recipe):
    \"\"\"plugin dropblock_schedule\"\"\"

cifarlab.register_recipe(cifarlab.get_recipe("fast").replace(description="plugin fast"), replace=True)
"""


def test_a_plugin_overrides_a_builtin_of_every_registry_in_a_fresh_process(tmp_path):
    """Plugins were imported before the built-ins registered: the built-in airnet then clashed with the plugin's
    (30 lines of traceback), even with replace=True."""
    _write(tmp_path / "over.py", OVERRIDES)
    proc = _cli(
        "--plugin", "over.py", "config", "--recipe", "fast", "--set", "callbacks=dropblock_schedule", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    for key, name in [
        ("model", "airnet"),
        ("augment", "flip_translate"),
        ("optimizer", "muon"),
        ("schedule", "onecycle"),
    ]:
        assert f"\n{key}: {name}  # plugin {name};" in proc.stdout  # the plugin's entry, with its description
    assert "\ncallbacks: [dropblock_schedule]  # dropblock_schedule: plugin dropblock_schedule;" in proc.stdout
    assert "description: plugin fast" in proc.stdout
    # The Python API: load_plugin, or a script that registers before anything of cifarlab's imported the models.
    script = _write(
        tmp_path / "script.py",
        """
        import json
        import sys
        from cifarlab.plugins import load_plugin
        from cifarlab.registry import AUGMENTS, CALLBACKS, MODELS, OPTIMIZERS, SCHEDULES

        if sys.argv[1] == "plugin":
            load_plugin("over.py")
        else:
            @MODELS.register("airnet", replace=True)
            def airnet(recipe, num_classes, input_shape):
                \"\"\"script airnet\"\"\"
        import cifarlab.recipes, cifarlab.train  # every built-in module
        named = [(MODELS, "airnet"), (AUGMENTS, "flip_translate"), (OPTIMIZERS, "muon"), (SCHEDULES, "onecycle"),
                 (CALLBACKS, "dropblock_schedule")]
        print(json.dumps([r.describe(n) for r, n in named] + [cifarlab.recipes.RECIPES["fast"].description]))
        """,
    )
    proc = subprocess.run([sys.executable, str(script), "plugin"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [
        "plugin airnet",
        "plugin flip_translate",
        "plugin muon",
        "plugin onecycle",
        "plugin dropblock_schedule",
        "plugin fast",
    ]
    proc = subprocess.run([sys.executable, str(script), "script"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0] == "script airnet"


@pytest.mark.parametrize(
    "code,line",
    [
        ("from cifarlab.registry import MODELS\n\n@MODELS.register('wrn')\ndef wrn(r, k, s):\n    pass\n", 3),
        ("from cifarlab.registry import AUGMENTS\n\n@AUGMENTS.register('keras')\ndef keras(r):\n    pass\n", 3),
        ("from cifarlab.registry import OPTIMIZERS\n\n@OPTIMIZERS.register('sgd')\ndef sgd(m, r):\n    pass\n", 3),
        (
            "from cifarlab.registry import SCHEDULES\n\n@SCHEDULES.register('plateau')\ndef plateau(r, v):\n    pass\n",
            3,
        ),
        (
            "from cifarlab.registry import CALLBACKS\n\n@CALLBACKS.register('dropblock_schedule')\ndef d(r):\n    pass",
            3,
        ),
        ("import cifarlab\n\ncifarlab.register_recipe(cifarlab.get_recipe('air94'))\n", 3),
    ],
    ids=["model", "augment", "optimizer", "schedule", "callback", "recipe"],
)
def test_a_plugin_reusing_a_builtin_name_without_replace_is_one_line_at_its_line(tmp_path, isolated, code, line):
    plugin = tmp_path / "clash.py"
    plugin.write_text(code)
    with pytest.raises(UserError) as e:
        cifarlab.plugins.load_plugin(str(plugin))
    message = str(e.value)
    assert f"--plugin {plugin} failed while loading at {plugin}, line {line}" in message
    assert "already" in message and "pass replace=True" in message and "\n" not in message


def test_a_plugin_clashing_with_a_builtin_fails_in_one_line_in_a_fresh_process(tmp_path):
    _write(
        tmp_path / "dup.py",
        "from cifarlab.registry import MODELS\n@MODELS.register('airnet')\ndef a(r, k, s):\n    pass\n",
    )
    proc = _cli("--plugin", "dup.py", "config", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'dup.py'}, line 2" in proc.stderr
    assert "@MODELS.register('airnet', replace=True)" in proc.stderr


def test_train_uses_the_builtins_a_plugin_overrides(tmp_path, image_folder):
    """reference's model, optimizer, schedule and augmentation replaced by a plugin: the run trains the plugin's."""
    _write(
        tmp_path / "over.py",
        """
        import os
        import torch
        from pathlib import Path
        from torch import nn
        from cifarlab.registry import AUGMENTS, MODELS, OPTIMIZERS, SCHEDULES
        from cifarlab.train import StepSchedule

        def used(what):
            with open(os.environ["QA_USED"], "a") as f:
                f.write(what + "\\n")

        class Tiny(nn.Module):
            def __init__(self, c, k):
                super().__init__()
                self.conv = nn.Conv2d(c, 4, 3, padding=1)
                self.fc = nn.Linear(4, k)

            def forward(self, x):
                return self.fc(self.conv(x).mean((2, 3)))

        @MODELS.register("reference_cnn", replace=True)
        def reference_cnn(recipe, num_classes, input_shape):
            used("model")
            return Tiny(input_shape[0], num_classes)

        @AUGMENTS.register("keras", replace=True)
        def keras(recipe):
            used("augment")
            return lambda x, *, generator, indices=None, epoch=0: x

        @OPTIMIZERS.register("adam", replace=True)
        def adam(model, recipe):
            used("optimizer")
            return torch.optim.SGD(model.parameters(), lr=0.01)

        @SCHEDULES.register("plateau", replace=True)
        def plateau(recipe, has_val):
            used("schedule")
            return [StepSchedule(lambda step, total: 1.0)]
        """,
    )
    log = tmp_path / "used.txt"
    args = ["--plugin", "over.py", "train", *TRAIN, "--set", f"dataset={image_folder}", "--runs-dir", "runs"]
    proc = _cli(*args, cwd=tmp_path, env={"QA_USED": str(log)})
    assert proc.returncode == 0, proc.stderr
    assert set(log.read_text().split()) == {"model", "augment", "optimizer", "schedule"}
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "config.json").read_text())["recipe"]["model"] == "reference_cnn"
    assert set(load_file(run / "model.safetensors")) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}


# -- 2. an OSError from user code keeps its traceback; cifarlab's own stays one line --------------------------------


def test_an_oserror_in_a_plugin_callback_shows_its_file_and_line(tmp_path, isolated, image_folder, capsys):
    plugin = _write(
        tmp_path / "oserr.py",
        """
        from cifarlab.registry import CALLBACKS
        from cifarlab.train import Callback

        class SaveStuff(Callback):
            def on_epoch_end(self, epoch, logs=None):
                with open(self.trainer.run_dir / "sub" / "epoch.txt", "w") as f:  # sub/ was never made
                    f.write(str(epoch))

        @CALLBACKS.register("qa_savestuff")
        def savestuff(recipe):
            return SaveStuff()
        """,
    )
    args = ["--plugin", str(plugin), "train", *TRAIN, "--set", "callbacks=qa_savestuff"]
    rc = cli.main([*args, "--set", f"dataset={image_folder}", "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "Traceback" in err and f'File "{plugin}", line 6, in on_epoch_end' in err
    assert err.rstrip().splitlines()[-1].startswith("error: ") and "epoch.txt: No such file or directory" in err


def test_an_oserror_of_cifarlabs_own_code_stays_one_line(tmp_path, capsys):
    from cifarlab.cli.common import run_command
    from cifarlab.files import write_json

    (tmp_path / "a_file").write_text("")

    def cifarlabs(args):
        write_json(tmp_path / "a_file" / "x.json", {})  # a file where its folder should be

    def users(args):
        json.loads((tmp_path / "missing.json").read_text())  # through the standard library: still the user's line

    assert run_command(cifarlabs, None) == 1  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: ")
    assert run_command(users, None) == 1  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "Traceback" in err and f'File "{__file__}"' in err and ", in users" in err
    assert err.rstrip().splitlines()[-1].startswith(f"error: {tmp_path / 'missing.json'}: No such file")


# -- 3. a plugin's own errors: its file and line; its imports of other modules ------------------------------------


def test_a_plugin_that_raises_names_its_file_and_line(tmp_path, isolated):
    plugin = _write(tmp_path / "raise.py", "x = 1\ndef helper():\n    return undefined_name + 1\nhelper()\n")
    with pytest.raises(UserError) as e:
        cifarlab.plugins.load_plugin(str(plugin))
    assert str(e.value) == (
        f"--plugin {plugin} failed while loading at {plugin}, line 3, in helper: NameError: name 'undefined_name' "
        "is not defined"
    )
    # An error in a module the plugin imports: the plugin's line, and where it raised.
    _write(tmp_path / "qa_broken_helper.py", "def f():\n    raise KeyError('boom')\nf()\n")
    importer = _write(tmp_path / "imports_broken.py", "import os\nimport qa_broken_helper\n")
    with pytest.raises(UserError) as e:
        cifarlab.plugins.load_plugin(str(importer))
    assert f"at {importer}, line 2; raised at {tmp_path / 'qa_broken_helper.py'}, line 2, in f: KeyError" in str(
        e.value
    )


def test_a_py_plugin_imports_modules_beside_it_and_sys_path_is_restored(tmp_path, isolated):
    _write(tmp_path / "qa_helper_mod.py", "VALUE = 41\n")
    plugin = _write(tmp_path / "withhelper.py", "from qa_helper_mod import VALUE\nANSWER = VALUE + 1\n")
    path = list(sys.path)
    assert cifarlab.plugins.load_plugin(str(plugin)).ANSWER == 42
    assert sys.path == path


def test_a_plugins_failed_import_is_not_reported_as_the_plugin_missing(tmp_path, isolated, monkeypatch):
    plugin = _write(tmp_path / "needs.py", "import os\nimport qa_no_such_module_xyz\n")
    with pytest.raises(UserError) as e:
        cifarlab.plugins.load_plugin(str(plugin))
    message = str(e.value)
    assert "import of 'qa_no_such_module_xyz' failed" in message and f"{plugin}, line 2" in message
    assert "pass a .py file" not in message
    # A module plugin: the same, and only a missing plugin module itself is "module not found".
    pkg = tmp_path / "qa_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "extras.py").write_text("import qa_no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=r"qa_pkg.extras: the plugin's import of 'qa_no_such_module_xyz' failed"):
        cifarlab.plugins.load_plugin("qa_pkg.extras")
    for spec in ("qa_pkg.nothing", "qa_nothing.extras"):
        with pytest.raises(UserError, match=rf"--plugin {spec}: module not found .*pass a .py file"):
            cifarlab.plugins.load_plugin(spec)


# -- 4. one plugin under two spellings loads once ------------------------------------------------------------------


def test_one_plugin_file_under_several_spellings_loads_once(tmp_path, isolated, monkeypatch, capsys):
    _write(
        tmp_path / "myplugin.py",
        """
        from cifarlab.registry import MODELS

        @MODELS.register("qa_once")
        def qa_once(recipe, num_classes, input_shape):
            \"\"\"registered once\"\"\"
        """,
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(cifarlab.plugins.ENV, str(tmp_path / "myplugin.py"))
    modules = cifarlab.plugins.load_plugins(["myplugin.py", "./myplugin.py", "../" + tmp_path.name + "/myplugin.py"])
    assert len(modules) == 1 and "qa_once" in MODELS
    # and the CLI, in this process, as `CIFARLAB_PLUGINS=/abs/myplugin.py cifarlab --plugin myplugin.py ...`
    monkeypatch.setattr(cifarlab.plugins, "_loaded", {})
    MODELS.unregister("qa_once")
    assert cli.main(["--plugin", "myplugin.py", "--plugin", "./myplugin.py", "config", "--set", "model=qa_once"]) == 0
    assert "model: qa_once  # registered once;" in capsys.readouterr().out


# -- 5. a factory that returns the wrong thing is named in one line ------------------------------------------------


class _C(Callback):
    pass


def test_factories_returning_the_wrong_thing_are_named(isolated):
    from cifarlab.augment import make_augment
    from cifarlab.models import build_model
    from cifarlab.train import StepSchedule, build_optimizer, recipe_callbacks
    from cifarlab.train.optim import schedule_callbacks

    CALLBACKS.register("qa_retclass")(lambda recipe: _C)
    AUGMENTS.register("qa_retnone")(lambda recipe: None)
    SCHEDULES.register("qa_retone")(lambda recipe, has_val: StepSchedule(lambda s, t: 1.0))
    OPTIMIZERS.register("qa_retnone")(lambda model, recipe: None)
    MODELS.register("qa_retclass")(lambda recipe, k, shape: nn.Linear)
    r = get_recipe("reference")
    with pytest.raises(ConfigError) as e:
        recipe_callbacks(r.replace(callbacks=("qa_retclass",)), has_val=False)
    assert "callbacks='qa_retclass': the registered callback factory" in str(e.value)
    assert "returned the class _C itself (create one: return _C(...)); it must return a cifarlab.Callback" in str(
        e.value
    )
    assert f"({__file__}, line " in str(e.value)  # where the factory is
    with pytest.raises(ConfigError, match=r"augment='qa_retnone'.* returned None .*must return a batch transform"):
        make_augment(r.replace(augment="qa_retnone"))
    assert make_augment(r.replace(augment="none")) is None  # `none` means it
    with pytest.raises(
        ConfigError, match=r"schedule='qa_retone'.* returned a StepSchedule .*\[StepSchedule\(\.\.\.\)\]"
    ):
        schedule_callbacks(r.replace(schedule="qa_retone"), has_val=False)
    with pytest.raises(ConfigError, match=r"optimizer='qa_retnone'.* returned None .*torch.optim.Optimizer"):
        build_optimizer(nn.Linear(2, 2), r.replace(optimizer="qa_retnone"))
    with pytest.raises(ConfigError, match=r"model='qa_retclass'.* returned the class Linear itself .*an nn.Module"):
        build_model(r.replace(model="qa_retclass"))
    # The built-ins pass their own checks.
    for name in ("plateau", "onecycle"):
        assert isinstance(schedule_callbacks(r.replace(schedule=name), has_val=True), list)


def test_a_callback_factory_returning_its_class_fails_train_in_one_line(tmp_path, isolated, image_folder, capsys):
    """It failed with `TypeError: Callback.set_trainer() missing 1 required positional argument` and a traceback."""
    CALLBACKS.register("qa_retclass")(lambda recipe: _C)
    args = ["train", *TRAIN, "--set", "callbacks=qa_retclass", "--set", f"dataset={image_folder}"]
    assert cli.main([*args, "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: callbacks='qa_retclass': the registered callback factory") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # checked before the folder


# -- 6. a model fit()'s probe refuses is not left registered ---------------------------------------------------------


class _RefusedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 10)  # ten logits for two classes: the probe refuses it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


def test_a_model_the_probe_refuses_is_not_left_registered(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 255, (40, 3, 16, 16), dtype=np.uint8), np.arange(40) % 2
    with pytest.raises(UserError, match="returns shape"):
        cifarlab.fit("reference", data=(x[:32], y[:32], x[32:], y[32:]), model=_RefusedNet(), runs_dir=tmp_path)
    assert not any(name.startswith("user._RefusedNet") for name in MODELS)


# -- 7. `cifarlab config` and the report say what each registered name is ------------------------------------------


def test_config_and_the_report_show_registered_descriptions(isolated, capsys):
    from cifarlab.report.sections import _config_rows

    @CALLBACKS.register("qa_described")
    def qa_described(recipe):
        """does nothing.

        More lines the one-line notes leave out."""
        return Callback()

    assert cli.main(["config", "--recipe", "fast", "--set", "callbacks=qa_described"]) == 0
    out = capsys.readouterr().out
    airnet = MODELS.describe("airnet").removesuffix(".")
    assert f"\nmodel: airnet  # {airnet}; one of " in out
    assert f"\naugment: flip_translate  # {AUGMENTS.describe('flip_translate').removesuffix('.')}; one of " in out
    assert f"\noptimizer: muon  # {OPTIMIZERS.describe('muon').removesuffix('.')}; one of " in out
    assert f"\nschedule: onecycle  # {SCHEDULES.describe('onecycle').removesuffix('.')}; one of " in out
    assert "\ncallbacks: [qa_described]  # qa_described: does nothing; fast: []; any of " in out
    notes = {r[0]: r[2] for r in _config_rows(get_recipe("fast").replace(callbacks=("qa_described",)), {})}
    assert notes["model"] == airnet and notes["callbacks"] == "changed (recipe default []); qa_described: does nothing"
    assert notes["lr"] == ""
