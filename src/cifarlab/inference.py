"""Devices, precision and batched inference (eval mode, no grad, bf16/channels_last where it helps, TTA)."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 / AMX on x86, BF16 on Arm).

    Without them bf16 autocast is emulated and slower than fp32, so 'auto' falls back to fp32.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return platform.machine() == "arm64"  # Apple silicon has bf16
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16", " bf16"))


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a recipe's precision on a device; None means plain fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16":
            return torch.float16
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if precision == "fp16":
        raise ValueError("precision='fp16' is only supported on CUDA; use 'bf16' or 'fp32' on a CPU")
    if precision == "bf16" or cpu_has_bf16():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_threads(n: int | None = None) -> int:
    """Use one thread per core we may run on: oversubscription costs more than it gains on 2 cores."""
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def to_float(
    x: torch.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float in [0,1], then (x - mean) / std per channel when given."""
    from cifarlab.data import scale_images, scaling_constants

    x = x.to(device, non_blocking=True).float()
    x = scale_images(x, *scaling_constants(mean, std, x.shape[1], x.device, x.dtype))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def tta_views(x: torch.Tensor, tta: str) -> Iterator[tuple[float, torch.Tensor]]:
    """(weight, view) pairs whose weighted logits average is the TTA prediction.

    flip: the image and its mirror, 1/2 each. flip_translate: that, at half weight, plus the mirror pair of
    the image shifted one pixel up-left and one pixel down-right (reflect padding), 1/8 each.
    """
    if tta == "none":
        yield 1.0, x
        return
    w = 0.5 if tta == "flip" else 0.25
    yield w, x
    yield w, x.flip(-1)
    if tta == "flip_translate":
        h, wd = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        for view in (padded[..., 0:h, 0:wd], padded[..., 2 : h + 2, 2 : wd + 2]):
            yield 0.125, view
            yield 0.125, view.flip(-1)
    elif tta != "flip":
        raise ValueError(f"unknown tta {tta!r}; use none, flip or flip_translate")


def recipe_options(recipe) -> dict:
    """The inference settings a recipe evaluates with: the same for training's test pass, `evaluate`, `predict`."""
    return {
        "tta": recipe.tta,
        "batch_size": recipe.eval_batch_size,
        "precision": recipe.precision,
        "channels_last": recipe.channels_last,
    }


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    x: torch.Tensor,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    tta: str = "none",
    batch_size: int = 1000,
    device: torch.device | str | None = None,
    precision: str = "auto",
    channels_last: bool = True,
) -> torch.Tensor:
    """Logits (float32, on the CPU) for uint8 images (N,3,H,W), in eval mode, batched."""
    device = resolve_device(str(device) if device is not None else None)
    dtype = autocast_dtype(precision, device)
    was_training = model.training
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    try:
        for i in range(0, len(x), batch_size):
            xb = to_float(x[i : i + batch_size], mean, std, device, channels_last)
            acc = None
            with autocast(device, dtype):
                for w, view in tta_views(xb, tta):
                    logits = model(view.contiguous(memory_format=fmt)).float() * w
                    acc = logits if acc is None else acc + logits
            out.append(acc.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def predict_proba(model: nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
    """Softmax probabilities (the reference's output layer) for uint8 images."""
    return torch.softmax(predict_logits(model, x, **kw), dim=1)
