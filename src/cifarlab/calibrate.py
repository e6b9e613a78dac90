"""Temperature scaling (Guo et al. 2017): one scalar T, fitted after training, that turns the model's softmax into
probabilities that mean what they say. `softmax(logits / T)` keeps every prediction (argmax) and only changes how
sure the model claims to be.

Why a run needs it: airbench-style recipes train with label smoothing 0.2, which teaches the model never to claim
more than ~82%, so `fast`'s raw softmax is under-confident by ~20 points (ECE ~20%). Fitted on 1,000
validation images, or training images seen without augmentation, T ~0.5 brings `fast`'s test ECE to ~2%
(benchmarks/RESULTS.md, "Calibrated probabilities"). The temperature is stored in model.safetensors' metadata, so
weights and T travel together; predict, serve, export and the report apply it (`runs.Run.temperature`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from cifarlab.errors import UserError

CALIBRATION_IMAGES = 1000  # one scalar: 1,000 images pin `fast`'s T to +-0.01 (RESULTS.md), at ~0.2 s
T_RANGE = (0.02, 50.0)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimizes the mean cross-entropy of softmax(logits / T) against hard `labels`.

    The loss is convex in 1/T, so a golden-section search over log T finds its minimum; at the ends of T_RANGE
    (a model that is always right, or never) the end is returned."""
    z = logits.detach().double().cpu()
    y = labels.detach().long().cpu()
    if z.ndim != 2 or len(z) != len(y) or len(y) == 0:
        raise ValueError(f"need (N, classes) logits and N labels, got {tuple(z.shape)} and {tuple(y.shape)}")

    def nll(log_t: float) -> float:
        return F.cross_entropy(z / math.exp(log_t), y).item()

    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(60):  # the bracket shrinks 0.618x a step: 60 steps leave ~1e-12 of log T
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def calibration_split(
    x_train: torch.Tensor, y_train: torch.Tensor, train_idx: torch.Tensor, val_idx: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images, labels, what they are) to fit the temperature on: up to CALIBRATION_IMAGES of the validation split
    when the run has one (images the model never trained on), else as many training images drawn with the run's
    seed, seen without augmentation (T then comes out a little low: RESULTS.md measures how little)."""
    if len(val_idx):
        idx, what = val_idx[:CALIBRATION_IMAGES], "validation"
    else:
        g = torch.Generator().manual_seed(seed)
        idx, what = train_idx[torch.randperm(len(train_idx), generator=g)[:CALIBRATION_IMAGES]], "training"
    return x_train[idx], y_train[idx], f"{len(idx)} {what} images"


def check_temperature(value: Any, where: str) -> float:
    """A stored temperature as a float; anything but a positive finite number is a damaged file."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = float("nan")
    if not (math.isfinite(t) and t > 0):
        raise UserError(f"{where}: temperature {value!r} is not a positive number; the file is damaged")
    return t
