"""Checkpoints, resume after SIGKILL / Ctrl-C, and the NaN stop, on tiny data. The runs that get killed or
interrupted are real subprocesses; the runs they are compared with, and the resume, go through `cli.main` in this
process (on the same single core, so with the same thread count: bit-identical weights)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _synth import TINY_ARGS, determinism_restored, make_dataset, write_image_folder
from cifarlab import cli
from cifarlab.experiment import run_experiment
from cifarlab.recipes import get_recipe
from cifarlab.runs import load_checkpoint
from cifarlab.train.callbacks import Callback

TINY = [
    *TINY_ARGS,
    "--set",
    "bn_momentum=0.1",
    "--set",
    "early_stopping_patience=2",
]


def _write_imagefolder(root: Path) -> Path:
    return write_image_folder(root, 60, 10)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _write_imagefolder(tmp_path_factory.mktemp("synth") / "synth")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One dataset cache for the module's runs, in this process and in subprocesses: the folder is decoded once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def in_process(cache, monkeypatch):
    """`cli.main` runs here use the module's cache; --deterministic's global switch is put back afterwards."""
    monkeypatch.setenv("CIFARLAB_CACHE", str(cache))
    with determinism_restored():
        yield


def _args(folder: Path, runs: Path, *extra: str) -> list[str]:
    return [
        "train",
        *TINY,
        "--set",
        f"dataset={folder}",
        "--runs-dir",
        str(runs),
        "--no-report",
        "--deterministic",
        *extra,
    ]


def _cmd(folder: Path, runs: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cifarlab.cli", *_args(folder, runs, *extra)]


def _env(cache: Path) -> dict:
    return {**os.environ, "CIFARLAB_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


def _only_run(runs: Path) -> Path:
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run


@pytest.mark.long
def test_sigkilled_run_resumes_to_identical_weights(tmp_path, folder, cache, in_process, capsys):
    env = _env(cache)
    epochs = ["--set", "epochs=6"]
    assert cli.main(_args(folder, tmp_path / "a", *epochs)) == 0, capsys.readouterr()  # uninterrupted

    proc = subprocess.Popen(
        _cmd(folder, tmp_path / "b", *epochs), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    ckpt = None
    while time.time() < deadline and proc.poll() is None:
        runs = list((tmp_path / "b").glob("*/checkpoint.pt")) if (tmp_path / "b").exists() else []
        if runs:
            ckpt = runs[0]
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: mid-epoch (or mid-write) at worst
    proc.wait()
    assert ckpt is not None, "the run never wrote a checkpoint"
    run_b = _only_run(tmp_path / "b")
    state = json.loads((run_b / "status.json").read_text())
    assert state["status"] == "running"  # killed: nothing got to mark it otherwise
    assert load_checkpoint(run_b / "checkpoint.pt")["epoch"] < 6  # it really was interrupted

    assert cli.main(["train", "--resume", str(run_b), "--no-report", "--deterministic"]) == 0, capsys.readouterr()
    run_a = _only_run(tmp_path / "a")
    wa, wb = load_file(run_a / "model.safetensors"), load_file(run_b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (run_a, run_b))
    assert ma["test_accuracy"] == mb["test_accuracy"] and ma["epochs_run"] == mb["epochs_run"]
    ha, hb = (json.loads((r / "history.json").read_text()) for r in (run_a, run_b))
    assert [h["val_loss"] for h in ha] == [h["val_loss"] for h in hb]
    assert json.loads((run_b / "status.json").read_text())["status"] == "finished"


class _PoisonAfter(Callback):
    """Sets a weight to NaN at the end of epoch `epoch` (0-based), as an exploding update would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            with torch.no_grad():
                next(self.trainer.model.parameters()).fill_(float("nan"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    recipe = get_recipe("reference").replace(
        widths=(8, 16, 16), dense_width=32, epochs=5, batch_size=32, precision="fp32"
    )
    res = run_experiment(
        recipe, dataset=make_dataset(20, 5), runs_root=tmp_path, quiet=True, report=False, callbacks=[_PoisonAfter(1)]
    )
    assert res.status == "diverged"
    assert "NaN" in res.metrics["message"]
    assert json.loads((res.run_dir / "status.json").read_text())["status"] == "crashed"
    ckpt = load_checkpoint(res.run_dir / "checkpoint.pt")
    assert ckpt["epoch"] == 1  # the poisoned epoch 2 was never checkpointed
    assert all(math.isfinite(float(v.float().sum())) for v in ckpt["model"].values())
