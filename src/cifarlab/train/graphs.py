"""The training step as one CUDA graph (recipe key `cuda_graph`, on by default; GPUs only).

On a GPU a small network's step is a few hundred small kernels (forward, backward, and Muon's per-filter
orthogonalization), and launching them from Python costs more than running them: op by op, `fast` on an H200
took ~20 ms per step; replayed from a graph, 2.06 ms, the GPU busy 72% of it (benchmarks/RESULTS.md, session 12).
The whole step (forward, loss, backward, optimizer step) is captured once and replayed: the loop copies the
batch into the graph's input and the step's learning rates into device tensors, then launches the graph.

What a graph cannot follow is refused when training starts (`unsupported_reason`), and the step runs eagerly
as before: a CPU, torchrun (DDP), fp16's gradient scaler (it reads the scale back to the host), optimizers
other than Muon, SGD and Adam (whose steps read a Python LR), DropBlock (its drop rate changes in Python every step),
and Python hooks on the model's modules (a replay runs no Python; hooks added after training started are not
seen). A step that fails to capture (a forward that reads a value back to the host) runs op by op from then
on, with a warning. A forward whose Python branches on something other than tensors (a random draw, a counter)
is captured with the branch it took: set `cuda_graph=false` for such a model. Callbacks run as ever, between
steps. A new input shape (the first epoch at a smaller scale) or a change of which parameters train (the
whitening bias frozen after its epochs) is captured anew, after `WARMUP` eager steps of the same code; the
warm-up steps and the replays compute the same kernels, so a run stays deterministic where the eager step was.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.device import autocast
from cifarlab.models.dropblock import DropBlock2d
from cifarlab.train.optim import step_with_device_lr, supports_device_lr

__all__ = ["GraphCaptureError", "GraphedStep", "unsupported_reason"]

WARMUP = 2  # eager steps before each capture: lazy initialisations (cuBLAS, cuDNN autotuning, optimizer state)


class GraphCaptureError(RuntimeError):
    """The step could not be captured (its message says why); nothing of it ran."""


def unsupported_reason(trainer: Any) -> str | None:
    """Why the trainer's step cannot be a CUDA graph, or None when it can."""
    if trainer.device.type != "cuda":
        return "not a GPU"
    if not getattr(trainer.recipe, "cuda_graph", False):
        return "cuda_graph=false"
    if trainer.dist is not None:
        return "torchrun (DistributedDataParallel)"
    if trainer.scaler is not None:
        return "fp16's gradient scaler"
    if not supports_device_lr(trainer.optimizer):
        return f"optimizer {type(trainer.optimizer).__name__} (Muon, SGD and Adam only)"
    modules = list(trainer.model.modules())
    if any(isinstance(m, DropBlock2d) for m in modules):
        return "DropBlock (its rate changes every step)"
    if any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks for m in modules):
        return "hooks on the model (a replay runs no Python)"
    return None


@dataclass
class _Captured:
    """One captured step: the graph, its input buffers (copied into before each replay) and its outputs."""

    graph: torch.cuda.CUDAGraph
    static: tuple[torch.Tensor, torch.Tensor]
    out: tuple[torch.Tensor, torch.Tensor]


class GraphedStep:
    """Forward, loss, backward and optimizer step of `trainer`, replayed from a CUDA graph.

    A graph is kept per step shape (input size, trained parameters, train/eval modes) while only the batch size
    varies: a recipe whose epochs end with a smaller last batch replays its graph again at the next epoch, and
    the last batch gets its own once it has been warmed up. A change of image size or of the trained parameters
    does not go back, so the graphs of the old shape are dropped (each graph holds its own memory: its
    activations and gradients)."""

    MAX_GRAPHS = 2

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.lrs = [torch.zeros((), device=trainer.device) for _ in trainer.optimizer.param_groups]
        self.stream = torch.cuda.Stream(trainer.device)
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.warm: dict[tuple, int] = {}
        self.captures = 0

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step itself: the same code warms up eagerly and is captured."""
        t = self.trainer
        # No autocast weight cache: cached bf16 copies made during capture would be freed after it.
        with autocast(t.device, t.dtype, cache_enabled=False):
            logits = t.model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=t.recipe.label_smoothing) + t.l2_term()
        loss.backward()
        step_with_device_lr(t.optimizer, self.lrs)
        return loss.detach(), logits.detach()

    def _key(self, x: torch.Tensor, model: nn.Module) -> tuple:
        trainable = tuple(i for i, p in enumerate(model.parameters()) if p.requires_grad)
        modes = tuple(m.training for m in model.modules())
        return (tuple(x.shape), x.stride(), x.dtype, trainable, modes)

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A warm-up step: eagerly, on a side stream, as PyTorch's capture recipe does before capturing."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.trainer.optimizer.zero_grad(set_to_none=True)
            out = self._step(x, y)
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def _capture(self, key: tuple, x: torch.Tensor, y: torch.Tensor) -> _Captured:
        t = self.trainer
        static = (x.clone(), y.clone())
        # Gradients allocated inside the capture: each replay writes them afresh, nothing zeroes them. (Each graph
        # has its own; `p.grad` shows the last captured one's.)
        t.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                out = self._step(*static)
        except RuntimeError as e:  # e.g. a forward that reads a tensor back (.item(), a data-dependent branch)
            torch.cuda.set_stream(stream)  # where the capture's end failed, its stream would stay the current one
            t.optimizer.zero_grad(set_to_none=True)  # the capture's gradients were never computed
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GraphCaptureError(f"the step could not be captured as a CUDA graph ({first})") from e
        self.captures += 1
        # A graph that differs in more than its batch size (another image size, other trained parameters) does
        # not come back: its memory goes now. Of the rest, the most recently replayed are kept.
        for old in [k for k in self.graphs if k[0][1:] != key[0][1:] or k[1:] != key[1:]]:
            del self.graphs[old]
        while len(self.graphs) >= self.MAX_GRAPHS:
            self.graphs.popitem(last=False)
        self.graphs[key] = captured = _Captured(graph, static, out)
        return captured

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on (x, y); returns the step's loss (a copy) and logits (valid until the next step)."""
        t = self.trainer
        for lr, group in zip(self.lrs, t.optimizer.param_groups, strict=True):
            lr.fill_(group["lr"])  # a kernel argument: no host synchronisation
        key = self._key(x, t.model)
        captured = self.graphs.get(key)
        if captured is None:
            if self.warm.get(key, 0) < WARMUP:
                self.warm[key] = self.warm.get(key, 0) + 1
                return self._eager(x, y)
            captured = self._capture(key, x, y)  # holds (x, y) already
        else:
            self.graphs.move_to_end(key)
            captured.static[0].copy_(x)
            captured.static[1].copy_(y)
        captured.graph.replay()
        return captured.out[0].clone(), captured.out[1]

    @property
    def steps_before_replay(self) -> int:
        """The warm-up steps and the capture, before the first replay of a new step shape."""
        return WARMUP + 1

    def describe(self) -> str:
        return f"CUDA graph ({self.captures} capture{'s' if self.captures != 1 else ''})"
