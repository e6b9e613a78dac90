"""Parameter counts and a Keras-style `summary()` table, so the reference model can be checked against Keras."""

from __future__ import annotations

import re

import torch
from torch import nn

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


def summary(model: nn.Module, input_shape: tuple[int, int, int] = (3, 32, 32)) -> str:
    """A Keras-style table: layer (type), output shape (NHWC, as Keras prints it), parameter count.

    Activations fused into the previous layer in Keras (Conv2D/Dense activation=...) are not listed.
    """
    rows: list[tuple[str, str, int]] = []
    seen: dict[str, int] = {}
    hooks = []

    def hook(mod: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
        kind = next((v for k, v in _KERAS_NAMES.items() if isinstance(mod, k)), type(mod).__name__)
        base = _snake(kind)
        i = seen.get(base, 0)
        seen[base] = i + 1
        name = base if i == 0 else f"{base}_{i}"
        shape = list(out.shape[1:])
        if len(shape) == 3:  # NCHW -> NHWC, Keras' layout
            shape = shape[1:] + shape[:1]
        n = sum(p.numel() for p in mod.parameters(recurse=False))
        n += sum(b.numel() for k, b in mod.named_buffers(recurse=False) if k in ("running_mean", "running_var"))
        rows.append((f"{name} ({kind})", "(None, " + ", ".join(map(str, shape)) + ")", n))

    for m in model.modules():
        if len(list(m.children())) == 0 and not isinstance(m, (nn.ReLU, nn.GELU)):
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
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
