"""Batched inference: eval mode, no grad, bf16/channels_last where it helps, test-time augmentation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.data import scale_images, scaling_constants
from cifarlab.device import (  # noqa: F401
    autocast,
    autocast_dtype,
    model_device,
    resolve_device,
    set_threads,
    without_cudnn_timing,
)


def to_float(
    x: torch.Tensor,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 (N,C,H,W) -> float in [0,1], then (x - mean) / std per channel when given."""
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


def recipe_options(recipe: Any) -> dict[str, Any]:
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
    """Logits (float32, on the CPU) for uint8 images (N,C,H,W), in eval mode, batched.

    Runs on `device` when given, else on the device the model's parameters are on."""
    device = resolve_device(str(device)) if device is not None else model_device(model)
    dtype = autocast_dtype(precision, device)
    was_training = model.training
    model.eval()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = []
    if device.type == "cuda" and x.numel() <= 1 << 28:
        # One copy up front (uint8, up to 256 MB): a copy per batch from pageable memory would wait for the GPU.
        x = x.to(device)
    # No cuDNN timing for inference: every new batch size (a last partial batch, a serve request) would be timed
    # afresh, which costs more than a few dozen batches can win back.
    try:
        with without_cudnn_timing(device):
            for i in range(0, len(x), batch_size):
                xb = to_float(x[i : i + batch_size], mean, std, device, channels_last)
                acc: torch.Tensor | None = None
                with autocast(device, dtype):
                    for w, view in tta_views(xb, tta):
                        y = model(view.contiguous(memory_format=fmt)).float() * w
                        acc = y if acc is None else acc + y
                assert acc is not None  # every TTA mode has at least one view
                out.append(acc)  # on the device until the end: one read-back, not one per batch
    finally:
        model.train(was_training)
    return torch.cat(out).cpu() if out else torch.empty(0)


def predict_proba(model: nn.Module, x: torch.Tensor, *, temperature: float = 1.0, **kw: Any) -> torch.Tensor:
    """Softmax probabilities (the reference's output layer) for uint8 images; `temperature`: the run's fitted one
    (`Run.temperature`), which divides the logits first (the predicted class stays the same)."""
    return torch.softmax(predict_logits(model, x, **kw) / temperature, dim=1)
