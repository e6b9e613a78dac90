"""The parts of the CUDA-graph training step a CPU can check: the optimizer step with device-tensor learning
rates (what the graph captures) updates as the optimizer's own step does, and the trainer says when and why
its step stays eager. The capture itself is checked by tests/test_gpu.py on a GPU."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
from torch import nn

from _synth import make_dataset
from cifarlab.data import BatchLoader
from cifarlab.experiment import run_experiment
from cifarlab.models import build_model
from cifarlab.models.dropblock import DropBlock2d
from cifarlab.recipes import get_recipe
from cifarlab.train import Trainer
from cifarlab.train.graphs import unsupported_reason
from cifarlab.train.optim import Muon, build_optimizer, step_with_device_lr, supports_device_lr
from cifarlab.train.techniques import recipe_callbacks


def _model() -> nn.Module:
    torch.manual_seed(0)
    # BatchNorm after the ReLU: a conv bias right before a BatchNorm has a gradient of pure rounding noise, which
    # Adam's normalization would turn into LR-sized steps of noise
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
    )


def _run(optimizer_name: str, device_lr: bool, steps: int = 6) -> tuple[nn.Module, torch.optim.Optimizer]:
    """`steps` steps of a recipe's optimizer with an LR that changes every step, one layer frozen midway (Adam
    with the reference's settings, SGD and Muon with fast's)."""
    model = _model()
    base_recipe = "reference" if optimizer_name == "adam" else "fast"
    # fp32: Muon orthogonalizes in bf16 where the run trains in bf16, and bf16's rounding would turn the last-bit
    # difference of the two updates into percent-sized ones by the next step
    recipe = get_recipe(base_recipe).replace(optimizer=optimizer_name, batch_size=8, precision="fp32")
    opt = build_optimizer(model, recipe)
    base = [g["lr"] for g in opt.param_groups]
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for group, lr in zip(opt.param_groups, base):
            group["lr"] = lr * (1 + step) / steps
        if step == steps // 2:
            model[0].bias.requires_grad_(False)  # a parameter without a gradient is skipped, as torch skips it
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y, label_smoothing=0.2).backward()
        if device_lr:
            step_with_device_lr(opt, [torch.tensor(group["lr"]) for group in opt.param_groups])
        else:
            opt.step()
    return model, opt


@pytest.mark.parametrize("optimizer_name", ["sgd", "muon", "adam"])
def test_device_lr_step_updates_as_the_optimizer_does(optimizer_name):
    ref_model, ref_opt = _run(optimizer_name, device_lr=False)
    model, opt = _run(optimizer_name, device_lr=True)
    assert supports_device_lr(opt)
    assert isinstance(opt, Muon) == (optimizer_name == "muon")
    # lr * update instead of an alpha=-lr fused add: equal to rounding, over steps that move every weight
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    moved = _model().state_dict()
    assert all(not torch.equal(moved[k], v) for k, v in model.state_dict().items() if v.is_floating_point())
    # the same state (momentum buffers; Adam's moments and step count), so a checkpoint taken in either mode
    # resumes in the other
    for p, q in zip(ref_model.parameters(), model.parameters()):
        a, b = ref_opt.state[p], opt.state[q]
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    if optimizer_name == "adam":  # and the update moved: lr 1e-3 over 6 steps
        assert all(float(s["step"]) in (3.0, 6.0) for s in opt.state.values())


def test_other_optimizers_have_no_device_lr_step():
    params = list(_model().parameters())
    assert not supports_device_lr(torch.optim.RMSprop(params))
    assert not supports_device_lr(torch.optim.AdamW(params))  # a subclass of Adam with its own update
    assert not supports_device_lr(torch.optim.Adam(params, amsgrad=True))


def _trainer(recipe_name: str = "fast", **changes) -> Trainer:
    ds = make_dataset(16, 5)
    recipe = get_recipe(recipe_name).replace(widths=(8, 16, 16), batch_size=8, epochs=1, **changes)
    model = build_model(recipe, len(ds.classes))
    return Trainer(model, recipe, BatchLoader(ds.x_train, ds.y_train, 8, shuffle=True, seed=0))


def test_the_step_says_why_it_is_not_a_cuda_graph():
    assert unsupported_reason(_trainer()) == "not a GPU"
    cases = [
        (_trainer(cuda_graph=False), "cuda_graph=false"),
        (_trainer("reference", dense_width=16), None),  # Adam
        (_trainer(), None),
    ]
    rmsprop = _trainer()
    rmsprop.optimizer = torch.optim.RMSprop(rmsprop.model.parameters())
    cases.append((rmsprop, "optimizer RMSprop (Muon, SGD and Adam only)"))
    for trainer, reason in cases:
        trainer.device = torch.device("cuda")  # only the decision: nothing runs on it
        assert unsupported_reason(trainer) == reason
    trainer = _trainer()
    trainer.device = torch.device("cuda")
    trainer.model.add_module("extra", DropBlock2d(3, 0.1))
    assert unsupported_reason(trainer) == "DropBlock (its rate changes every step)"
    trainer.dist = object()
    assert unsupported_reason(trainer) == "torchrun (DistributedDataParallel)"


def test_a_run_records_how_its_step_ran(tmp_path):
    recipe = get_recipe("fast").replace(widths=(8, 16, 16), batch_size=8, epochs=1)
    res = run_experiment(
        recipe, dataset=make_dataset(16, 5), runs_root=tmp_path, quiet=True, report=False, device="cpu"
    )
    assert res.metrics["training_step"] == "eager (not a GPU)"
    t = res.metrics["timings"]  # and how long it took from the process's start (here: pytest's) to its accuracy
    assert t["process_seconds"] >= t["total_seconds"] > 0


class _StandInGraph:
    """A CPU stand-in for torch.cuda.CUDAGraph with its semantics: capturing runs nothing on a GPU (here the
    capture runs the step once, so the first replay is skipped), a replay reruns the captured step on the static
    inputs, writing its static outputs in place, with the gradients it allocated written afresh."""

    owner: Any = None

    def __init__(self) -> None:
        self.fresh = True

    def replay(self) -> None:
        if self.fresh:
            self.fresh = False
            return
        step = self.owner
        captured = next(c for c in step.graphs.values() if c.graph is self)
        step.trainer.optimizer.zero_grad(set_to_none=True)
        loss, logits = step._step(*captured.static)
        captured.out[0].copy_(loss)
        captured.out[1].copy_(logits)


class _Stream:
    def wait_stream(self, other: Any) -> None:
        pass


def _failing_capture(g: Any, **kw: Any) -> Any:
    raise RuntimeError("operation not permitted when stream is capturing\nmore detail")


def _fit_tiny_fast(
    monkeypatch,
    graphed: bool,
    device: str = "cpu",
    capture_fails: bool = False,
    drop_last: bool = True,
    **changes: Any,
) -> tuple[Trainer, dict]:
    """A tiny `fast` (fp32), by default 3 epochs of 6 steps: the first at 3/4 size with the whitening bias
    trained, then full size with it frozen. Both runs step with device-tensor LRs, so only the graph differs: on
    the CPU a stand-in graph, on a GPU a real one."""
    ds = make_dataset(24, 5)
    recipe = get_recipe("fast").replace(
        **{"widths": (8, 16, 16), "batch_size": 16, "epochs": 3, "precision": "fp32", **changes},
        cuda_graph=graphed,
    )
    torch.manual_seed(0)
    model = build_model(recipe, len(ds.classes)).to(device, memory_format=torch.channels_last)
    loader = BatchLoader(
        ds.x_train,
        ds.y_train,
        recipe.batch_size,
        shuffle=True,
        seed=0,
        drop_last=drop_last,
        channels_last=True,
        scales=recipe.train_scales,
        device=device,
    )
    with monkeypatch.context() as m:
        if graphed and device == "cpu":
            import cifarlab.train.graphs as graphs
            import cifarlab.train.loop as loop

            m.setattr(loop, "unsupported_reason", lambda trainer: None)
            m.setattr(torch.cuda, "Stream", lambda device: _Stream())
            m.setattr(torch.cuda, "current_stream", lambda: _Stream())
            m.setattr(torch.cuda, "set_stream", lambda s: None)
            m.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
            m.setattr(torch.cuda, "CUDAGraph", _StandInGraph)
            m.setattr(
                torch.cuda, "graph", _failing_capture if capture_fails else lambda g, **kw: contextlib.nullcontext()
            )
            init = graphs.GraphedStep.__init__

            def remember(self: Any, trainer: Any) -> None:
                init(self, trainer)
                _StandInGraph.owner = self

            m.setattr(graphs.GraphedStep, "__init__", remember)
        trainer = Trainer(model, recipe, loader, callbacks=recipe_callbacks(recipe, False), device=device)
        if not graphed:
            opt = trainer.optimizer
            lrs = lambda: [torch.tensor(g["lr"], device=device) for g in opt.param_groups]  # noqa: E731
            m.setattr(opt, "step", lambda: step_with_device_lr(opt, lrs()))
        trainer.fit()
    return trainer, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_graph_bookkeeping_warms_up_captures_and_replays_each_step_once(monkeypatch):
    """The sequence a CUDA graph needs, checked on the CPU with a stand-in graph: two eager warm-up steps per
    new step shape, a capture, then replays on the static inputs; a 3/4-size first epoch with the whitening
    bias trained, then full size with it frozen, is two captures; every batch trains once."""
    graphed, w_graph = _fit_tiny_fast(monkeypatch, graphed=True)
    eager, w_eager = _fit_tiny_fast(monkeypatch, graphed=False)
    assert graphed.step_mode == "CUDA graph (2 captures)"
    assert eager.step_mode == "eager (not a GPU)"
    assert graphed.step == eager.step == 18
    assert (graphed.warmup_steps, eager.warmup_steps) == (3, 1)  # what the --budget probe leaves out of its timing
    assert graphed._graph is not None and len(graphed._graph.graphs) == 1  # epoch 1's shape does not come back
    for k, v in w_eager.items():
        torch.testing.assert_close(w_graph[k], v, rtol=1e-6, atol=1e-7, msg=k)
    for a, b in zip(graphed.history, eager.history):  # the loss and accuracy the loop read from each step
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["accuracy"] == b["accuracy"]


def test_a_smaller_last_batch_gets_its_own_graph_and_the_full_one_is_kept(monkeypatch):
    """4 epochs of 4 batches of 20 and a last one of 16 (96 images, drop_last off), one image size: the full
    batches warm up twice and are captured once, in epoch 1; the last batch warms up in epochs 1 and 2 and is
    captured in epoch 3; nothing is captured again."""
    kw = dict(drop_last=False, batch_size=20, epochs=4, train_scales=(), whiten_bias_epochs=0.0)
    graphed, w_graph = _fit_tiny_fast(monkeypatch, graphed=True, **kw)
    eager, w_eager = _fit_tiny_fast(monkeypatch, graphed=False, **kw)
    assert graphed.step_mode == "CUDA graph (2 captures)" and graphed.step == eager.step == 20
    assert graphed._graph is not None and len(graphed._graph.graphs) == 2  # batches of 20 and of 16
    for k, v in w_eager.items():
        torch.testing.assert_close(w_graph[k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert [a["loss"] for a in graphed.history] == pytest.approx([b["loss"] for b in eager.history], rel=1e-6)


def test_a_step_that_cannot_be_captured_trains_on_op_by_op(monkeypatch, caplog):
    """A failed capture (on a GPU: a forward that reads a value back) ran nothing: that batch and the rest train
    op by op, and the run says why."""
    trainer, _ = _fit_tiny_fast(monkeypatch, graphed=True, capture_fails=True)
    assert trainer.step == 18 and len(trainer.history) == 3  # every batch trained once, none lost or repeated
    assert trainer.step_mode == (
        "eager (the step could not be captured as a CUDA graph (operation not permitted when stream is capturing))"
    )
    assert "it runs op by op from now on" in caplog.text
    assert trainer.history[-1]["loss"] < trainer.history[0]["loss"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_compute_what_the_eager_step_computes(monkeypatch):
    """The real CUDA graph against the same step run op by op, with cuDNN's choice of algorithms fixed."""
    was = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        graphed, w_graph = _fit_tiny_fast(monkeypatch, graphed=True, device="cuda")
        eager, w_eager = _fit_tiny_fast(monkeypatch, graphed=False, device="cuda")
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = was
    assert graphed.step_mode == "CUDA graph (2 captures)"
    assert eager.step_mode == "eager (cuda_graph=false)"
    for k, v in w_eager.items():
        torch.testing.assert_close(w_graph[k], v, rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(graphed.history, eager.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["accuracy"] == b["accuracy"]
