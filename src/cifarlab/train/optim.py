"""Optimizers and LR schedules, each one registered function (`--set optimizer=NAME`, `--set schedule=NAME`).

An optimizer factory takes `(model, recipe)` and returns a `torch.optim.Optimizer`. A schedule factory takes
`(recipe, has_val)` and returns the callbacks that move the LR: a per-step `StepSchedule`, or Keras'
`ReduceLROnPlateau` driven by the validation loss.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from torch import nn
from torch.optim.sgd import sgd as sgd_update

from cifarlab.registry import OPTIMIZERS, SCHEDULES
from cifarlab.train.callbacks import Callback, ReduceLROnPlateau

__all__ = [
    "StepSchedule",
    "build_optimizer",
    "eager_optimizer",
    "Muon",
    "lr_multiplier",
    "mark_pretrained",
    "orthogonalize",
    "pretrained_names",
    "schedule_callbacks",
    "split_pretrained_groups",
    "step_with_device_lr",
    "supports_device_lr",
]

# model -> names of its parameters loaded from pretrained weights (`cifarlab.finetune`); weak, so a model that
# is dropped takes its entry with it, and no attribute is added to a user's module.
_PRETRAINED: weakref.WeakKeyDictionary[nn.Module, frozenset[str]] = weakref.WeakKeyDictionary()


# -- optimizers ---------------------------------------------------------------------------------------------

_O = TypeVar("_O", bound=torch.optim.Optimizer)


@functools.cache
def eager_optimizer(cls: type[_O]) -> type[_O]:
    """`cls` (a torch.optim optimizer class) without its torch.compile guards, which cost every process ~3 s.

    torch.optim wraps `step`, `zero_grad`, `add_param_group`, `state_dict` and `load_state_dict` in
    guards whose first call imports torch._dynamo (the compiler's front end: ~3 s on a 2-core CPU, half of a
    run's start-up) only to keep the compiler out of them. cifarlab never compiles an optimizer step, so
    the subclass calls torch's own code beneath those guards: the same arithmetic, state and hooks (step
    profiling and hooks are re-added by the Optimizer itself). Where a method is not wrapped (another torch
    version), `inspect.unwrap` returns it as it is and nothing changes but the import."""
    methods: dict[str, Any] = {
        name: inspect.unwrap(getattr(cls, name))
        for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict")
    }
    raw_step = inspect.unwrap(cls.step)

    def step(self: torch.optim.Optimizer, closure: Callable[[], Any] | None = None) -> Any:
        # What torch's guard does besides the import: no autograd graph for the update unless differentiable.
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            return raw_step(self, closure)

    methods["step"] = functools.wraps(raw_step)(step)
    return type(cls.__name__, (cls,), {**methods, "__module__": __name__, "__doc__": cls.__doc__})


@OPTIMIZERS.register("adam")
def adam(model: nn.Module, recipe: Any) -> torch.optim.Optimizer:
    """Adam with Keras' defaults (lr 1e-3, betas 0.9/0.999, epsilon 1e-7)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Keras Adam adds epsilon to sqrt(v) before bias correction, PyTorch after; with eps=1e-7 the two differ by
    # < 1e-7 relative, so torch's implementation is used.
    return eager_optimizer(torch.optim.Adam)(params, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps)


def _sgd_groups(model: nn.Module, recipe: Any, skip: frozenset[int] = frozenset()) -> list[dict[str, Any]]:
    """airbench's decoupled Nesterov-SGD param groups for the trainable parameters not in `skip` (by id)."""
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    # recipe.lr and weight_decay are per 1024 examples and independent of momentum; we use mean (not summed)
    # losses, hence the factor batch_size.
    scale = recipe.batch_size / (1024 * (1 + 1 / (1 - recipe.momentum)))
    lr = recipe.lr * scale
    decay = recipe.weight_decay * scale  # per-step shrink factor for every parameter
    # BatchNorm shifts get a much larger LR (bias_lr_scale) but the same per-step decay.
    trainable = {id(p) for p in params}
    norm = [p for n, p in model.named_parameters() if ".norm" in n and id(p) in trainable]
    norm_ids = {id(p) for p in norm}
    other = [p for p in params if id(p) not in norm_ids]
    groups = [
        {"params": norm, "lr": lr * recipe.bias_lr_scale, "weight_decay": decay / (lr * recipe.bias_lr_scale)},
        {"params": other, "lr": lr, "weight_decay": decay / lr},
    ]
    return [g for g in groups if g["params"]]


@OPTIMIZERS.register("sgd")
def sgd(model: nn.Module, recipe: Any) -> torch.optim.Optimizer:
    """Nesterov SGD in airbench's decoupled form (lr and weight decay per 1024 examples; BN shifts at a higher LR)."""
    groups = _sgd_groups(model, recipe)
    return eager_optimizer(torch.optim.SGD)(groups, momentum=recipe.momentum, nesterov=recipe.nesterov)


# Coefficients of the quintic Newton-Schulz iteration Muon uses (Jordan et al., 2024): chosen for a steep slope at
# zero, so 5 steps push every singular value into ~[0.7, 1.2] rather than converging exactly to 1.
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`g` (a matrix) with its singular values pushed towards 1: U V^T of its SVD, approximately, computed in
    `dtype` (bf16 where the run trains in bf16, as Muon does on GPUs: ~40% faster on a bf16 CPU)."""
    a, b, c = _NS_COEFFICIENTS
    x = g.to(dtype)
    x = x / (x.norm() + 1e-7)  # singular values <= 1, where the iteration converges
    wide = x.size(0) <= x.size(1)
    if not wide:
        x = x.T  # iterate on the smaller Gram matrix
    for _ in range(steps):
        gram = x @ x.T
        # a*x + (b*gram + c*gram@gram) @ x, in two fused multiply-adds (fewer passes over memory: ~20% less time)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Muon for the param groups marked `orthogonalize`, torch's Nesterov SGD (`torch.optim.sgd.sgd`) for the rest.

    A Muon step takes the Nesterov momentum of the gradient, flattens each filter bank to (out, in*k*k), replaces
    it by its orthogonalized form and steps by `lr` along it. As in airbench, each filter bank is first rescaled
    to a fixed norm (sqrt of its output channels): the nets it is meant for follow every conv with a
    normalization layer, which makes the filters' scale irrelevant, and a fixed scale keeps the step's relative
    size fixed (so Muon groups take no weight decay)."""

    def __init__(
        self,
        params: Any,
        lr: float,
        momentum: float,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_dtype: torch.dtype = torch.float32,
    ) -> None:
        # weight_decay: torch SGD's (added to the gradient); groups marked `orthogonalize` ignore it.
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "orthogonalize": False,
        }
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype  # of the orthogonalization only; the update itself is in the parameter's dtype

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                grads = [p.grad for p in params if p.grad is not None]  # all of them (the check is for mypy)
                if group["orthogonalize"]:
                    self._muon_step(group, params, grads)
                elif params:
                    buffers = [self.state[p].get("momentum_buffer") for p in params]
                    sgd_update(
                        params,
                        grads,
                        buffers,
                        weight_decay=group["weight_decay"],
                        momentum=group["momentum"],
                        lr=group["lr"],
                        dampening=0.0,
                        nesterov=group["nesterov"],
                        maximize=False,
                    )
                    if group["momentum"]:  # the buffers sgd created on a first step, kept as torch's SGD keeps them
                        for p, buf in zip(params, buffers):
                            self.state[p]["momentum_buffer"] = buf
        return loss

    def _muon_step(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        lr: float | torch.Tensor | None = None,
    ) -> None:
        # lr: the group's, or a 0-dim device tensor (`step_with_device_lr`: no host value, so a CUDA graph holds it)
        lr = group["lr"] if lr is None else lr
        momentum = group["momentum"]
        for p, g in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = g.clone()  # as torch SGD's first step: no momentum yet
            else:
                state["momentum_buffer"].mul_(momentum).add_(g)
            buf = state["momentum_buffer"]
            g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
            p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
            g = orthogonalize(g.reshape(len(g), -1), dtype=self.ns_dtype).view_as(p).to(p.dtype)
            if isinstance(lr, torch.Tensor):
                p.sub_(g.mul_(lr))
            else:
                p.add_(g, alpha=-lr)


def supports_device_lr(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `step_with_device_lr` can step this optimizer (Muon, torch's SGD and Adam; others step themselves)."""
    if isinstance(optimizer, Muon):
        return True
    groups = optimizer.param_groups
    if isinstance(optimizer, torch.optim.SGD):
        return not any(g.get("maximize") or g.get("dampening") for g in groups)
    if isinstance(optimizer, torch.optim.Adam) and not isinstance(optimizer, torch.optim.AdamW):
        return not any(g.get("maximize") or g.get("amsgrad") or g.get("fused") for g in groups)
    return False


@torch.no_grad()
def step_with_device_lr(optimizer: torch.optim.Optimizer, lrs: list[torch.Tensor]) -> None:
    """One step of a Muon, SGD or Adam optimizer with each group's LR read from a 0-dim tensor on the parameters'
    device: the same update as `optimizer.step()`, with no host value that changes from step to step and no
    host synchronisation, so a CUDA graph can capture it once and replay it with new LRs (`cifarlab.train.graphs`).
    Plain per-parameter ops: inside a graph their launches cost nothing, and a 0-dim device LR broadcasts there.
    """
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        grads = [p.grad for p in params if p.grad is not None]
        if group.get("orthogonalize"):
            assert isinstance(optimizer, Muon)
            optimizer._muon_step(group, params, grads, lr=lr)
            continue
        if group["weight_decay"]:  # torch's SGD and Adam both add it to the gradient
            grads = list(torch._foreach_add(grads, params, alpha=group["weight_decay"]))
        update = _adam_update if isinstance(optimizer, torch.optim.Adam) else _sgd_update
        for p, g in zip(params, grads):
            update(optimizer.state[p], group, p, g, lr)


def _sgd_update(
    state: dict[str, Any], group: dict[str, Any], p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor
) -> None:
    """torch.optim.sgd's update (momentum, Nesterov; no dampening) with a tensor LR (torch's own foreach SGD
    reads a tensor LR back to the host)."""
    momentum = group["momentum"]
    if momentum:
        buf = state.get("momentum_buffer")
        if buf is None:  # torch's first step: the buffer starts as the gradient
            buf = state["momentum_buffer"] = g.detach().clone()
        else:
            buf.mul_(momentum).add_(g)
        g = g.add(buf, alpha=momentum) if group["nesterov"] else buf
    p.sub_(g * lr)


def _adam_update(
    state: dict[str, Any], group: dict[str, Any], p: torch.Tensor, g: torch.Tensor, lr: torch.Tensor
) -> None:
    """torch.optim.adam's update (no amsgrad) with a tensor LR and the step count kept as a tensor on the
    parameter's device, as torch's capturable Adam keeps it: the bias corrections are computed there, so nothing
    is read back. The state has torch's names and shapes, so a checkpoint taken either way resumes the other way."""
    beta1, beta2 = group["betas"]
    if not state:  # torch's first step: zero moments
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    elif state["step"].device != p.device:  # torch keeps it on the CPU; a checkpoint is read there
        state["step"] = state["step"].to(p.device, torch.float32)
    step, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
    step.add_(1)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    # The bias corrections in float64, as torch computes them on the host: in float32, 1 - 0.999**1 is 1.3e-5
    # off (torch's own capturable Adam has that error).
    t = step.double()
    bias_correction2_sqrt = (1 - beta2**t).sqrt()
    denom = (v.sqrt() / bias_correction2_sqrt).add_(group["eps"])
    p.sub_(m / denom * (lr / (1 - beta1**t)))


@OPTIMIZERS.register("muon")
def muon(model: nn.Module, recipe: Any) -> torch.optim.Optimizer:
    """Muon for the conv filters (airbench94_muon's split), `sgd`'s groups and LRs for everything else.

    Filters: the trainable 4-D weights, stepped at `muon_lr` with `muon_momentum`. The LR schedule scales both."""
    filters = [p for p in model.parameters() if p.requires_grad and p.dim() == 4]
    groups = _sgd_groups(model, recipe, skip=frozenset(id(p) for p in filters))
    if filters:
        # First, so that the LR the trainer reports (the last group's) stays the SGD one, comparable with `sgd`.
        groups.insert(
            0,
            {"params": filters, "lr": recipe.muon_lr, "momentum": recipe.muon_momentum, "orthogonalize": True},
        )
    from cifarlab.device import autocast_dtype, model_device

    # Orthogonalize in bf16 where the run trains in bf16 (a CPU with native bf16, a GPU), else in fp32.
    bf16 = autocast_dtype(recipe.precision, model_device(model)) == torch.bfloat16
    return eager_optimizer(Muon)(
        groups,
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        ns_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


def mark_pretrained(model: nn.Module, names: Iterable[str]) -> None:
    """Remember which of `model`'s parameters hold pretrained weights (for `pretrained_lr_scale`)."""
    _PRETRAINED[model] = frozenset(names)


def pretrained_names(model: nn.Module) -> frozenset[str]:
    return _PRETRAINED.get(model, frozenset())


def split_pretrained_groups(optimizer: torch.optim.Optimizer, model: nn.Module, scale: float) -> None:
    """Move the pretrained parameters of every param group into a copy of that group with `scale` x its LR.

    The pretrained groups come first, so the last group (whose LR `Trainer.get_lr` reports) stays one of
    the new layers' when there are any. Schedules scale every group's LR by the same factor, so the ratio
    holds all run long. Called before the first step: the optimizer has no state to move yet."""
    names = pretrained_names(model)
    ids = {id(p) for n, p in model.named_parameters() if n in names}
    if not ids or scale == 1.0:
        return
    pretrained, new = [], []
    for g in optimizer.param_groups:
        options = {k: v for k, v in g.items() if k != "params"}
        old = [p for p in g["params"] if id(p) in ids]
        rest = [p for p in g["params"] if id(p) not in ids]
        if old:
            pretrained.append({**options, "params": old, "lr": g["lr"] * scale})
        if rest:
            new.append({**options, "params": rest})
    optimizer.param_groups.clear()
    for group in pretrained + new:
        optimizer.add_param_group(group)


def build_optimizer(model: nn.Module, recipe: Any) -> torch.optim.Optimizer:
    """The recipe's optimizer; with `pretrained_lr_scale` != 1, loaded weights get their own param groups."""
    optimizer = OPTIMIZERS.build(recipe.optimizer, model, recipe)
    if not isinstance(optimizer, torch.optim.Optimizer):  # the trainer steps it, checkpoints its state
        raise OPTIMIZERS.wrong_return(
            recipe.optimizer, optimizer, "a torch.optim.Optimizer over the model's parameters"
        )
    split_pretrained_groups(optimizer, model, getattr(recipe, "pretrained_lr_scale", 1.0))
    return optimizer


# -- schedules ----------------------------------------------------------------------------------------------


class StepSchedule(Callback):
    """Sets every param group's LR to its base LR times `multiplier(step, total_steps)` before each step."""

    def __init__(self, multiplier: Callable[[int, int], float]) -> None:
        self.multiplier = multiplier

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        t = self.trainer
        m = self.multiplier(t.step, t.total_steps)
        for g, base in zip(t.optimizer.param_groups, t.base_lrs):
            g["lr"] = base * m


def lr_multiplier(recipe: Any, step: int, total_steps: int) -> float:
    """Per-step LR multiplier for the 'onecycle' schedule (piecewise linear: start -> 1 -> final)."""
    if recipe.schedule != "onecycle":
        return 1.0
    peak = int(recipe.warmup_fraction * total_steps)
    if step < peak:
        frac = step / max(1, peak)
        return recipe.start_lr_fraction + (1 - recipe.start_lr_fraction) * frac
    frac = (step - peak) / max(1, total_steps - peak)
    return 1 + (recipe.final_lr_fraction - 1) * min(1.0, frac)


@SCHEDULES.register("plateau")
def plateau(recipe: Any, has_val: bool) -> list[Callback]:
    """Keras ReduceLROnPlateau: multiply the LR by plateau_factor when the monitored value stops improving."""
    if recipe.monitor.startswith("val_") and not has_val:
        return []
    return [
        ReduceLROnPlateau(
            monitor=recipe.monitor,
            factor=recipe.plateau_factor,
            patience=recipe.plateau_patience,
            min_delta=recipe.plateau_min_delta,
            cooldown=recipe.plateau_cooldown,
            min_lr=recipe.plateau_min_lr,
        )
    ]


@SCHEDULES.register("onecycle")
def onecycle(recipe: Any, has_val: bool) -> list[Callback]:
    """Per step: linear warmup from start_lr_fraction to the peak, then linear decay to final_lr_fraction."""
    return [StepSchedule(lambda step, total: lr_multiplier(recipe, step, total))]


def schedule_callbacks(recipe: Any, has_val: bool) -> list[Callback]:
    """The callbacks of the recipe's LR schedule (an entry of `cifarlab.registry.SCHEDULES`)."""
    cbs = SCHEDULES.build(recipe.schedule, recipe, has_val)
    if not isinstance(cbs, (list, tuple)) or not all(isinstance(cb, Callback) for cb in cbs):
        one = isinstance(cbs, Callback)
        raise SCHEDULES.wrong_return(
            recipe.schedule,
            cbs,
            "a list of Callback instances" + (f" (one in a list: [{type(cbs).__name__}(...)])" if one else ""),
        )
    return list(cbs)
