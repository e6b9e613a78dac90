"""Evaluation of a classifier's predictions: scikit-learn metrics, confusion ranking, calibration.

`evaluate_predictions` works on plain arrays (labels and logits) so it can be tested on hand-made cases;
`evaluate_run` loads a saved run, predicts the chosen split in eval mode and hands the logits to it.
Everything returned in the evaluation dict is JSON-serialisable (floats, ints, lists, dicts).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from cifarlab.errors import UserError

TOP_CONFUSIONS = 3  # confusions listed per class ("cat -> dog 14%, frog 6%, bird 5%")
HIGH_CONFIDENCE = 0.9


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (the reference model's output layer)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)  # shift for stability: exp never overflows
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(y_true: np.ndarray, logits: np.ndarray) -> float:
    """Mean cross-entropy from logits via log-softmax.

    Exact for any logit gap, unlike scikit-learn's `log_loss` on probabilities, which clips them at the
    float epsilon; it is the same number as training's `F.cross_entropy` (tests check it against `log_loss`).
    """
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    log_norm = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(z)), y_true]))


def top_confusions(cm: np.ndarray, classes: Sequence[str], k: int = TOP_CONFUSIONS) -> dict[str, list]:
    """Each true class's `k` most frequent wrong predictions as (other class, share of the true class).

    Only confusions that happened are listed; ties go to the lower class index, so the ranking is stable.
    """
    out: dict[str, list] = {}
    for i, name in enumerate(classes):
        row = cm[i].astype(np.int64)
        total = int(row.sum())
        others = [j for j in range(len(classes)) if j != i and row[j] > 0]
        others.sort(key=lambda j: (-int(row[j]), j))
        out[name] = [(classes[j], float(row[j] / total)) for j in others[:k]]
    return out


def confused_pairs(cm: np.ndarray, classes: Sequence[str], k: int = 10) -> list[dict[str, Any]]:
    """The `k` class pairs mistaken for each other most often, both directions added up."""
    n = len(classes)
    pairs = []
    for i in range(n):
        for j in range(i + 1, n):
            a_to_b, b_to_a = int(cm[i, j]), int(cm[j, i])
            if a_to_b + b_to_a:
                pairs.append(
                    {"a": classes[i], "b": classes[j], "count": a_to_b + b_to_a, "a_to_b": a_to_b, "b_to_a": b_to_a}
                )
    pairs.sort(key=lambda p: -p["count"])  # stable sort: ties keep class order
    return pairs[:k]


def calibration(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Expected calibration error and the reliability diagram's bins (equal-width confidence bins).

    Bin m holds confidences in ((m-1)/M, m/M] (the first bin also holds 0), as in Guo et al. 2017.
    ECE = sum over bins of (bin size / N) * |accuracy in bin - mean confidence in bin|. scikit-learn has no
    multi-class ECE (its `calibration_curve` is binary), so this one is written here, and tested by hand.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    ok = np.asarray(correct, dtype=bool)
    n = len(conf)
    idx = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    ok_sum = np.bincount(idx, weights=ok.astype(np.float64), minlength=n_bins)
    bins = []
    ece = mce = 0.0
    for m in range(n_bins):
        c = int(counts[m])
        acc = float(ok_sum[m] / c) if c else None
        mean_conf = float(conf_sum[m] / c) if c else None
        gap = (mean_conf - acc) if c else None
        if c:
            ece += c / n * abs(gap)
            mce = max(mce, abs(gap))
        bins.append(
            {
                "lower": m / n_bins,
                "upper": (m + 1) / n_bins,
                "count": c,
                "accuracy": acc,
                "confidence": mean_conf,
                "gap": gap,
            }
        )
    accuracy = float(ok.mean()) if n else 0.0
    mean_confidence = float(conf.mean()) if n else 0.0
    confident = conf >= HIGH_CONFIDENCE
    return {
        "n_bins": n_bins,
        "ece": float(ece),
        "mce": float(mce),  # the worst bin's |confidence - accuracy|
        "mean_confidence": mean_confidence,
        "accuracy": accuracy,
        "overconfidence": mean_confidence - accuracy,  # > 0: the model claims more than it delivers
        "bins": bins,
        # "of the predictions made with >= 90% confidence, how many are right": the number a user acts on
        "high_confidence": {
            "threshold": HIGH_CONFIDENCE,
            "share": float(confident.mean()) if n else 0.0,
            "accuracy": float(ok[confident].mean()) if confident.any() else None,
        },
    }


def evaluate_predictions(
    y_true: np.ndarray, logits: np.ndarray, classes: Sequence[str], n_bins: int = 15
) -> dict[str, Any]:
    """All metrics of a classifier from its logits on labelled images; JSON-serialisable.

    Keys: n, loss, accuracy, error_rate, balanced_accuracy, top5_accuracy (top_k: k used), confusion_matrix
    (counts, rows = true class, columns = predicted), confusion_matrix_normalized (rows sum to 1),
    per_class {name: {precision, recall, f1, support}}, macro_avg, weighted_avg, top_confusions
    {name: [(other, share), ...]}, confused_pairs, calibration {ece, mce, bins, ...}, probability_check.
    """
    classes = list(classes)
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    z = np.asarray(logits, dtype=np.float64)
    k_cls = len(classes)
    if z.ndim != 2 or z.shape != (len(y), k_cls):
        raise ValueError(f"logits must be ({len(y)}, {k_cls}), got {z.shape}")
    if len(y) == 0:
        raise UserError("nothing to evaluate: the split has no images")
    if y.min() < 0 or y.max() >= k_cls:
        raise ValueError(f"labels must be in [0, {k_cls}), got [{y.min()}, {y.max()}]")
    labels = list(range(k_cls))
    probs = softmax(z)
    pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)

    cm = confusion_matrix(y, pred, labels=labels)
    cm_norm = confusion_matrix(y, pred, labels=labels, normalize="true")  # empty rows come back as zeros
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    averages = {}
    for avg in ("macro", "weighted"):
        pa, ra, fa, _ = precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)
        averages[avg] = {"precision": float(pa), "recall": float(ra), "f1": float(fa), "support": int(len(y))}
    top_k = min(5, k_cls)
    # scikit-learn refuses k >= n_classes (and 2-column scores); every label is then in the top k anyway.
    top5 = float(top_k_accuracy_score(y, probs, k=top_k, labels=labels)) if top_k < k_cls else 1.0

    row_sums = probs.sum(axis=1)
    return {
        "n": int(len(y)),
        "classes": classes,
        "loss": cross_entropy(y, z),
        "accuracy": float(accuracy_score(y, pred)),
        "error_rate": float(1.0 - accuracy_score(y, pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)) if len(set(y.tolist())) > 1 else None,
        "top5_accuracy": top5,
        "top_k": top_k,
        "confusion_matrix": cm.astype(int).tolist(),
        "confusion_matrix_normalized": cm_norm.astype(float).tolist(),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(classes)
        },
        "macro_avg": averages["macro"],
        "weighted_avg": averages["weighted"],
        "top_confusions": top_confusions(cm, classes),
        "confused_pairs": confused_pairs(cm, classes),
        "calibration": calibration(conf, pred == y, n_bins),
        # The softmax output is read as a probability distribution: check that it is one.
        "probability_check": {
            "min": float(probs.min()),
            "max": float(probs.max()),
            "max_abs_sum_error": float(np.abs(row_sums - 1.0).max()),
            "is_distribution": bool(probs.min() >= 0 and probs.max() <= 1 and np.allclose(row_sums, 1.0)),
        },
    }


def split_images(run: Any, dataset: Any, split: str) -> tuple[Any, Any, Any]:
    """(images uint8, labels int64, dataset indices) of a run's test split or its reproduced validation split."""
    if split == "test":
        return dataset.x_test, dataset.y_test, torch.arange(len(dataset.y_test))
    if split != "val":
        raise UserError(f"unknown split {split!r}; use test or val")
    from cifarlab.data import split_indices

    recipe = run.recipe
    if recipe.val_fraction <= 0:
        raise UserError(
            f"run {run.path} trained on all training images (val_fraction=0): it has no validation split; "
            "use --split test"
        )
    labels = dataset.y_train if recipe.stratified_split else None
    _, va_idx = split_indices(len(dataset.y_train), recipe.val_fraction, recipe.seed, labels=labels)
    return dataset.x_train[va_idx], dataset.y_train[va_idx], va_idx


def load_run_dataset(run: Any, data_dir: Path | None = None) -> Any:
    from cifarlab.data import load_dataset

    return load_dataset(run.recipe.dataset, data_dir)


def check_dataset(run: Any, dataset: Any) -> dict[str, Any]:
    """The dataset must have the run's classes in the run's order; a different checksum is only noted."""
    if list(dataset.classes) != run.classes:
        raise UserError(
            f"the dataset's classes {list(dataset.classes)} are not the run's {run.classes}; "
            "pass the data the run was trained on (--data-dir)"
        )
    saved = (run.config.get("dataset") or {}).get("checksum") or ""
    return {
        "name": dataset.name,
        "source": str(dataset.source),
        "checksum": dataset.checksum,
        "checksum_matches_run": (dataset.checksum == saved) if saved and dataset.checksum else None,
    }


def evaluate_run(
    run_dir: Path,
    split: str = "test",
    data_dir: Path | None = None,
    dataset: Any = None,
    logits: torch.Tensor | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Evaluate a saved run on its test split (or its reproduced validation split).

    Returns (evaluation, extras): the evaluation dict of `evaluate_predictions` plus split, dataset,
    inference settings and timing; extras holds numpy arrays for the report (logits, probs, y_true, y_pred,
    images (uint8 tensor), indices into the split's source array).
    `logits`: the split's logits when the caller already has them (training just computed the test
    logits with the same settings), so inference is not run twice.
    """
    from cifarlab.inference import autocast_dtype, predict_logits, recipe_options, resolve_device
    from cifarlab.runs import load_run

    run = load_run(run_dir)
    if dataset is None:
        dataset = load_run_dataset(run, data_dir)
    data_info = check_dataset(run, dataset)
    x, y, idx = split_images(run, dataset, split)
    recipe = run.recipe
    mean, std = run.normalization
    device = resolve_device("auto")
    t0 = time.perf_counter()
    reused = logits is not None and len(logits) == len(y)
    if not reused:
        model = run.build_model().to(device)
        if recipe.channels_last:  # as training evaluates it
            model = model.to(memory_format=torch.channels_last)
        logits = predict_logits(model, x, mean=mean, std=std, device=device, **recipe_options(recipe))
    predict_seconds = None if reused else time.perf_counter() - t0
    y_np = y.numpy() if hasattr(y, "numpy") else np.asarray(y)
    z = logits.numpy()
    t0 = time.perf_counter()
    ev = evaluate_predictions(y_np, z, run.classes)
    ev.update(
        {
            "split": split,
            "dataset": data_info,
            "inference": {
                "device": str(device),
                "tta": recipe.tta,
                "precision": recipe.precision,
                # what "auto" resolved to on this machine: bf16 only where the CPU/GPU has it natively
                "dtype": str(autocast_dtype(recipe.precision, device) or torch.float32).replace("torch.", ""),
                "channels_last": recipe.channels_last,
                "batch_size": recipe.eval_batch_size,
                "predict_seconds": predict_seconds,
                "images_per_second": len(y_np) / predict_seconds if predict_seconds else None,
                "logits_from": "training" if reused else "this evaluation",
                "metrics_seconds": time.perf_counter() - t0,
            },
        }
    )
    probs = softmax(z)
    extras = {
        "logits": z,
        "probs": probs,
        "y_true": y_np,
        "y_pred": probs.argmax(axis=1),
        "images": x,
        "indices": np.asarray(idx),
        "dataset": dataset,
        "run": run,
    }
    return ev, extras


def format_summary(ev: dict[str, Any]) -> str:
    """The terminal summary of `cifarlab evaluate`: headline numbers, per-class table, top confusions."""
    cal = ev["calibration"]
    lines = [
        f"{ev.get('split', 'test')} split: {ev['n']:,} images"
        + (
            f" (TTA {ev['inference']['tta']}, {ev['inference']['predict_seconds'] or 0:.1f} s)"
            if "inference" in ev
            else ""
        ),
        f"accuracy {ev['accuracy']:.2%}   top-{ev['top_k']} {ev['top5_accuracy']:.2%}   loss {ev['loss']:.4f}   "
        f"ECE {cal['ece']:.2%} (mean confidence {cal['mean_confidence']:.2%})",
        "",
    ]
    width = max(8, *(len(c) for c in ev["classes"]))
    lines.append(f"{'class':<{width}}  precision  recall     f1  support  most confused with")
    for name, m in ev["per_class"].items():
        conf = ", ".join(f"{o} {s:.0%}" for o, s in ev["top_confusions"][name])
        lines.append(
            f"{name:<{width}}  {m['precision']:>9.3f}  {m['recall']:>6.3f}  {m['f1']:>5.3f}  {m['support']:>7}  {conf}"
        )
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        m = ev[key]
        lines.append(
            f"{label:<{width}}  {m['precision']:>9.3f}  {m['recall']:>6.3f}  {m['f1']:>5.3f}  {m['support']:>7}"
        )
    if ev["confused_pairs"]:
        lines.append("")
        lines.append(
            "most confused pairs: " + "; ".join(f"{p['a']} <-> {p['b']} {p['count']}" for p in ev["confused_pairs"][:5])
        )
    return "\n".join(lines)
