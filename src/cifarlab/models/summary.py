"""Parameter counts and a Keras-style `summary()` table, so the reference model can be checked against Keras."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["count_parameters", "summary"]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Keras' counts: trainable params; non-trainable = frozen params + BN moving mean/variance."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    stats = sum(b.numel() for n, b in model.named_buffers() if n.endswith(("running_mean", "running_var")))
    return {"total": trainable + frozen + stats, "trainable": trainable, "non_trainable": frozen + stats}


_KERAS_NAMES = {
    nn.Conv2d: "Conv2D",
    nn.Linear: "Dense",
    nn.BatchNorm1d: "BatchNormalization",
    nn.BatchNorm2d: "BatchNormalization",
    nn.MaxPool2d: "MaxPooling2D",
    nn.Dropout: "Dropout",
    nn.Flatten: "Flatten",
}


def _snake(kind: str) -> str:
    """CamelCase -> snake_case as Keras names layers, an underscore only before a capitalized word, so acronyms
    stay whole: Conv2D -> conv2d, MaxPooling2D -> max_pooling2d, SiLU -> silu, GELU -> gelu."""
    return re.sub(r"(?<=[A-Za-z0-9])(?=[A-Z][a-z])", "_", kind).lower()


# Pooling done with functions in a model's forward (airnet's F.max_pool2d and torch.amax, the ResNets'
# x.mean((2, 3))): no module, so no forward hook sees it; `_FunctionalPools` lists it as Keras would.
_POOL_FUNCTIONS = {"max_pool2d": "MaxPooling2D", "avg_pool2d": "AveragePooling2D"}
_GLOBAL_POOLS = {"amax": "GlobalMaxPooling2D", "mean": "GlobalAveragePooling2D"}


def _global_pool_dims(args: tuple, kwargs: dict) -> bool:
    """Whether amax/mean reduces a 4-d tensor over both spatial dims to (N, C) (keepdim: a squeeze-excite's
    mean, not a layer)."""
    x = args[0] if args else kwargs.get("input")
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or keep or not isinstance(dim, (tuple, list)):
        return False
    return sorted(d % 4 for d in dim) == [2, 3]


class _FunctionalPools(TorchFunctionMode):
    """Calls `record(kind, output)` for each pooling function called outside a hooked leaf module."""

    def __init__(self, record: Callable[[str, torch.Tensor], None], in_leaf: list[int]) -> None:
        super().__init__()
        self.record = record
        self.in_leaf = in_leaf

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.in_leaf[0] == 0 and isinstance(out, torch.Tensor):
            name = getattr(func, "__name__", "")
            if name in _POOL_FUNCTIONS:
                self.record(_POOL_FUNCTIONS[name], out)
            elif name in _GLOBAL_POOLS and _global_pool_dims(args, kwargs):
                self.record(_GLOBAL_POOLS[name], out)
        return out


def summary(model: nn.Module, input_shape: tuple[int, int, int] = (3, 32, 32)) -> str:
    """A Keras-style table: layer (type), output shape (NHWC, as Keras prints it), parameter count.

    Activations fused into the previous layer in Keras (Conv2D/Dense activation=...) are not listed. Pooling
    done with functions in `forward` (F.max_pool2d, a global max or mean over H and W) is listed as Keras'
    MaxPooling2D / AveragePooling2D / GlobalMaxPooling2D / GlobalAveragePooling2D (0 parameters).
    """
    rows: list[tuple[str, str, int]] = []
    seen: dict[str, int] = {}
    hooks = []
    in_leaf = [0]

    def add_row(kind: str, out: torch.Tensor, n: int) -> None:
        base = _snake(kind)
        i = seen.get(base, 0)
        seen[base] = i + 1
        name = base if i == 0 else f"{base}_{i}"
        shape = list(out.shape[1:])
        if len(shape) == 3:  # NCHW -> NHWC, Keras' layout
            shape = shape[1:] + shape[:1]
        rows.append((f"{name} ({kind})", "(None, " + ", ".join(map(str, shape)) + ")", n))

    def pre_hook(_mod: nn.Module, _inp: tuple) -> None:
        in_leaf[0] += 1

    def hook(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        in_leaf[0] -= 1
        kind = next((v for k, v in _KERAS_NAMES.items() if isinstance(mod, k)), type(mod).__name__)
        n = sum(p.numel() for p in mod.parameters(recurse=False))
        n += sum(b.numel() for k, b in mod.named_buffers(recurse=False) if k in ("running_mean", "running_var"))
        add_row(kind, out, n)

    for m in model.modules():
        if len(list(m.children())) == 0 and not isinstance(m, (nn.ReLU, nn.GELU)):
            hooks.append(m.register_forward_pre_hook(pre_hook))
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _FunctionalPools(lambda kind, out: add_row(kind, out, 0), in_leaf):
            model(torch.zeros(2, *input_shape))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    counts = count_parameters(model)
    w0 = max(32, max(len(r[0]) for r in rows) + 2)
    line = "━" * (w0 + 40)
    out = [
        f'Model: "{type(model).__name__}"',
        line,
        f"{'Layer (type)':<{w0}}{'Output Shape':<26}{'Param #':>14}",
        line,
    ]
    for name, shape, n in rows:
        out.append(f"{name:<{w0}}{shape:<26}{n:>14,}")
    out += [
        line,
        f" Total params: {counts['total']:,}",
        f" Trainable params: {counts['trainable']:,}",
        f" Non-trainable params: {counts['non_trainable']:,}",
    ]
    return "\n".join(out)
