"""GPU paths (marked `gpu`, skipped without CUDA): autocast training steps, deterministic resume after SIGKILL on
CUDA, and a CUDA-trained run evaluated, predicted and exported on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _synth import make_dataset, write_image_folder
from cifarlab.data import BatchLoader
from cifarlab.experiment import run_experiment
from cifarlab.recipes import get_recipe
from cifarlab.runs import load_checkpoint
from cifarlab.train import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TINY = dict(widths=(8, 16, 16), dense_width=32, batch_size=16, bn_momentum=0.1)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_step_under_autocast(precision):
    ds = make_dataset(20, 5)
    recipe = get_recipe("reference").replace(**TINY, epochs=1, precision=precision)
    dev = torch.device("cuda")
    from cifarlab.models import build_model

    model = build_model(recipe, len(ds.classes)).to(dev)
    loader = BatchLoader(ds.x_train, ds.y_train, 16, shuffle=True, seed=0, device=dev)
    trainer = Trainer(model, recipe, loader, device=dev)
    assert (trainer.scaler is not None) == (precision == "fp16")
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.fit()
    assert result.status == "finished" and len(result.history) == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cuda_run_is_used_on_the_cpu(tmp_path):
    ds = make_dataset(20, 5)
    recipe = get_recipe("fast").replace(widths=(8, 16, 16), epochs=2, batch_size=16)
    res = run_experiment(recipe, dataset=ds, runs_root=tmp_path, device="cuda", quiet=True, report=False)
    assert res.status == "finished"
    from cifarlab.evaluate import evaluate_run
    from cifarlab.export import export
    from cifarlab.inference import predict_logits
    from cifarlab.runs import load_run

    run = load_run(res.run_dir)
    model = run.build_model()  # on the CPU
    mean, std = run.normalization
    logits = predict_logits(model, ds.x_test, mean=mean, std=std, tta=recipe.tta, precision="fp32")
    assert logits.device.type == "cpu"
    # The same weights in fp32 on the GPU give the same logits (to float tolerance) as on the CPU. (The run's
    # own test accuracy was measured under bf16 autocast, where one image of 20 may flip: not comparable.)
    on_gpu = predict_logits(run.build_model().cuda(), ds.x_test, mean=mean, std=std, tta=recipe.tta, precision="fp32")
    torch.testing.assert_close(on_gpu.cpu(), logits, rtol=1e-3, atol=1e-3)
    ev, _ = evaluate_run(res.run_dir, dataset=ds)
    assert ev.accuracy == pytest.approx(res.metrics["test_accuracy"], abs=0.051)  # same bf16 path, maybe 1 image
    fmt = "onnx" if _has("onnx") else "torchscript"  # the GPU machine may lack onnx
    assert export(res.run_dir, fmt, tmp_path / f"m.{fmt}").exists()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# Tiny versions, fp32. `fast`: its step changes once (a 3/4-size first epoch with the whitening bias trained, then
# full size with it frozen: a new capture), 6 steps per epoch. `reference` (Adam, dropout, Keras augmentation,
# a validation split): 4 full batches and a smaller last one per epoch, each size its own graph.
TINY_RUNS = {
    "fast": dict(widths=(8, 16, 16), batch_size=16, epochs=3),
    "reference": dict(widths=(8, 16, 16), dense_width=32, batch_size=16, epochs=3),
}


def _graph_run(tmp_path, name: str, cuda_graph: bool) -> tuple[dict, Path]:
    recipe = get_recipe(name).replace(**TINY_RUNS[name], precision="fp32", cuda_graph=cuda_graph)
    res = run_experiment(
        recipe,
        dataset=make_dataset(24, 5),
        runs_root=tmp_path / f"{name}-{cuda_graph}",
        device="cuda",
        quiet=True,
        report=False,
    )
    assert res.status == "finished"
    return res.metrics, res.run_dir


@pytest.mark.parametrize("name", ["fast", "reference"])
def test_cuda_graph_step_trains_like_the_eager_step(tmp_path, name):
    m_graph, _ = _graph_run(tmp_path, name, True)
    m_eager, _ = _graph_run(tmp_path, name, False)
    assert m_eager["training_step"] == "eager (cuda_graph=false)"
    assert m_graph["training_step"] == "CUDA graph (2 captures)"  # two image sizes / two batch sizes
    # Different update code (lr * step, fused add) and cuDNN's own choices: close, not equal (tests/test_graphs.py
    # compares a graph with the same step op by op, exactly).
    assert m_graph["train_accuracy"] == pytest.approx(m_eager["train_accuracy"], abs=0.1)
    assert m_graph["test_accuracy"] == pytest.approx(m_eager["test_accuracy"], abs=0.1)


@pytest.mark.parametrize("recipe", ["reference", "fast"])  # Adam and Muon, both replayed from CUDA graphs
def test_deterministic_resume_after_sigkill_on_cuda(tmp_path, recipe):
    root = tmp_path / "synth"
    write_image_folder(root, 60, 10)
    env = {**os.environ, "CIFARLAB_CACHE": str(tmp_path / "cache")}
    base = [sys.executable, "-m", "cifarlab.cli", "train", "--recipe", recipe]
    # 20 epochs: a GPU runs these in well under a second each, so the kill below lands mid-run, not after it
    sets = ["--set", "widths=8,16,16", "--set", "batch_size=16", "--set", "epochs=20"]
    if recipe == "reference":
        sets += ["--set", "dense_width=32"]
    common = [*sets, "--set", f"dataset={root}", "--device", "cuda", "--no-report", "--deterministic"]
    full = subprocess.run([*base, *common, "--runs-dir", str(tmp_path / "a")], env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen([*base, *common, "--runs-dir", str(tmp_path / "b")], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list((tmp_path / "b").glob("*/checkpoint.pt")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_b,) = (tmp_path / "b").iterdir()
    assert json.loads((run_b / "status.json").read_text())["status"] == "running"  # killed, not finished
    assert load_checkpoint(run_b / "checkpoint.pt")["epoch"] < 20  # it really was interrupted
    resumed = subprocess.run(
        [sys.executable, "-m", "cifarlab.cli", "train", "--resume", str(run_b)], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    (run_a,) = (tmp_path / "a").iterdir()
    wa, wb = load_file(run_a / "model.safetensors"), load_file(run_b / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (run_a, run_b))
    assert ma["test_accuracy"] == mb["test_accuracy"] and ma["epochs_run"] == mb["epochs_run"]
    assert json.loads((run_b / "status.json").read_text())["status"] == "finished"


def test_cudnn_autotunes_unless_deterministic():
    from _synth import determinism_restored
    from cifarlab.experiment import prepare

    recipe = get_recipe("fast").replace(widths=(8, 16, 16), batch_size=16, epochs=1)
    was = torch.backends.cudnn.benchmark
    try:
        with determinism_restored():
            prepare(recipe, dataset=make_dataset(20, 5), device="cuda")
            assert torch.backends.cudnn.benchmark
            prepare(recipe, dataset=make_dataset(20, 5), device="cuda", deterministic=True)
            assert not torch.backends.cudnn.benchmark
            prepare(recipe.replace(cudnn_benchmark=False), dataset=make_dataset(20, 5), device="cuda")
            assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = was


def test_the_model_checks_do_not_time_cudnn_algorithms():
    """prepare()'s 2-image forwards (the output check, the smallest training size) run on cuDNN's heuristics; the
    training's timing is on afterwards."""
    from cifarlab.experiment import prepare

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)  # make_dataset's 4 classes

        def forward(self, x):
            seen.append(torch.backends.cudnn.benchmark)
            return self.conv(x).mean((2, 3))

    recipe = get_recipe("fast").replace(batch_size=16, epochs=1)
    was = torch.backends.cudnn.benchmark
    try:
        plan = prepare(recipe, dataset=make_dataset(20, 5), device="cuda", model=Probe())
        assert plan.model is not None and seen == [False, False]  # 32 x 32, then the 3/4-size first epoch
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = was


def test_inference_does_not_time_cudnn_algorithms_and_restores_the_setting():
    """Every new batch size would be timed afresh (a last partial batch, each serve request): inference on a GPU
    runs on cuDNN's heuristics, and training's setting comes back afterwards."""
    from cifarlab.inference import predict_logits

    seen = []

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 3)

        def forward(self, x):
            seen.append(torch.backends.cudnn.benchmark)
            return self.conv(x).mean((2, 3))

    was = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        out = predict_logits(Probe().cuda(), torch.zeros(5, 3, 8, 8, dtype=torch.uint8), batch_size=2)
        assert out.shape == (5, 2) and out.device.type == "cpu"
        assert seen == [False, False, False] and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = was


def test_a_model_that_reads_values_back_trains_op_by_op_after_a_failed_capture():
    """A forward with `.item()` cannot be captured: the real capture fails, nothing of it ran, and the run
    goes on op by op with every batch trained once."""

    class ReadsBack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.head = torch.nn.Linear(4, 5)

        def forward(self, x):
            x = self.conv(x).mean((2, 3))
            if x.abs().sum().item() > 1e9:  # a data-dependent branch: a host read inside the step
                x = x / 2
            return self.head(x)

    ds = make_dataset(20, 5)
    recipe = get_recipe("fast").replace(optimizer="sgd", batch_size=16, epochs=2, precision="fp32")
    loader = BatchLoader(ds.x_train, ds.y_train, 16, shuffle=True, seed=0, device="cuda", drop_last=True)
    trainer = Trainer(ReadsBack().cuda(), recipe, loader, device="cuda")
    result = trainer.fit()
    assert result.status == "finished" and trainer.step == 2 * len(loader)
    assert result.step_mode.startswith("eager (the step could not be captured as a CUDA graph")
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
