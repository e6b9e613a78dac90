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
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cifarlab.errors import UserError

CALIBRATION_IMAGES = 1000  # one scalar: 1,000 images pin `fast`'s T to +-0.01 (RESULTS.md), at ~0.2 s
T_RANGE = (0.02, 50.0)


def at_bound(temperature: float) -> str | None:
    """'lower' or 'upper' when a fitted temperature sits at an end of T_RANGE: a degenerate fit (the images were
    all right with full confidence, or the model was so often wrong that every probability was flattened)."""
    if temperature <= 0 or temperature == 1.0:
        return None
    if abs(math.log(temperature / T_RANGE[0])) < 1e-3:
        return "lower"
    if abs(math.log(temperature / T_RANGE[1])) < 1e-3:
        return "upper"
    return None


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
    when the run has one (images the model never trained on), else as many training images, seen without
    augmentation: the model knows those better than new images, so T comes out a little low after a short run
    (`fast`: 0.50 where the test set's best is 0.53) and too low after a long one (`air94`: 0.36 against 0.52);
    --set val_fraction=0.02 holds out 1,000 images for an unbiased fit (RESULTS.md).

    Either way a random draw with the run's seed: the split's indices are sorted, and files stored class by class
    (every image folder, the shared CIFAR-10 copy) made the first 1,000 validation images one class."""
    pool, what = (val_idx, "validation") if len(val_idx) else (train_idx, "training")
    g = torch.Generator().manual_seed(seed)
    idx = pool[torch.randperm(len(pool), generator=g)[:CALIBRATION_IMAGES]]
    return x_train[idx], y_train[idx], f"{len(idx)} {what} images"


def fit_on_split(
    model: torch.nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    train_idx: torch.Tensor,
    val_idx: torch.Tensor,
    seed: int,
    *,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    device: torch.device | str | None,
    options: dict[str, Any],
) -> dict[str, Any]:
    """Fit a trained model's temperature on its `calibration_split`, through the inference path `options` names
    (`inference.recipe_options`: TTA, precision, batch, memory format); what metrics.json keeps as "calibration"."""
    from cifarlab.inference import predict_logits

    t0 = time.perf_counter()
    x, y, what = calibration_split(x_train, y_train, train_idx, val_idx, seed)
    z = predict_logits(model, x, mean=mean, std=std, device=device, **options)
    t = fit_temperature(z, y)
    return {
        "temperature": t,
        "fitted_on": what,
        "fit_loss_before": F.cross_entropy(z, y).item(),
        "fit_loss_after": F.cross_entropy(z / t, y).item(),
        "seconds": time.perf_counter() - t0,
    }


def calibrate_run(
    run_dir: Path | str,
    dataset: Any = None,
    data_dir: Path | None = None,
    off: bool = False,
    on_warning: Callable[[str], Any] | None = None,
) -> dict[str, Any] | None:
    """Fit (again) the softmax temperature of a finished run, or with `off` remove it; `cifarlab calibrate`.

    For runs trained with calibrate=false (`reference`) or before temperatures existed. The images are the
    run's own: its reproduced validation split, else its training images, so the data must be the run's
    (checksum). model.safetensors is rewritten with the same tensors and the new metadata, atomically, under
    the run's lock; metrics.json's "calibration" entry follows. Returns that entry (None with `off`).
    `on_warning(line)` (default: `warnings.warn`) hears when metrics.json is damaged and cannot record it."""
    from cifarlab.data import recipe_split
    from cifarlab.evaluate import check_dataset, load_run_dataset
    from cifarlab.inference import recipe_options, resolve_device
    from cifarlab.runs import (
        CHECKPOINT,
        METRICS,
        STATUS,
        WEIGHTS,
        RunLock,
        load_run,
        read_json,
        resume_command,
        start_again,
        write_json,
        write_temperature,
    )

    run = load_run(run_dir)
    status = read_json(run.path / STATUS).get("status") if (run.path / STATUS).exists() else None
    if status != "finished":
        if (run.path / CHECKPOINT).is_file():
            how = f"train or resume it first: {resume_command(run.path, run.config.get('distributed'))}"
        else:  # no epoch of it finished: --resume refuses it
            how = f"it has nothing to resume; {start_again(run.path)}"
        raise UserError(f"{run.path} has not finished (status {status!r}): {how}")
    with RunLock(run.path):
        result = None
        if off and run.temperature == 1.0:
            return None  # nothing to remove: the file stays as it is
        if not off:
            ds = dataset if dataset is not None else load_run_dataset(run, data_dir)
            check = check_dataset(run, ds)
            if check.mismatch:
                raise UserError(
                    f"the data given is not the data {run.path.name} was trained on (checksum {check.checksum} "
                    f"!= the run's): its temperature must be fitted on the run's own images; pass its data folder "
                    "(--data-dir; data_dir= in Python)"
                )
            tr, va = recipe_split(run.recipe, ds.y_train)
            device = resolve_device("auto")
            mean, std = run.normalization
            result = fit_on_split(
                run.inference_model(device), ds.x_train, ds.y_train, tr, va, run.recipe.seed,
                mean=mean, std=std, device=device, options=recipe_options(run.recipe),
            )  # fmt: skip
        before = _metrics_or_none(run)
        recorded = not before or isinstance(before.get("calibration"), dict)  # metrics.json (if any) agrees
        if result is not None and result["temperature"] == run.temperature and recorded:
            # The same temperature again (the fit is deterministic): the weights file, the probabilities and every
            # result computed from them stay as they are.
            return {**result, "unchanged": True}
        write_temperature(run.path / WEIGHTS, None if result is None else result["temperature"])
        try:
            metrics = run.metrics
        except UserError as e:  # damaged: `cifarlab report` sets it aside and rebuilds it
            message = f"the temperature is in {WEIGHTS}, but {e}; `cifarlab report {run.path}` rebuilds it"
            (on_warning or (lambda m: warnings.warn(m, stacklevel=3)))(message)
            metrics = None
        if metrics:
            write_json(run.path / METRICS, {**metrics, **_at_new_temperature(metrics, off), "calibration": result})
    return result


def _metrics_or_none(run: Any) -> dict[str, Any] | None:
    try:
        return run.metrics
    except UserError:
        return None


def _at_new_temperature(metrics: dict[str, Any], off: bool) -> dict[str, Any]:
    """metrics.json's numbers that depend on the temperature (the loss and ECE; accuracy and top-k do not), made
    to match the new one: with `off` the plain softmax's, where the file knows them; after a new fit unknown
    (None) until `cifarlab report` evaluates again, rather than the old temperature's. The plain loss is kept."""
    had_temperature = isinstance(metrics.get("calibration"), dict)
    out: dict[str, Any] = {}
    for split in ("test", "val"):
        if f"{split}_loss" not in metrics:
            continue
        plain = metrics.get(f"{split}_loss_uncalibrated") if had_temperature else metrics.get(f"{split}_loss")
        out[f"{split}_loss"] = plain if off else None
        out[f"{split}_loss_uncalibrated"] = None if off else plain
        if f"{split}_ece" in metrics:
            ev = metrics.get("evaluation")
            inference = ev.get("inference") if isinstance(ev, dict) and ev.get("split") == split else None
            plain_ece = inference.get("uncalibrated_ece") if isinstance(inference, dict) else None
            plain_ece = plain_ece if had_temperature else metrics.get(f"{split}_ece")
            out[f"{split}_ece"] = plain_ece if off else None
    ev = metrics.get("evaluation")
    if isinstance(ev, dict):
        # Its accuracy, per-class figures and confusions still hold; its loss, ECE and confidences are the old
        # temperature's. Said in the block itself, for a script that reads it before `cifarlab report` runs again.
        t = ev.get("inference", {}).get("temperature") if isinstance(ev.get("inference"), dict) else None
        out["evaluation"] = {
            **ev,
            "stale": f"loss, calibration and confidences at the earlier temperature {t}; `cifarlab report` "
            "evaluates again",
        }
    return out
