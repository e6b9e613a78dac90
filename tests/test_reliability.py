"""Regression tests for the reliability defects of issue #13, one section per item.

Each test fails on the old behaviour the issue describes and passes now. Runs are tiny (a 8/16/16 reference
CNN on a few hundred synthetic images); command-line behaviour (exit status, one error line, no traceback)
is checked through `cifarlab.cli.main` in-process, or in a real subprocess where the process matters
(signals, locks held by another process, a hang, a parser that could eat all memory).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from _synth import TINY_ARGS, default_sigint, determinism_restored, make_dataset, make_images, write_image_folder
from cifarlab import cli
from cifarlab.config import load_config_file
from cifarlab.errors import ConfigError, UserError
from cifarlab.experiment import run_callbacks, run_experiment
from cifarlab.recipes import get_recipe
from cifarlab.registry import CALLBACKS
from cifarlab.runs import RunLock, load_checkpoint, save_weights
from cifarlab.train import EpochLog, ProgressBar, Trainer
from cifarlab.train.callbacks import Callback
from conftest import write_cifar_archive

TINY = TINY_ARGS
TINY_RECIPE = get_recipe("reference").replace(widths=(8, 16, 16), dense_width=32, batch_size=16, precision="fp32")


# -- shared set-up -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_core_and_torch_state():
    """Tiny models train fastest on one thread, and the suite may share its cores with other work: pin this
    module (and the subprocesses it starts, which inherit the affinity) to one core. Resuming a
    --deterministic run in-process turns deterministic algorithms on: put torch back as it was afterwards."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = torch.get_num_threads()
    if affinity:
        os.sched_setaffinity(0, {min(affinity)})
    with determinism_restored():
        yield
    if affinity:
        os.sched_setaffinity(0, affinity)
    torch.set_num_threads(threads)


def _write_imagefolder(root: Path, per_class: int = 40) -> Path:
    return write_image_folder(root, per_class, 10)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """An ImageFolder tree (160 train, 40 test images, 4 classes): a run trained on it finds its data by the
    absolute path its recipe stores, so evaluate/report work on it from any test."""
    return _write_imagefolder(tmp_path_factory.mktemp("folder") / "synth")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, folder) -> Path:
    """One finished tiny run (2 epochs), trained once; tests copy it before changing anything."""
    base = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CIFARLAB_CACHE", str(base / "cache"))
        mp.setenv("CIFARLAB_DATA", str(base / "empty"))
        res = run_experiment(
            TINY_RECIPE.replace(epochs=2, dataset=str(folder)), runs_root=base / "runs", quiet=True, report=False
        )
    assert res.status == "finished"
    return res.run_dir


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _env(cache: Path, data: Path) -> dict[str, str]:
    return {**os.environ, "CIFARLAB_CACHE": str(cache), "CIFARLAB_DATA": str(data), "PYTHONUNBUFFERED": "1"}


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cifarlab.cli", *args],
        env=env or {**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_error_line(err: str, *needles: str) -> str:
    """stderr holds exactly one `error:` line (informational lines such as the MD5 note may precede it), no
    traceback, and the error line contains every needle."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def _main(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _poison_weights(path: Path) -> None:
    state = load_file(path)
    key = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, path)


def _image(tmp_path: Path) -> Path:
    img = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (200, 30, 40)).save(img)
    return img


def _command(name: str, run: Path, tmp_path: Path) -> list[str]:
    return {
        "predict": ["predict", str(run), str(_image(tmp_path))],
        "export": ["export", str(run), "--format", "onnx", "--out", str(tmp_path / "model.onnx")],
        "evaluate": ["evaluate", str(run)],
        "report": ["report", str(run)],
    }[name]


# -- 1. divergence -------------------------------------------------------------------------------------------


def test_divergence_from_a_huge_lr_stops_and_writes_no_model(tmp_path, folder, capsys):
    runs = tmp_path / "runs"
    argv = ["train", *TINY, "--set", "lr=1e30", "--set", "epochs=2", "--set", f"dataset={folder}"]
    rc, out, err = _main(capsys, *argv, "--runs-dir", str(runs), "--no-report")
    assert rc not in (0, 130), out + err
    assert "Traceback" not in err, err
    assert "lower the learning rate" in out + err
    (run,) = runs.iterdir()
    assert not (run / "model.safetensors").exists()  # the NaN weights were never written as the model
    assert not (run / "checkpoint.pt").exists()  # no epoch finished
    assert json.loads((run / "status.json").read_text())["status"] == "crashed"


class _PoisonAfter(Callback):
    """Sets a weight (or a BatchNorm running variance) to NaN at the end of epoch `epoch` (0-based), as an
    exploding update would."""

    order = 70  # before the NaN guard's epoch-end check (80)

    def __init__(self, epoch: int, buffer: bool = False) -> None:
        self.epoch, self.buffer = epoch, buffer

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            model = self.trainer.model
            with torch.no_grad():
                if self.buffer:
                    next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)).running_var.fill_(
                        float("nan")
                    )
                else:
                    next(model.parameters()).fill_(float("nan"))


@pytest.mark.parametrize("buffer", [False, True], ids=["weight", "bn-running-var"])
def test_nan_weights_after_good_epochs_are_never_saved(tmp_path, buffer):
    res = run_experiment(
        TINY_RECIPE.replace(epochs=4, batch_size=32),
        dataset=make_dataset(20, 5),
        runs_root=tmp_path,
        quiet=True,
        report=False,
        callbacks=[_PoisonAfter(1, buffer)],
    )
    assert res.status == "diverged" and "NaN" in res.metrics["message"]
    assert not (res.run_dir / "model.safetensors").exists()
    assert json.loads((res.run_dir / "status.json").read_text())["status"] == "crashed"
    ckpt = load_checkpoint(res.run_dir / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and all(bool(torch.isfinite(v.float()).all()) for v in ckpt["model"].values())


def test_save_weights_refuses_nan(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match="NaN/inf"):
        save_weights(model, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("command", ["predict", "export", "evaluate", "report"])
def test_every_command_refuses_nan_weights(tmp_path, finished_run, capsys, command):
    run = _copy(finished_run, tmp_path / "run")
    _poison_weights(run / "model.safetensors")
    rc, _, err = _main(capsys, *_command(command, run, tmp_path))
    assert rc == 2
    _one_error_line(err, "model.safetensors", "NaN/inf")
    assert not (tmp_path / "model.onnx").exists()


# -- 2. a batch larger than the training set with drop_last ----------------------------------------------------


def test_batch_larger_than_training_set_fails_before_any_folder(tmp_path, folder, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    argv = ["train", "--set", "widths=8,16,16", "--set", "batch_size=1000", "--set", f"dataset={folder}"]
    rc, out, err = _main(capsys, *argv, "--runs-dir", str(runs))
    assert rc == 2, out + err
    _one_error_line(err, "batch_size=1000", "drop_last")
    assert list(runs.iterdir()) == []


# -- 3, 4, 5, 12, 14: a stopped run on official-layout data, resumed -------------------------------------------

RESUMABLE = [*TINY, "--set", "epochs=4", "--set", "early_stopping_patience=0", "--no-report", "--deterministic"]


@pytest.fixture(scope="module")
def data_a(tmp_path_factory):
    return write_cifar_archive(tmp_path_factory.mktemp("data_a"), "cifar10", n_per_batch=40, n_test=20)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, data_a):
    """A --deterministic run on `--data-dir A`, stopped with Ctrl-C (SIGINT) after its first checkpoint."""
    base = tmp_path_factory.mktemp("stopped")
    env = _env(base / "cache", base / "empty")
    runs = base / "runs"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cifarlab.cli",
            "train",
            *RESUMABLE,
            "--data-dir",
            str(data_a.data_dir),
            "--runs-dir",
            str(runs),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=default_sigint,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list(runs.glob("*/checkpoint.pt")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    (run,) = runs.iterdir()
    assert json.loads((run / "status.json").read_text())["status"] == "stopped"
    assert 1 <= load_checkpoint(run / "checkpoint.pt")["epoch"] < 4  # the checkpoint of a whole epoch
    return types.SimpleNamespace(run=run, out=out, base=base)


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, folder, capsys):
    """`timeout`, `docker stop` and batch schedulers send SIGTERM: the run stops as with Ctrl-C (checkpoint kept,
    status stopped, the resume command printed, exit 130) instead of dying with its status still 'running'."""

    class SigtermAtEpoch2(Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGTERM)

    CALLBACKS.register("sigterm_at_epoch_2")(lambda recipe: SigtermAtEpoch2())
    before = signal.getsignal(signal.SIGTERM)
    try:
        argv = [*TINY, "--set", "epochs=3", "--set", f"dataset={folder}", "--set", "callbacks=sigterm_at_epoch_2"]
        rc, out, _ = _main(capsys, "train", *argv, "--runs-dir", str(tmp_path), "--no-report")
    finally:
        signal.signal(signal.SIGTERM, before)
        CALLBACKS.unregister("sigterm_at_epoch_2")
    (run,) = tmp_path.iterdir()
    assert rc == 130
    assert json.loads((run / "status.json").read_text())["status"] == "stopped"
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert f"resume with: cifarlab train --resume {run}" in out


def test_a_second_ctrl_c_while_the_stopped_run_is_written_only_says_so(tmp_path, folder, capsys, monkeypatch):
    """Two quick Ctrl-Cs: the second landed while the stopped run's files were written, which then recorded it as
    "interrupted outside the training epochs" with no weights file (QA). Now the second only says the run is
    stopping; the handlers are Python's own again afterwards."""
    import cifarlab.experiment as experiment

    class CtrlCAtEpoch2(Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                os.kill(os.getpid(), signal.SIGINT)

    real = experiment.write_history

    def impatient(*args, **kwargs):  # the second press, as finish() writes the stopped run's files
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    CALLBACKS.register("ctrl_c_at_epoch_2")(lambda recipe: CtrlCAtEpoch2())
    monkeypatch.setattr(experiment, "write_history", impatient)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    try:
        argv = [*TINY, "--set", "epochs=3", "--set", f"dataset={folder}", "--set", "callbacks=ctrl_c_at_epoch_2"]
        rc, out, err = _main(capsys, "train", *argv, "--runs-dir", str(tmp_path), "--no-report")
    finally:
        CALLBACKS.unregister("ctrl_c_at_epoch_2")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    (run,) = tmp_path.iterdir()
    assert rc == 130
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped" and status["message"].startswith("interrupted during epoch 2")
    assert (run / "model.safetensors").exists()
    assert "already stopping" in err


def test_stopped_run_says_how_to_resume_and_stores_what_that_needs(stopped_run, data_a):
    run = stopped_run.run
    # The printed command is all a resume needs: config.json holds the data folder and --deterministic.
    assert f"resume with: cifarlab train --resume {run}\n" in stopped_run.out
    config = json.loads((run / "config.json").read_text())
    assert config["data_dir"] == str(data_a.data_dir.resolve())
    assert config["deterministic"] is True
    # 14: the first lines say which precision the run computes in, and why
    assert any(line.startswith("precision: fp32") for line in stopped_run.out.splitlines()[:6]), stopped_run.out


@pytest.mark.parametrize(
    "other,needles",
    [
        ({"seed": 1}, ["checksum"]),  # the same sizes, other pixels
        ({"n_per_batch": 41}, ["checksum", "split 164/41 here, 160/40 in the run"]),
    ],
    ids=["other-images", "other-split"],
)
def test_resume_on_other_data_is_refused_and_leaves_the_run_alone(tmp_path, stopped_run, capsys, other, needles):
    run = _copy(stopped_run.run, tmp_path / "run")
    before = _snapshot(run)
    other_data = write_cifar_archive(tmp_path / "other", "cifar10", **{"n_per_batch": 40, "n_test": 20, **other})
    rc, _, err = _main(capsys, "train", "--resume", str(run), "--data-dir", str(other_data.data_dir))
    assert rc == 2
    _one_error_line(err, "cannot resume", *needles)
    assert _snapshot(run) == before


@pytest.mark.parametrize(
    "change,needle",
    [
        (lambda d: d.update(classes=d["classes"][::-1]), "different classes"),  # same images, labels renamed
        (lambda d: d.update(split_digest="0" * len(d["split_digest"])), "a different train/validation split"),
    ],
    ids=["classes", "split"],
)
def test_resume_refuses_other_classes_or_another_split(tmp_path, stopped_run, capsys, monkeypatch, change, needle):
    """The same data files but other class names, or the same sizes but other images in train and validation:
    either would continue a run on a task it did not start on."""
    run = _copy(stopped_run.run, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    change(config["dataset"])
    (run / "config.json").write_text(json.dumps(config))
    before = _snapshot(run)
    monkeypatch.setenv("CIFARLAB_CACHE", str(stopped_run.base / "cache"))
    rc, _, err = _main(capsys, "train", "--resume", str(run))
    assert rc == 2 and f"cannot resume {run} on this data: {needle}" in err, err
    assert _snapshot(run) == before


def test_resume_of_a_run_still_training_is_refused_then_works_once_its_process_is_gone(tmp_path, stopped_run, capsys):
    run = _copy(stopped_run.run, tmp_path / "run")
    before = _snapshot(run)
    # A second trainer in this process: the lock is per open file, so this is refused like another process.
    with RunLock(run):
        rc, _, err = _main(capsys, "train", "--resume", str(run))
    assert rc == 2
    _one_error_line(err, "is in use", "still training")
    assert _snapshot(run) == before

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from cifarlab.runs import RunLock; lock = RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = _main(capsys, "train", "--resume", str(run))
        assert rc == 2
        _one_error_line(err, "is in use")
        assert _snapshot(run) == before
    finally:
        holder.kill()  # however the holder dies, the kernel drops its lock
        holder.wait()
    rc, out, err = _main(capsys, "train", "--resume", str(run), "--no-report")
    assert rc == 0, err
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


def test_resume_needs_only_the_run_folder_and_ends_bit_identical(tmp_path, stopped_run, data_a, capsys, monkeypatch):
    """5 and 12: `--resume RUN` alone (no --data-dir, no --deterministic, $CIFARLAB_DATA pointing at an empty
    folder) finishes on the stored data folder, deterministically, and reports both sessions' wall time. Both
    runs here go through `cli.main` in this process: on the one core the stopped run's process had (the
    module's affinity), so with the same thread count."""
    monkeypatch.setenv("CIFARLAB_CACHE", str(stopped_run.base / "cache"))
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "empty"))
    run = _copy(stopped_run.run, tmp_path / "stopped")  # the fixture stays stopped for the other tests
    rc, out, err = _main(capsys, "train", "--resume", str(run), "--no-report")
    assert rc == 0, out + err
    metrics = json.loads((run / "metrics.json").read_text())
    sessions = metrics["timings"]["session_seconds"]
    assert len(sessions) == 2 and all(s > 0 for s in sessions)
    assert metrics["timings"]["sessions_total_seconds"] == pytest.approx(sum(sessions))
    assert "wall time over 2 sessions (resumed)" in out
    assert "precision: fp32" in out  # 14, on a resume too

    runs = tmp_path / "runs"
    rc, out, err = _main(capsys, "train", *RESUMABLE, "--data-dir", str(data_a.data_dir), "--runs-dir", str(runs))
    assert rc == 0, err
    (uninterrupted,) = (tmp_path / "runs").iterdir()
    wa, wb = load_file(uninterrupted / "model.safetensors"), load_file(run / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma = json.loads((uninterrupted / "metrics.json").read_text())
    assert (ma["test_accuracy"], ma["test_loss"]) == (metrics["test_accuracy"], metrics["test_loss"])


# -- 6. values `config` accepts but training could not run -----------------------------------------------------


@pytest.mark.parametrize(
    "value,needle",
    [
        ("seed=99999999999999999999", "seed="),
        ("widths=100000,100000,100000", "GiB"),
        ("translate_pad=1000", "translate_pad"),
        ("precision=fp16", "precision=fp16"),
    ],
)
def test_values_that_crashed_training_are_refused_before_any_folder(tmp_path, folder, capsys, value, needle):
    if value == "precision=fp16" and torch.cuda.is_available():
        pytest.skip("fp16 runs on CUDA")
    runs = tmp_path / "runs"
    rc, _, err = _main(capsys, "train", *TINY, "--set", value, "--set", f"dataset={folder}", "--runs-dir", str(runs))
    assert rc == 2
    _one_error_line(err, needle)
    assert not runs.exists()


def test_a_model_too_large_for_memory_is_one_line_in_a_real_process(tmp_path, folder):
    runs = tmp_path / "runs"
    r = _cli(
        "train",
        *TINY,
        "--set",
        "widths=100000,100000,100000",
        "--set",
        f"dataset={folder}",
        "--runs-dir",
        str(runs),
        env=_env(tmp_path / "cache", tmp_path / "data"),
    )
    assert r.returncode == 2
    _one_error_line(r.stderr, "parameters", "GiB", "smaller widths")
    assert not runs.exists()


def test_translate_pad_must_fit_small_images(tmp_path):
    from cifarlab.data import from_arrays

    x, y = make_images(8, 4)
    ds = from_arrays(x[:, :, :8, :8].contiguous(), y, test_fraction=0.25)
    recipe = get_recipe("fast").replace(widths=(8, 16, 16), translate_pad=8, batch_size=8)
    with pytest.raises(UserError, match="translate_pad=8 must be smaller than the 8x8 images"):
        run_experiment(recipe, dataset=ds, runs_root=tmp_path / "runs", quiet=True, report=False)
    assert not (tmp_path / "runs").exists()


# -- 7. a runs dir that cannot hold run folders ----------------------------------------------------------------


def _train_into(capsys, folder: Path, runs: Path) -> tuple[int, str]:
    rc, _, err = _main(
        capsys,
        "train",
        *TINY,
        "--set",
        "epochs=1",
        "--set",
        f"dataset={folder}",
        "--runs-dir",
        str(runs),
        "--no-report",
    )
    return rc, err


def test_runs_dir_that_is_a_file(tmp_path, folder, capsys):
    f = tmp_path / "runs"
    f.write_text("not a folder")
    rc, err = _train_into(capsys, folder, f)
    assert rc == 2
    _one_error_line(err, str(f), "is a file")
    rc, err = _train_into(capsys, folder, f / "below")
    assert rc == 2
    _one_error_line(err, "cannot create a run folder")
    assert f.read_text() == "not a folder"


def test_read_only_runs_dir(tmp_path, folder, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: chmod does not make a folder read-only")
        rc, err = _train_into(capsys, folder, ro / "runs")
        assert rc == 2
        _one_error_line(err, "cannot create a run folder")
    finally:
        ro.chmod(0o755)


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (we may be root); yields a function mount(options) -> folder."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        d = tmp_path / f"mnt{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", str(d)], capture_output=True)


def test_runs_dir_on_a_read_only_filesystem(tmp_path, folder, capsys, tmpfs):
    ro = tmpfs("ro,size=64k")  # read-only for root too
    rc, err = _train_into(capsys, folder, ro / "runs")
    assert rc == 2
    _one_error_line(err, "cannot create a run folder", "Read-only file system")


# -- 8. a full disk while writing the report -------------------------------------------------------------------


def _is_report_file(path: Path) -> bool:
    return path.name in ("report.html", "report.md") or path.parent.name == "plots"


def test_run_files_get_the_permissions_of_ordinary_files(finished_run, tmp_path):
    """Atomic writes go through mkstemp (mode 0600): the files must still get what open() would give under the
    umask, or a run folder on a shared machine is readable by its owner alone; a rewrite keeps a file's mode."""
    from cifarlab.files import atomic_write_text

    umask = os.umask(0o022)
    os.umask(umask)
    expected = 0o666 & ~umask
    files = [p for p in finished_run.rglob("*") if p.is_file() and p.name != "run.lock"]
    assert {"config.json", "model.safetensors", "checkpoint.pt", "metrics.json"} <= {p.name for p in files}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(expected) for p in files}
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "new.txt", "a")
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o640
        (tmp_path / "new.txt").chmod(0o604)
        atomic_write_text(tmp_path / "new.txt", "b")  # rewriting keeps the file's own mode
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o604
        assert (tmp_path / "new.txt").read_text() == "b"
    finally:
        os.umask(old)


def test_full_disk_during_the_report_keeps_the_run_finished(tmp_path, monkeypatch, undrawn_figures):
    import cifarlab.experiment
    import cifarlab.files

    real = cifarlab.files.atomic_write

    def atomic_write(path, write):
        if _is_report_file(Path(path)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(cifarlab.files, "atomic_write", atomic_write)
    # 13 (wiring): without a terminal the run logs a progress line at least every 10 s within an epoch
    made = []
    real_callbacks = cifarlab.experiment.run_callbacks

    def spy(*args, **kwargs):
        made.extend(real_callbacks(*args, **kwargs))
        return made

    monkeypatch.setattr(cifarlab.experiment, "run_callbacks", spy)
    lines: list[str] = []
    res = run_experiment(
        TINY_RECIPE.replace(epochs=1), dataset=make_dataset(16, 4), runs_root=tmp_path, log=lines.append
    )
    status = json.loads((res.run_dir / "status.json").read_text())
    assert res.status == "finished" and status["status"] == "finished"
    assert "No space left on device" in status["report_error"]
    assert (res.run_dir / "model.safetensors").exists()
    assert json.loads((res.run_dir / "metrics.json").read_text())["status"] == "finished"
    assert any("the report could not be written" in line and "cifarlab report" in line for line in lines)
    assert not list(res.run_dir.rglob(".*.tmp"))
    if not sys.stderr.isatty():
        assert [cb.every for cb in made if isinstance(cb, EpochLog)] == [10.0]


class _FillDisk(Callback):
    """When training ends (its last checkpoint written), fill the filesystem of `root` but for `leave` bytes."""

    def __init__(self, root: Path, leave: int) -> None:
        self.root, self.leave = root, leave

    def on_train_end(self, logs=None):
        st = os.statvfs(self.root)
        with open(self.root / "ballast", "wb") as f:
            f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - self.leave))


def test_really_full_disk_during_the_report(tmp_path, tmpfs, undrawn_figures):
    root = tmpfs("size=4m")
    fill = _FillDisk(root, leave=200_000)  # room for the model and metrics, not for the report's figures
    lines: list[str] = []
    res = run_experiment(
        TINY_RECIPE.replace(epochs=1),
        dataset=make_dataset(16, 4),
        runs_root=root / "runs",
        log=lines.append,
        callbacks=[fill],
    )
    status = json.loads((res.run_dir / "status.json").read_text())
    assert res.status == "finished" and status["status"] == "finished"
    assert "No space left on device" in status["report_error"]
    assert load_file(res.run_dir / "model.safetensors")  # whole and readable
    assert json.loads((res.run_dir / "metrics.json").read_text())["test_accuracy"] >= 0
    assert any("the report could not be written" in line for line in lines)
    assert not list(res.run_dir.rglob(".*.tmp"))


class _FillBeforeEpoch(_FillDisk):
    """Fill the disk at the start of epoch `epoch` (0-based) but for 40 kB: room for that epoch's history, steps and
    status files, none for its checkpoint."""

    def __init__(self, root: Path, epoch: int) -> None:
        super().__init__(root, leave=40_000)
        self.epoch = epoch

    def on_train_end(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            super().on_train_end()


def test_a_full_disk_during_training_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, folder, capsys, tmpfs, monkeypatch
):
    """A checkpoint that does not fit: the command ends with one line naming the file and what to do (torch.save
    writing to the file itself used to end in a traceback about stream positions); the previous checkpoint is
    whole and resumable, and status.json says what happened."""
    import cifarlab.experiment as experiment

    root = tmpfs("size=8m")
    made = experiment.run_callbacks
    monkeypatch.setattr(experiment, "run_callbacks", lambda *a, **k: [*made(*a, **k), _FillBeforeEpoch(root, 1)])
    rc, _, err = _main(
        capsys, "train", *TINY, "--set", "epochs=2", "--set", f"dataset={folder}", "--runs-dir", str(root / "runs"),
        "--no-report",
    )  # fmt: skip
    assert rc == 1
    _one_error_line(err, "checkpoint.pt", "No space left on device", "free some space")
    (run,) = (root / "runs").iterdir()
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "crashed" and "No space left on device" in status["message"], status
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1  # epoch 1's, whole
    assert not list(run.rglob(".*.tmp"))


def test_a_closed_output_pipe_does_not_stop_training(tmp_path, folder):
    """`cifarlab train | head -1`: the reader goes after the first line; the run trains on, finishes and says so
    in status.json (it used to stop at its next line of output, leaving a 'running' folder of a dead process)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    cmd = [sys.executable, "-m", "cifarlab.cli", "train", *TINY, "--set", "epochs=3", "--set", f"dataset={folder}"]
    proc = subprocess.Popen(
        [*cmd, "--runs-dir", str(tmp_path / "runs"), "--no-report"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()  # the first line, then the reader is gone
    proc.stdout.close()
    assert proc.wait(timeout=240) == 0, proc.stderr.read().decode()
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert json.loads((run / "metrics.json").read_text())["epochs_run"] == 3


class _StopAtEpoch(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt  # as Ctrl-C: the run stops, resumable from its last checkpoint


def test_resuming_a_checkpoint_that_no_longer_fits_its_config_is_one_readable_line(
    tmp_path, folder, capsys, monkeypatch
):
    """config.json's widths edited after a stop: torch's multi-line mismatch report becomes one line (it showed its
    newlines as literal \\n\\t), and the folder is left as it was."""
    import cifarlab.experiment as experiment

    made = experiment.run_callbacks
    with monkeypatch.context() as m:
        m.setattr(experiment, "run_callbacks", lambda *a, **k: [*made(*a, **k), _StopAtEpoch(1)])
        rc, _, _ = _main(
            capsys, "train", *TINY, "--set", "epochs=2", "--set", f"dataset={folder}", "--runs-dir",
            str(tmp_path / "runs"), "--no-report",
        )  # fmt: skip
    assert rc == 130
    (run,) = (tmp_path / "runs").iterdir()
    config = json.loads((run / "config.json").read_text())
    config["recipe"]["widths"] = [8, 16, 24]
    (run / "config.json").write_text(json.dumps(config))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    rc, _, err = _main(capsys, "train", "--resume", str(run))
    assert rc == 2  # the checkpoint records its recipe: the edit is named
    _one_error_line(err, "recipe is not the one its checkpoint trained with: widths ([8, 16, 16] -> [8, 16, 24])")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"} == before

    # A checkpoint of an older cifarlab records none: torch's mismatch report, in one line
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["recipe"]
    torch.save(state, run / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"}
    rc, _, err = _main(capsys, "train", "--resume", str(run))
    assert rc == 2
    line = _one_error_line(err, "checkpoint.pt does not fit this run", "size mismatch", "was config.json edited?")
    assert "\\n" not in line and "\\t" not in line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != ".lock"} == before


# -- 9. tampered run folders -----------------------------------------------------------------------------------


def _empty_config(run: Path) -> None:
    (run / "config.json").write_text("{}")


def _no_classes(run: Path) -> None:
    config = json.loads((run / "config.json").read_text())
    del config["dataset"]["classes"]
    (run / "config.json").write_text(json.dumps(config))


def _wrong_shape(run: Path) -> None:
    state = load_file(run / "model.safetensors")
    key = next(k for k, v in state.items() if v.ndim == 4)
    state[key] = torch.zeros(3, 3)
    save_file(state, run / "model.safetensors")


def _integer_weights(run: Path) -> None:
    state = load_file(run / "model.safetensors")
    save_file(
        {k: v.to(torch.int32) if v.is_floating_point() else v for k, v in state.items()}, run / "model.safetensors"
    )


@pytest.mark.parametrize("command", ["evaluate", "predict", "export", "report"])
@pytest.mark.parametrize(
    "damage,needles",
    [
        (_empty_config, ["config.json", "no recipe"]),
        (_no_classes, ["config.json", "dataset.classes"]),
        (_wrong_shape, ["model.safetensors", "(3, 3)", "does not match"]),
        (_integer_weights, ["model.safetensors", "torch.int32, the model needs torch.float32", "does not match"]),
    ],
    ids=["config-empty", "config-no-classes", "weights-wrong-shape", "weights-integer"],
)
def test_tampered_run_folder_is_one_line_naming_the_file(tmp_path, finished_run, capsys, command, damage, needles):
    run = _copy(finished_run, tmp_path / "run")
    damage(run)
    rc, _, err = _main(capsys, *_command(command, run, tmp_path))
    assert rc == 2
    _one_error_line(err, str(run), *needles)


@pytest.mark.parametrize("name", ["metrics.json", "history.json"])
def test_a_damaged_side_file_blocks_nothing_that_does_not_need_it(
    tmp_path, finished_run, capsys, undrawn_figures, name
):
    """predict and export need config and weights only; report rebuilds metrics.json, so a truncated
    metrics.json or history.json is set aside (kept, renamed) with a warning instead of stopping it."""
    run = _copy(finished_run, tmp_path / "run")
    damaged = (run / name).read_bytes()[:40]
    (run / name).write_bytes(damaged)
    for command in ("predict", "export"):
        rc, _, err = _main(capsys, *_command(command, run, tmp_path))
        assert rc == 0, err
    rc, _, err = _main(capsys, "report", str(run))
    assert rc == 0, err
    assert f"{name} is not valid JSON" in err and f"kept as {name}.damaged" in err
    assert (run / f"{name}.damaged").read_bytes() == damaged  # nothing lost
    assert json.loads((run / "metrics.json").read_text())["test_accuracy"] >= 0  # rebuilt from the evaluation


# (A damaged dataset cache file is rebuilt with one warning: tests/test_data_reliability.py::
# test_damaged_cache_is_rebuilt_with_one_warning.)


# -- 10. a tampered checkpoint ---------------------------------------------------------------------------------


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_tampered_checkpoint_is_refused_by_resume(tmp_path, finished_run, capsys):
    from cifarlab.runs import write_status

    run = _copy(finished_run, tmp_path / "run")
    write_status(run, "stopped")  # a run to resume (a finished one is left alone without reading its checkpoint)
    marker = tmp_path / "pwned"
    (run / "checkpoint.pt").write_bytes(pickle.dumps({"epoch": 1, "model": _System(f"touch {marker}")}))
    before = _snapshot(run)
    rc, out, err = _main(capsys, "train", "--resume", str(run))
    assert rc == 2
    assert err.startswith(
        f"error: {run / 'checkpoint.pt'} is not a cifarlab checkpoint (damaged or tampered with); "
        "it cannot be resumed; start the run again"
    )
    assert err.count("\n") == 1
    assert "weights_only" not in out + err
    assert not marker.exists()
    assert _snapshot(run) == before


# -- 11. hostile config files ----------------------------------------------------------------------------------

# 330 bytes that expand to 9**9 strings through nested aliases ("billion laughs"). The value is for a real key
# whose error message would quote it: plain yaml.safe_load builds it as shared references in no time, and the
# expansion happened when the error message was formatted (over a minute and gigabytes, before the fix).
BOMB = """\
betas: [
  &a [lol,lol,lol,lol,lol,lol,lol,lol,lol],
  &b [*a,*a,*a,*a,*a,*a,*a,*a,*a],
  &c [*b,*b,*b,*b,*b,*b,*b,*b,*b],
  &d [*c,*c,*c,*c,*c,*c,*c,*c,*c],
  &e [*d,*d,*d,*d,*d,*d,*d,*d,*d],
  &f [*e,*e,*e,*e,*e,*e,*e,*e,*e],
  &g [*f,*f,*f,*f,*f,*f,*f,*f,*f],
  &h [*g,*g,*g,*g,*g,*g,*g,*g,*g],
  [*h,*h,*h,*h,*h,*h,*h,*h,*h]]
"""


def test_yaml_alias_bomb_is_refused_within_a_second(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    assert len(BOMB) < 400
    # In a subprocess: if the defence ever breaks, the expansion eats that process's memory, not pytest's.
    script = (
        "import json, sys, time\n"
        "from cifarlab import cli\n"
        "cli.main(['config', '--recipe', 'reference'])  # import everything first: time only the refusals\n"
        "cli.main(['train', '--set', 'epochs=0'])\n"
        "times = {}\n"
        "bomb, runs = sys.argv[1:3]\n"
        "for argv in (['config', '--config', bomb], ['train', '--config', bomb, '--runs-dir', runs]):\n"
        "    t = time.perf_counter(); rc = cli.main(argv); times[argv[0]] = [rc, time.perf_counter() - t]\n"
        "print(json.dumps(times))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(bomb), str(tmp_path / "runs")], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 0, r.stderr
    times = json.loads(r.stdout.splitlines()[-1])
    for command, (rc, seconds) in times.items():
        assert rc == 2 and seconds < 1.0, (command, rc, seconds)
    assert "Traceback" not in r.stderr
    errors = r.stderr.splitlines()[1:]  # after the warm-up's "epochs=0 must be > 0"
    assert len(errors) == 2 and all(e.startswith("error: --config") and "aliases" in e for e in errors), errors
    assert not (tmp_path / "runs").exists()


def test_config_file_over_1_mib_is_refused(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("lr: 0.001\n" + "#" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match="too large"):
        load_config_file(big)
    rc, _, err = _main(capsys, "config", "--config", str(big))
    assert rc == 2
    line = _one_error_line(err, str(big), "too large", "1 MiB")
    assert line.startswith(f"error: --config {big}:")  # said once, not "--config --config"


def test_fifo_config_is_refused_without_hanging(tmp_path, capsys):
    fifo = tmp_path / "x.yaml"
    os.mkfifo(fifo)
    result: dict[str, int] = {}
    runs = tmp_path / "runs"
    for argv in (["config", "--config", str(fifo)], ["train", "--config", str(fifo), "--runs-dir", str(runs)]):
        t = threading.Thread(target=lambda a=argv: result.__setitem__(a[0], cli.main(a)), daemon=True)
        t.start()
        t.join(timeout=20)
        if t.is_alive():  # blocked opening the FIFO: give it a writer so the thread can end, then fail
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
            t.join(timeout=5)
            pytest.fail(f"`cifarlab {argv[0]} --config FIFO` hung reading the FIFO")
        assert result[argv[0]] == 2
        _one_error_line(capsys.readouterr().err, str(fifo), "not a regular file")
    assert not runs.exists()


# -- 13. progress lines without a terminal ---------------------------------------------------------------------


def test_epoch_log_prints_progress_at_least_every_ten_seconds(monkeypatch):
    """A 50 s epoch (100 batches of 0.5 s, on a fake clock) logs a progress line every 10 s."""
    import cifarlab.train.progress as progress

    now = [1000.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    lines: list[str] = []
    log = EpochLog(lines.append, every_seconds=10.0)
    log.set_trainer(types.SimpleNamespace(steps_per_epoch=100, recipe=types.SimpleNamespace(epochs=3), history=[]))
    log.on_epoch_begin(0)
    stamps = []
    for batch in range(100):
        now[0] += 0.5
        before = len(lines)
        seen = 16 * (batch + 1)
        log.on_train_batch_end(batch, {"seen": seen, "loss_sum": torch.tensor(2.0 * seen), "correct": seen // 2})
        if len(lines) > before:
            stamps.append(now[0])
    assert len(lines) == 5 and all("epoch 1/3" in line and "batches" in line for line in lines)
    gaps = [b - a for a, b in zip([1000.0, *stamps], stamps)]
    assert all(g <= 10.0 for g in gaps), gaps
    assert "loss 2.0000" in lines[0] and "acc 0.5000" in lines[0]


def test_epoch_log_within_a_real_epoch_and_run_wiring(tmp_path):
    from cifarlab.data import BatchLoader

    ds = make_dataset(16, 4)
    loader = BatchLoader(ds.x_train, ds.y_train, 16, shuffle=True, seed=0)
    lines: list[str] = []
    trainer = Trainer(
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4)),
        TINY_RECIPE.replace(epochs=1, l2=0.0),
        loader,
        callbacks=[EpochLog(lines.append, every_seconds=0.0)],
    )
    trainer.fit()
    assert len([line for line in lines if "batches" in line]) == len(loader)  # every batch at every_seconds=0
    plan = types.SimpleNamespace(run_dir=tmp_path)
    piped = run_callbacks(plan, log=print, progress=False)  # no terminal: EpochLog with every_seconds=10
    assert [cb.every for cb in piped if isinstance(cb, EpochLog)] == [10.0]
    assert not any(isinstance(cb, ProgressBar) for cb in piped)
    tty = run_callbacks(plan, log=print, progress=True)
    assert any(isinstance(cb, ProgressBar) for cb in tty)


# -- 14. the precision and why ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bf16", [False, True])
def test_precision_auto_says_why(monkeypatch, bf16):
    import cifarlab.device as device

    monkeypatch.setattr(device, "cpu_has_bf16", lambda: bf16)
    reason = device.precision_reason("auto", torch.device("cpu"))
    if bf16:
        assert reason.startswith("bf16") and "native bf16" in reason
    else:
        assert reason.startswith("fp32: this CPU has no native bf16")


@pytest.mark.parametrize(
    ("env", "flags", "bf16", "says"),
    [
        ({}, True, True, "bf16 autocast"),
        ({"ONEDNN_MAX_CPU_ISA": "avx2"}, True, False, "fp32: ONEDNN_MAX_CPU_ISA=AVX2 switches off"),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True, True, "bf16 autocast"),  # a cap above bf16
        ({"ATEN_CPU_CAPABILITY": "avx2"}, True, False, "fp32: ATEN_CPU_CAPABILITY=avx2 switches off"),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False, False, "fp32: this CPU has no native bf16"),
    ],
)
def test_precision_auto_follows_an_instruction_set_cap(monkeypatch, env, flags, bf16, says):
    """ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY below bf16 make a bf16 CPU run an AVX2 CPU's kernels: 'auto'
    must then pick fp32 (bf16 would be emulated) and say why."""
    import cifarlab.device as device

    for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(device, "_cpu_flags_bf16", lambda: flags)
    monkeypatch.setattr(device.platform, "machine", lambda: "x86_64")
    # torch reads ATEN_CPU_CAPABILITY once, at start-up: report what it would then say
    capped = "AVX2" if "ATEN_CPU_CAPABILITY" in env else "AVX512"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capped)
    assert device.cpu_has_bf16() is bf16
    assert (device.autocast_dtype("auto", torch.device("cpu")) is None) is not bf16
    assert device.precision_reason("auto", torch.device("cpu")).startswith(says)


def _cpu_has_avx2() -> bool:
    try:
        return " avx2" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has_avx2(), reason="needs an x86 CPU with AVX2")
def test_an_instruction_set_cap_reaches_torch_and_the_run_record():
    """In a fresh process the cap is what torch's kernels use, and the machine record of a run says so."""
    code = (
        "import torch, cifarlab.device as d, cifarlab.runs as r;"
        "print(torch.backends.cpu.get_cpu_capability(), d.cpu_has_bf16(), r.machine_info().get('cpu_isa_cap'))"
    )
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["AVX2", "False", "ONEDNN_MAX_CPU_ISA=AVX2"]


def test_train_output_starts_with_the_precision(tmp_path):
    lines: list[str] = []
    run_experiment(
        TINY_RECIPE.replace(epochs=1), dataset=make_dataset(8, 4), runs_root=tmp_path, log=lines.append, report=False
    )
    head = lines[:5]
    assert any(line == "precision: fp32 (precision=fp32)" for line in head), head
