"""The run report: matplotlib figures, a self-contained `report.html`, `report.md` and `metrics.json`.

The report is built once as a list of sections made of neutral blocks (paragraphs, lists, tables,
figures); the HTML and Markdown renderers walk the same list, so both files say the same thing. Every
number shown also lands in `metrics.json` (merged into training's, whose keys are kept).

Figures use matplotlib's object API with the Agg canvas (no pyplot state, no display needed) and one
shared style, so they look alike and can be drawn from any thread.
"""

from __future__ import annotations

import base64
import html
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

PLOTS = "plots"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"

# -- figure style ----------------------------------------------------------------------------------------

STYLE = {
    "font.size": 9.5,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.labelsize": 9.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "legend.fontsize": 8.5,
    "image.interpolation": "nearest",
}
TRAIN, VAL, TEST = "#1f77b4", "#ff7f0e", "#2ca02c"
DROP, STOP, BEST = "#7f7f7f", "#d62728", "#9467bd"
PRF = ("#4c72b0", "#dd8452", "#55a868")  # precision, recall, F1
DPI = 100


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # No "Software" text chunk: smaller, reproducible PNGs without a URL inside.
    fig.savefig(path, dpi=DPI, metadata={"Software": None})


def _percent_axis(ax: Any, axis: str = "y") -> None:
    from matplotlib.ticker import PercentFormatter

    getattr(ax, f"{axis}axis").set_major_formatter(PercentFormatter(1.0, decimals=0))


# -- history helpers -------------------------------------------------------------------------------------


def _events(history: list[dict[str, Any]], name: str) -> list[int]:
    return [int(r["epoch"]) for r in history if name in (r.get("events") or [])]


def _has_val(history: list[dict[str, Any]]) -> bool:
    return any(r.get("val_loss") is not None for r in history)


def _kept_epoch(history: list[dict[str, Any]], metrics: dict[str, Any]) -> int | None:
    """The epoch whose weights the saved model has: the restored best one, else the last."""
    if metrics.get("restored_epoch"):
        return int(metrics["restored_epoch"])
    return int(history[-1]["epoch"]) if history else None


def _row(history: list[dict[str, Any]], epoch: int | None) -> dict[str, Any]:
    for r in history:
        if r.get("epoch") == epoch:
            return r
    return {}


# -- figures ---------------------------------------------------------------------------------------------


def plot_curves(history: list[dict[str, Any]], metrics: dict[str, Any], test: dict[str, Any] | None = None) -> Any:
    """Accuracy and loss per epoch, train and validation (the talk's figures 3 and 4), with LR drops,
    the early stop and the kept (best) epoch marked and the test result as a dotted line."""
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2)
    ep = [r["epoch"] for r in history]
    drops = _events(history, "lr_reduced")
    stops = _events(history, "early_stop")
    kept = metrics.get("restored_epoch") or metrics.get("best_epoch")
    for ax, key, label in ((axes[0], "accuracy", "Accuracy"), (axes[1], "loss", "Loss")):
        ax.plot(ep, [r.get(key) for r in history], "-o", ms=3.5, color=TRAIN, label=f"train {key}")
        if _has_val(history):
            ax.plot(ep, [r.get(f"val_{key}") for r in history], "-o", ms=3.5, color=VAL, label=f"validation {key}")
            if kept and _row(history, kept).get(f"val_{key}") is not None:
                ax.plot(
                    [kept],
                    [_row(history, kept)[f"val_{key}"]],
                    "*",
                    ms=14,
                    color=BEST,
                    label=f"best epoch ({kept})",
                    zorder=5,
                )
        if test and test.get(key) is not None:
            ax.axhline(test[key], ls=":", lw=1.5, color=TEST, label=f"test {key} ({_num(test[key], key)})")
        for i, e in enumerate(drops):
            ax.axvline(e + 0.5, color=DROP, ls="--", lw=1, label="LR reduced" if i == 0 else None)
        for i, e in enumerate(stops):
            ax.axvline(e, color=STOP, ls="-", lw=1.5, alpha=0.8, label="early stop" if i == 0 else None)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label.lower())
        ax.set_title(f"{label} per epoch")
        if ep:
            ax.set_xlim(0.5, max(ep) + 0.5)
            ax.xaxis.get_major_locator().set_params(integer=True)
        if key == "accuracy":
            _percent_axis(ax)
        ax.legend(loc="lower right" if key == "accuracy" else "upper right")
    return fig


def plot_lr(history: list[dict[str, Any]]) -> Any:
    """The learning rate each epoch trained with, LR drops marked."""
    fig = _figure(6.5, 3.2)
    ax = fig.subplots()
    lrs = np.array([float(r["lr"]) for r in history])
    n = len(lrs)
    if n:
        ax.stairs(lrs, np.arange(0.5, n + 1.5), color=TRAIN, lw=2, baseline=None)
        if lrs.min() > 0 and lrs.max() / lrs.min() > 3:
            ax.set_yscale("log")
        levels = sorted(set(lrs.tolist()))
        if len(levels) <= 8:  # a plateau schedule: label each LR level, not log-scale minor ticks
            from matplotlib.ticker import NullFormatter, NullLocator

            ax.yaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_yticks(levels, labels=[f"{v:.3g}" for v in levels])
        ax.margins(y=0.08)
        ax.set_xlim(0.5, n + 0.5)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for i, e in enumerate(_events(history, "lr_reduced")):
        ax.axvline(e + 0.5, color=DROP, ls="--", lw=1, label="LR reduced" if i == 0 else None)
    for i, e in enumerate(_events(history, "early_stop")):
        ax.axvline(e, color=STOP, lw=1.5, alpha=0.8, label="early stop" if i == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning-rate schedule")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return fig


def plot_confusion(ev: dict[str, Any]) -> Any:
    """Confusion-matrix heatmap (the talk's table 5): colour = share of the true class, text = count."""
    classes = ev["classes"]
    k = len(classes)
    cm = np.array(ev["confusion_matrix"])
    norm = np.array(ev["confusion_matrix_normalized"])
    side = min(14.0, 2.8 + 0.62 * k)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.grid(False)
    tick_size = 9 if k <= 20 else max(4.0, 9 - k / 20)
    ax.set_xticks(range(k), labels=classes, rotation=45, ha="right", fontsize=tick_size)
    ax.set_yticks(range(k), labels=classes, fontsize=tick_size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix ({ev['n']:,} {ev.get('split', 'test')} images)")
    if k <= 20:
        size = 8 if k <= 12 else 6
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=size,
                        color="white" if norm[i, j] > 0.5 else "#222222",
                    )
    bar = fig.colorbar(im, ax=ax, shrink=0.8)
    bar.set_label("share of the true class")
    return fig


def plot_per_class(ev: dict[str, Any]) -> Any:
    """Per-class precision, recall and F1 bars (the talk's table 2), overall accuracy as a line."""
    classes = ev["classes"]
    k = len(classes)
    fig = _figure(min(40.0, max(7.0, 0.75 * k + 2)), 4.0)
    ax = fig.subplots()
    x = np.arange(k)
    w = 0.27
    for off, key, color in zip((-w, 0, w), ("precision", "recall", "f1"), PRF):
        ax.bar(x + off, [ev["per_class"][c][key] for c in classes], w, color=color, label="F1" if key == "f1" else key)
    ax.axhline(ev["accuracy"], color="#333333", ls=":", lw=1.2, label=f"accuracy ({ev['accuracy']:.1%})")
    ax.set_xticks(
        x,
        labels=classes,
        rotation=30 if k <= 20 else 90,
        ha="right" if k <= 20 else "center",
        fontsize=9 if k <= 20 else 6,
    )
    ax.set_ylim(0, 1.05)
    ax.set_xlim(-0.6, k - 0.4)
    _percent_axis(ax)
    ax.set_title("Precision, recall and F1 per class")
    fig.legend(loc="outside right upper")
    ax.grid(axis="x", visible=False)
    return fig


def plot_reliability(ev: dict[str, Any]) -> Any:
    """Reliability diagram: accuracy per confidence bin against the diagonal, and how many images fall in
    each bin. A bar below the diagonal means the model is over-confident there."""
    cal = ev["calibration"]
    bins = cal["bins"]
    m = cal["n_bins"]
    width = 1.0 / m
    centers = np.array([(b["lower"] + b["upper"]) / 2 for b in bins])
    acc = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
    conf = np.array([b["confidence"] if b["count"] else 0.0 for b in bins])
    counts = np.array([b["count"] for b in bins], dtype=float)
    has = counts > 0
    fig = _figure(6.0, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    top.bar(centers[has], acc[has], width, color=TRAIN, edgecolor="white", label="accuracy in bin")
    top.bar(
        centers[has],
        (conf - acc)[has],
        width,
        bottom=acc[has],
        color=STOP,
        alpha=0.25,
        edgecolor=STOP,
        hatch="//",
        lw=0.5,
        label="gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], "--", color="#555555", lw=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    _percent_axis(top)
    top.set_title(f"Reliability diagram (ECE {cal['ece']:.2%})")
    top.legend(loc="upper left")
    bottom.bar(centers, counts / max(1, counts.sum()), width, color="#8c8c8c", edgecolor="white")
    bottom.axvline(cal["accuracy"], color=TEST, lw=1.5, label=f"accuracy {cal['accuracy']:.1%}")
    bottom.axvline(
        cal["mean_confidence"], color=STOP, lw=1.5, ls="--", label=f"mean confidence {cal['mean_confidence']:.1%}"
    )
    bottom.set_xlabel("confidence (highest softmax probability)")
    bottom.set_ylabel("share of images")
    _percent_axis(bottom)
    _percent_axis(bottom, "x")
    bottom.legend(loc="upper left")
    return fig


def _hwc(img: torch.Tensor | np.ndarray) -> np.ndarray:
    a = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
    if a.shape[0] == 1:
        a = np.repeat(a, 3, axis=0)
    return np.ascontiguousarray(a.transpose(1, 2, 0))


def plot_mistakes(extras: dict[str, Any], classes: Sequence[str], n: int = 24, cols: int = 8) -> tuple[Any, list]:
    """The `n` most confident mistakes: image, true class, predicted class and its probability."""
    probs, y, pred = extras["probs"], extras["y_true"], extras["y_pred"]
    wrong = np.flatnonzero(pred != y)
    conf = probs[wrong, pred[wrong]]
    order = wrong[np.argsort(-conf, kind="stable")][:n]
    rows = max(1, math.ceil(len(order) / cols))
    fig = _figure(1.35 * cols, 1.7 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    listing = []
    for ax in axes:
        ax.set_axis_off()
    for ax, i in zip(axes, order):
        ax.imshow(_hwc(extras["images"][int(i)]))
        p = float(probs[i, pred[i]])
        ax.set_title(f"true {classes[y[i]]}\npred {classes[pred[i]]} {p:.0%}", fontsize=7.5, fontweight="normal")
        listing.append(
            {"index": int(extras["indices"][i]), "true": classes[y[i]], "predicted": classes[pred[i]], "probability": p}
        )
    if not len(order):
        axes[0].text(0, 0.5, "no mistakes", fontsize=12)
    fig.suptitle("Most confident mistakes", fontweight="bold", fontsize=11)
    return fig, listing


def plot_augment(
    x_train: torch.Tensor, y_train: torch.Tensor, classes: Sequence[str], recipe: Any, seed: int = 0, n_aug: int = 4
) -> Any:
    """One training image and `n_aug` random augmentations of it with the recipe's augmentation (image 3)."""
    from cifarlab.augment import make_augment

    aug = make_augment(recipe)
    g = torch.Generator().manual_seed(seed)
    i = int(torch.randint(len(x_train), (1,), generator=g))
    x = x_train[i : i + 1].float() / 255.0
    views = [x]
    if aug is not None:
        for e in range(n_aug):  # one call per epoch: alternate-flip recipes flip on odd epochs
            views.append(aug(x.clone(), generator=g, indices=torch.tensor([i]), epoch=e))
    fig = _figure(1.9 * (n_aug + 1), 2.5)
    axes = fig.subplots(1, n_aug + 1)
    for ax in axes:
        ax.set_axis_off()
    for j, (ax, v) in enumerate(zip(axes, views)):
        ax.imshow(_hwc((v[0].clamp(0, 1) * 255).round().to(torch.uint8)))
        ax.set_title("original" if j == 0 else f"augmented {j}", fontsize=9, fontweight="normal")
    if aug is None:
        axes[1].text(0.0, 0.5, "this recipe trains\nwithout augmentation", fontsize=9, va="center")
    fig.suptitle(f"{classes[int(y_train[i])]}: augmentation '{recipe.augment}'", fontweight="bold", fontsize=11)
    return fig


def plot_samples(x: torch.Tensor, y: torch.Tensor, classes: Sequence[str], per_class: int = 8, seed: int = 0) -> Any:
    """A grid of sample images per class (image 2), drawn by the data module."""
    from cifarlab.data import sample_grid_figure

    fig = sample_grid_figure(x, y, classes, per_class=per_class, seed=seed)
    for ax in fig.axes:  # the report style's grid would draw lines across the images
        ax.grid(False)
    fig.suptitle("Sample images per class", fontweight="bold", fontsize=11)
    return fig


# -- the plain-language reading -----------------------------------------------------------------------------


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x * 100:.{digits}f}%"


def _list(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _conf_list(pairs: Sequence[Sequence[Any]]) -> str:
    return _list([f"{o} ({s:.0%})" for o, s in pairs])


def plain_reading(ev: dict[str, Any], history: list[dict[str, Any]], metrics: dict[str, Any]) -> list[str]:
    """A short reading of the results, derived from the numbers only (no class is named in advance)."""
    classes = ev["classes"]
    k = len(classes)
    split = ev.get("split", "test")
    cm = np.array(ev["confusion_matrix"])
    out = []
    wrong_per_100 = round(ev["error_rate"] * 100)
    out.append(
        f"The model labels {_pct(ev['accuracy'], 2)} of the {ev['n']:,} {split} images correctly "
        f"(about {100 - wrong_per_100} in 100; the right class is among its top {ev['top_k']} guesses for "
        f"{_pct(ev['top5_accuracy'])})."
    )
    n_show = max(1, min(3, k // 4))
    by_f1 = sorted(classes, key=lambda c: (-ev["per_class"][c]["f1"], classes.index(c)))
    strong, weak = by_f1[:n_show], by_f1[::-1][:n_show]
    strong_txt = _list([f"{c} (F1 {ev['per_class'][c]['f1']:.2f})" for c in strong])
    out.append(f"Strongest {'class' if n_show == 1 else 'classes'}: {strong_txt}.")
    for c in strong:
        if ev["top_confusions"][c]:
            o, s = ev["top_confusions"][c][0]
            out.append(
                f"The most common mistake on {c}, the strongest class: taken for {o} ({s:.0%} of the {c} images)."
            )
            break
    for c in weak:
        m = ev["per_class"][c]
        i = classes.index(c)
        s = f"Weak: {c} (F1 {m['f1']:.2f}, precision {m['precision']:.2f}, recall {m['recall']:.2f})."
        if ev["top_confusions"][c]:
            s += (
                f" {_pct(1 - m['recall'], 0)} of the {c} images are missed, mostly taken for "
                f"{_conf_list(ev['top_confusions'][c])}."
            )
        col = [(classes[j], int(cm[j, i])) for j in range(k) if j != i and cm[j, i]]
        col.sort(key=lambda t: -t[1])
        if col:
            s += (
                f" {sum(n for _, n in col):,} images of other classes are called {c}, most often "
                f"{_list([f'{o} ({n})' for o, n in col[:2]])}."
            )
        if m["recall"] < m["precision"] - 0.05:
            s += " Low recall more than low precision: the model misses this class more than it over-predicts it."
        elif m["precision"] < m["recall"] - 0.05:
            s += " Low precision more than low recall: the model over-predicts this class."
        out.append(s)
    pairs = ev["confused_pairs"]
    n_wrong = int(cm.sum() - np.trace(cm))
    if pairs:
        p = pairs[0]
        out.append(
            f"The most confused pair is {p['a']} ↔ {p['b']}: {p['count']:,} mistakes ({p['a']} → {p['b']} "
            f"{p['a_to_b']:,}, {p['b']} → {p['a']} {p['b_to_a']:,}), {p['count'] / max(1, n_wrong):.0%} of all "
            f"{n_wrong:,} mistakes."
        )
        if len(pairs) > 1:
            out.append("Next: " + "; ".join(f"{q['a']} ↔ {q['b']} ({q['count']:,})" for q in pairs[1:4]) + ".")
    cal = ev["calibration"]
    over = cal["overconfidence"]
    if cal["ece"] < 0.02:
        cal_txt = "well calibrated"
    elif over > 0:
        cal_txt = "over-confident"
    else:
        cal_txt = "under-confident"
    s = (
        f"Calibration: the softmax output read as a probability is {cal_txt} (ECE {_pct(cal['ece'])}; mean "
        f"confidence {_pct(cal['mean_confidence'])} against accuracy {_pct(cal['accuracy'])})."
    )
    hc = cal.get("high_confidence") or {}
    if hc.get("accuracy") is not None:
        s += (
            f" Predictions made with at least {hc['threshold']:.0%} confidence ({hc['share']:.0%} of images) are "
            f"right {_pct(hc['accuracy'])} of the time."
        )
    out.append(s)
    if history:
        kept = _kept_epoch(history, metrics)
        row = _row(history, kept)
        train_acc = row.get("accuracy")
        val_acc = row.get("val_accuracy")
        if train_acc is not None:
            gap = train_acc - ev["accuracy"]
            s = f"Generalisation (epoch {kept}, the weights kept): train {_pct(train_acc)}"
            s += f", validation {_pct(val_acc)}" if val_acc is not None else ""
            s += f", {split} {_pct(ev['accuracy'])}: "
            if gap < 0.01:
                s += (
                    f"the {split} accuracy is not below the training accuracy (training accuracy is measured on "
                    "augmented images with dropout on), so there is no sign of overfitting."
                    if gap <= 0
                    else f"a gap of {gap * 100:.1f} points: almost no overfitting."
                )
            elif gap < 0.03:
                s += f"a gap of {gap * 100:.1f} points: slight overfitting."
            elif gap < 0.06:
                s += f"a gap of {gap * 100:.1f} points: moderate overfitting."
            else:
                s += f"a gap of {gap * 100:.1f} points: clear overfitting."
            out.append(s)
        drops = _events(history, "lr_reduced")
        stops = _events(history, "early_stop")
        parts = [f"Training ran {len(history)} epochs"]
        if drops:
            parts.append(
                f"the learning rate was reduced after epoch{'s' if len(drops) > 1 else ''} "
                f"{_list([str(e) for e in drops])}"
            )
        if stops:
            parts.append(f"early stopping ended it after epoch {stops[-1]}")
        if metrics.get("restored_epoch"):
            parts.append(f"the weights of epoch {metrics['restored_epoch']} were restored")
        out.append(", ".join(parts) + ".")
    return out


# -- report content ----------------------------------------------------------------------------------------

FIGURES = {
    "curves": "curves.png",
    "lr": "lr_schedule.png",
    "confusion": "confusion_matrix.png",
    "per_class": "per_class.png",
    "reliability": "reliability.png",
    "mistakes": "mistakes.png",
    "samples": "samples.png",
    "augment": "augmentation.png",
}


def _num(v: Any, key: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return f"{v:,}" if key not in ("epoch", "seed") else str(v)
    if isinstance(v, float):
        if "accuracy" in key or key in ("precision", "recall", "f1", "ece", "mce"):
            return f"{v * 100:.2f}%"
        if key == "lr" or (v != 0 and abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_num(x) for x in v) if v else "–"
    if isinstance(v, dict):
        return json.dumps(v) if v else "–"
    return str(v)


def _event_text(row: dict[str, Any]) -> str:
    names = {"best": "best", "early_stop": "early stop", "restored_best": "best weights restored"}
    out = []
    for e in row.get("events") or []:
        if e == "lr_reduced":
            out.append(
                f"LR → {row['new_lr']:.3g} after this epoch" if row.get("new_lr") else "LR reduced after this epoch"
            )
        else:
            out.append(names.get(e, e))
    return ", ".join(out)


PHASES = {
    "data_seconds": "data loading and split",
    "setup_seconds": "model setup",
    "train_seconds": "training",
    "seconds_per_epoch": "training, per epoch (mean)",
    "eval_seconds": "test evaluation after training",
    "total_seconds": "training command, total",
    "report_evaluate_seconds": "report: evaluation",
    "report_plots_seconds": "report: figures",
}


def _seconds(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.1f} s" + (f" ({s / 60:.1f} min)" if s >= 120 else "")


def _config_rows(recipe: Any) -> list[list[str]]:
    """Every recipe field; values changed from the named recipe's defaults are marked."""
    from cifarlab.recipes import RECIPES

    base = RECIPES.get(recipe.name)
    base_d = base.to_dict() if base is not None else {}
    rows = []
    for key, value in recipe.to_dict().items():
        note = ""
        if base_d and key in base_d and base_d[key] != value:
            note = f"changed (recipe default {json.dumps(base_d[key])})"
        rows.append([key, value if isinstance(value, str) else json.dumps(value), note])
    return rows


def build_sections(
    run: Any, ev: dict[str, Any], reading: list[str], mistakes: list[dict[str, Any]], timings: dict[str, Any]
) -> tuple[str, list[tuple[str, str, list[tuple]]]]:
    """(title, sections): each section is (anchor, heading, blocks); blocks are
    ("p", text) | ("ul", [text]) | ("table", header, rows, row_classes) | ("fig", key, caption)."""
    recipe, history, metrics, config = run.recipe, run.history, run.metrics, run.config
    classes = ev["classes"]
    split = ev.get("split", "test")
    cal = ev["calibration"]
    kept = _kept_epoch(history, metrics)
    kept_row = _row(history, kept)
    title = f"cifarlab run report: {run.path.name}"
    sections = []

    # Summary
    summary_rows = [
        ["recipe", recipe.name],
        [f"{split} accuracy", _pct(ev["accuracy"], 2)],
        [f"{split} top-{ev['top_k']} accuracy", _pct(ev["top5_accuracy"], 2)],
        [f"{split} loss", f"{ev['loss']:.4f}"],
        ["macro F1", f"{ev['macro_avg']['f1']:.4f}"],
        ["expected calibration error", _pct(cal["ece"], 2)],
    ]
    if kept_row:
        summary_rows.append([f"train accuracy (epoch {kept})", _pct(kept_row.get("accuracy"), 2)])
        if kept_row.get("val_accuracy") is not None:
            summary_rows.append([f"validation accuracy (epoch {kept})", _pct(kept_row.get("val_accuracy"), 2)])
    if history:
        summary_rows.append(["epochs run", str(len(history))])
    if timings.get("train_seconds") is not None:
        summary_rows.append(["training wall time", _seconds(timings["train_seconds"])])
    trained = metrics.get(f"{split}_accuracy")
    if isinstance(trained, float) and abs(trained - ev["accuracy"]) > 5e-4:
        summary_rows.append([f"{split} accuracy measured at the end of training", _pct(trained, 2)])
    sections.append(
        (
            "summary",
            "Summary",
            [
                ("p", recipe.description or f"Recipe {recipe.name}."),
                ("table", ["", "value"], summary_rows, None),
                ("p", "Reading of the results (computed from the numbers below):"),
                ("ul", reading),
            ],
        )
    )

    # Training
    blocks: list[tuple] = []
    if history:
        has_val = _has_val(history)
        header = (
            ["epoch", "loss", "accuracy"]
            + (["val_loss", "val_accuracy"] if has_val else [])
            + ["learning rate", "time", "events"]
        )
        rows, classes_ = [], []
        for r in history:
            cells = [str(r["epoch"]), _num(r.get("loss"), "loss"), _num(r.get("accuracy"), "accuracy")]
            if has_val:
                cells += [_num(r.get("val_loss"), "val_loss"), _num(r.get("val_accuracy"), "val_accuracy")]
            cells += [f"{float(r['lr']):.3g}", f"{float(r.get('epoch_seconds') or 0):.1f} s", _event_text(r)]
            rows.append(cells)
            ev_set = set(r.get("events") or [])
            classes_.append(
                " ".join(
                    sorted(
                        {"lr_reduced": "drop", "early_stop": "stop", "best": "best"}[e]
                        for e in ev_set
                        if e in ("lr_reduced", "early_stop", "best")
                    )
                )
            )
        blocks.append(
            (
                "p",
                "Table 1: one row per epoch; rows where the LR was reduced, where training stopped and "
                "the best epochs are marked.",
            )
        )
        blocks.append(("table", header, rows, classes_))
        blocks.append(
            (
                "fig",
                "curves",
                "Accuracy and loss per epoch (the talk's figures 3 and 4). Dashed grey: LR "
                "reduced; red: early stop; star: the epoch whose weights were kept.",
            )
        )
        blocks.append(("fig", "lr", "Learning rate per epoch."))
    else:
        blocks.append(("p", "This run has no training history (history.json is missing)."))
    sections.append(("training", "Training", blocks))

    # Test results
    inf = ev.get("inference", {})
    res_rows = [
        ["images", f"{ev['n']:,}"],
        ["accuracy", _pct(ev["accuracy"], 2)],
        ["error rate", _pct(ev["error_rate"], 2)],
        [f"top-{ev['top_k']} accuracy", _pct(ev["top5_accuracy"], 2)],
        ["balanced accuracy", _pct(ev["balanced_accuracy"], 2)],
        ["loss (cross-entropy)", f"{ev['loss']:.4f}"],
        [
            "macro precision / recall / F1",
            " / ".join(f"{ev['macro_avg'][m]:.4f}" for m in ("precision", "recall", "f1")),
        ],
        [
            "weighted precision / recall / F1",
            " / ".join(f"{ev['weighted_avg'][m]:.4f}" for m in ("precision", "recall", "f1")),
        ],
        ["expected calibration error", _pct(cal["ece"], 2)],
        ["test-time augmentation", str(inf.get("tta", recipe.tta))],
        [
            "inference",
            f"{inf.get('device', '?')}, precision {inf.get('precision', '?')} ({inf.get('dtype', '?')}), batch "
            f"{inf.get('batch_size', '?')}, {_seconds(inf.get('predict_seconds'))}",
        ],
    ]
    sections.append(
        (f"{split}-results", f"{split.capitalize()} results", [("table", ["metric", "value"], res_rows, None)])
    )

    # Per-class
    pc_rows = [
        [c, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", f"{m['support']:,}"]
        for c, m in ev["per_class"].items()
    ]
    for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
        m = ev[key]
        pc_rows.append([label, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", f"{m['support']:,}"])
    sections.append(
        (
            "per-class",
            "Per-class precision, recall and F1",
            [
                (
                    "p",
                    "Table 2: precision = share of the images predicted as the class that are right; "
                    "recall = share of the class's images found; support = images of the class.",
                ),
                (
                    "table",
                    ["class", "precision", "recall", "F1", "support"],
                    pc_rows,
                    [""] * len(classes) + ["total", "total"],
                ),
                ("fig", "per_class", "Precision, recall and F1 per class (table 2)."),
            ],
        )
    )

    # Confusions
    conf_rows = [
        [c, f"{ev['per_class'][c]['recall']:.0%}", ", ".join(f"{o} {s:.0%}" for o, s in ev["top_confusions"][c]) or "–"]
        for c in classes
    ]
    blocks = [
        (
            "fig",
            "confusion",
            "Confusion matrix (the talk's table 5): rows are the true class, columns the predicted "
            "one; colour is the share of the true class, numbers are counts.",
        ),
        ("p", "Each class's most frequent confusions (share of that class's images):"),
        ("table", ["true class", "correct", "most often taken for"], conf_rows, None),
    ]
    if ev["confused_pairs"]:
        blocks.append(("p", "Class pairs mistaken for each other most often (both directions):"))
        blocks.append(
            (
                "table",
                ["pair", "mistakes", "a → b", "b → a"],
                [
                    [f"{p['a']} ↔ {p['b']}", f"{p['count']:,}", f"{p['a_to_b']:,}", f"{p['b_to_a']:,}"]
                    for p in ev["confused_pairs"]
                ],
                None,
            )
        )
    if len(classes) <= 20:
        cm = ev["confusion_matrix"]
        blocks.append(("p", "Confusion matrix counts (rows: true class, columns: predicted class):"))
        blocks.append(
            (
                "table",
                ["true \\ predicted", *classes],
                [[c, *[f"{v:,}" for v in cm[i]]] for i, c in enumerate(classes)],
                None,
            )
        )
    sections.append(("confusions", "Confusions", blocks))

    # Calibration
    bin_rows = [
        [
            f"{b['lower']:.2f}–{b['upper']:.2f}",
            f"{b['count']:,}",
            _pct(b["accuracy"]),
            _pct(b["confidence"]),
            "–" if b["gap"] is None else f"{b['gap'] * 100:+.1f}",
        ]
        for b in cal["bins"]
        if b["count"]
    ]
    pc = ev["probability_check"]
    sections.append(
        (
            "calibration",
            "Calibration",
            [
                (
                    "p",
                    "The softmax output is read as a probability. It is a distribution (each row in [0, 1], "
                    f"summing to 1 within {pc['max_abs_sum_error']:.1e}: "
                    f"{'yes' if pc['is_distribution'] else 'NO'}); whether it is a calibrated probability is what "
                    "the reliability diagram shows: of the predictions made with confidence p, a share p should "
                    "be right.",
                ),
                (
                    "table",
                    ["", "value"],
                    [
                        ["expected calibration error (ECE)", _pct(cal["ece"], 2)],
                        ["maximum calibration error (MCE)", _pct(cal["mce"], 2)],
                        ["mean confidence", _pct(cal["mean_confidence"], 2)],
                        ["accuracy", _pct(cal["accuracy"], 2)],
                        ["bins", str(cal["n_bins"])],
                    ],
                    None,
                ),
                ("fig", "reliability", "Reliability diagram: bars below the diagonal are over-confident bins."),
                (
                    "table",
                    ["confidence bin", "images", "accuracy", "mean confidence", "confidence − accuracy (points)"],
                    bin_rows,
                    None,
                ),
            ],
        )
    )

    # Mistakes
    blocks = [("fig", "mistakes", "The most confident mistakes: true class, predicted class and its probability.")]
    if mistakes:
        blocks.append(
            (
                "table",
                ["image index", "true", "predicted", "probability"],
                [[str(m["index"]), m["true"], m["predicted"], _pct(m["probability"])] for m in mistakes],
                None,
            )
        )
    sections.append(("mistakes", "Most confident mistakes", blocks))

    # Data & augmentation
    ds = dict(config.get("dataset") or {})
    dinfo = ev.get("dataset", {})
    split_cfg = ds.get("split") or {}
    data_rows = [
        ["dataset", str(ds.get("name", dinfo.get("name", "?")))],
        ["source", str(ds.get("source", dinfo.get("source", "?")))],
        ["checksum (run)", ds.get("checksum") or "–"],
        ["checksum (data evaluated)", dinfo.get("checksum") or "–"],
        ["classes", ", ".join(classes)],
        ["train / validation / test images", " / ".join(_num(ds.get(k)) for k in ("n_train", "n_val", "n_test"))],
        [
            "validation split",
            f"{_pct(split_cfg.get('val_fraction', recipe.val_fraction), 0)} of the training set, "
            f"seed {split_cfg.get('seed', recipe.seed)}, "
            f"{'stratified' if split_cfg.get('stratified', recipe.stratified_split) else 'random'}",
        ],
        ["evaluated split", f"{split} ({ev['n']:,} images)"],
        [
            "scaling",
            recipe.scaling
            + (
                f" (mean {_num(run.normalization[0])}, std {_num(run.normalization[1])})"
                if run.normalization[0]
                else ""
            ),
        ],
        ["augmentation", _augment_text(recipe)],
    ]
    if dinfo.get("checksum_matches_run") is False:
        data_rows.append(["warning", "the data evaluated is not the data the run was trained on (checksums differ)"])
    sections.append(
        (
            "data",
            "Data and augmentation",
            [
                ("table", ["", "value"], data_rows, None),
                ("fig", "samples", "Sample training images per class (the talk's image 2)."),
                (
                    "fig",
                    "augment",
                    "One training image and four random augmentations with the recipe's settings (the talk's image 3).",
                ),
            ],
        )
    )

    # Config
    sections.append(
        (
            "config",
            "Config",
            [
                (
                    "p",
                    f"Full recipe as stored in config.json (seed {config.get('seed', recipe.seed)}). Command: "
                    f"{config.get('command', '–')}",
                ),
                ("table", ["key", "value", "note"], _config_rows(recipe), None),
            ],
        )
    )

    # Machine and timings
    mach = config.get("machine") or {}
    mach_rows = [[k, _num(v)] for k, v in mach.items()]
    mach_rows += [[f"version: {k}", str(v)] for k, v in (config.get("versions") or {}).items()]
    time_rows = [
        [PHASES.get(k, k.replace("_seconds", "").replace("_", " ")), _seconds(v)]
        for k, v in timings.items()
        if isinstance(v, (int, float))
    ]
    sections.append(
        (
            "machine",
            "Machine and wall time",
            [
                ("table", ["", "value"], mach_rows or [["machine", "not recorded"]], None),
                ("p", "Wall time per phase:"),
                ("table", ["phase", "time"], time_rows or [["–", "not recorded"]], None),
            ],
        )
    )
    return title, sections


def _augment_text(recipe: Any) -> str:
    if recipe.augment == "keras":
        return (
            f"Keras ImageDataGenerator: rotation ±{recipe.rotation_range:g}°, shift ±{recipe.width_shift_range:g} "
            f"(width) / ±{recipe.height_shift_range:g} (height), horizontal flip "
            f"{'on' if recipe.horizontal_flip else 'off'}, fill nearest"
        )
    if recipe.augment == "flip_translate":
        return (
            f"flip + translate: random shift up to {recipe.translate_pad} px (reflect padding), horizontal flip "
            f"{'alternating per epoch' if recipe.alternate_flip else 'random' if recipe.horizontal_flip else 'off'}"
        )
    return "none"


# -- renderers ------------------------------------------------------------------------------------------------

CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1d1d1f;max-width:1180px;
margin:0 auto;padding:24px 28px 64px;line-height:1.45;background:#fff}
h1{font-size:1.6em;margin:.2em 0 .1em}
h2{font-size:1.25em;margin-top:2em;padding-bottom:.25em;border-bottom:2px solid #e5e5ea}
nav{font-size:.9em;margin:.6em 0 1.2em}nav a{margin-right:1em;color:#0b62c4;text-decoration:none}
table{border-collapse:collapse;margin:.8em 0;font-size:.88em}
th,td{padding:4px 10px;border-bottom:1px solid #e5e5ea;text-align:left;vertical-align:top}
th{background:#f5f5f7;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.drop td{background:#f3f3f3}tr.best td:first-child{font-weight:700}tr.stop td{background:#fdecea}
tr.total td{font-weight:600;background:#fafafa}
figure{margin:1.2em 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555;margin-top:.3em}ul{padding-left:1.3em}li{margin:.3em 0}
.meta{color:#666;font-size:.9em}
"""


def _is_num(s: str) -> bool:
    t = s.replace(",", "").replace("%", "").replace(" s", "").replace("+", "").replace("−", "-").strip()
    try:
        float(t)
        return True
    except ValueError:
        return False


def _numeric_columns(rows: list[list[str]]) -> set[int]:
    """Columns (after the first, which names the row) whose cells are all numbers: right-aligned."""
    if not rows:
        return set()
    return {j for j in range(1, len(rows[0])) if all(j < len(r) and (_is_num(r[j]) or r[j] == "–") for r in rows)}


def render_html(title: str, sections: list, images: dict[str, bytes], meta: str) -> str:
    """One self-contained HTML file: inline CSS, images as base64 data URIs, no scripts, no external links."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">{e(meta)}</p>',
        "<nav>" + "".join(f'<a href="#{e(a)}">{e(h)}</a>' for a, h, _ in sections) + "</nav>",
    ]
    for anchor, heading, blocks in sections:
        out.append(f'<section id="{e(anchor)}"><h2>{e(heading)}</h2>')
        for b in blocks:
            kind = b[0]
            if kind == "p":
                out.append(f"<p>{e(b[1])}</p>")
            elif kind == "ul":
                out.append("<ul>" + "".join(f"<li>{e(t)}</li>" for t in b[1]) + "</ul>")
            elif kind == "table":
                _, header, rows, row_classes = b
                numeric = _numeric_columns(rows)
                out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr></thead><tbody>")
                for i, row in enumerate(rows):
                    cls = row_classes[i] if row_classes else ""
                    cells = "".join(
                        f'<td class="n">{e(c)}</td>' if j in numeric else f"<td>{e(c)}</td>" for j, c in enumerate(row)
                    )
                    out.append(f'<tr class="{e(cls)}">{cells}</tr>' if cls else f"<tr>{cells}</tr>")
                out.append("</tbody></table>")
            elif kind == "fig":
                _, key, caption = b
                if key in images:
                    data = base64.b64encode(images[key]).decode("ascii")
                    out.append(
                        f'<figure><img src="data:image/png;base64,{data}" alt="{e(caption)}">'
                        f"<figcaption>{e(caption)}</figcaption></figure>"
                    )
        out.append("</section>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def _md_cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list, figures: dict[str, str], meta: str) -> str:
    """The same content as Markdown, figures linked relative to the run folder (plots/*.png)."""
    out = [f"# {title}", "", f"_{meta}_", ""]
    for _, heading, blocks in sections:
        out += [f"## {heading}", ""]
        for b in blocks:
            kind = b[0]
            if kind == "p":
                out += [b[1], ""]
            elif kind == "ul":
                out += [f"- {t}" for t in b[1]] + [""]
            elif kind == "table":
                _, header, rows, _cls = b
                numeric = _numeric_columns(rows)
                out.append("| " + " | ".join(_md_cell(h) or " " for h in header) + " |")
                out.append("|" + "|".join(" ---: " if i in numeric else " --- " for i in range(len(header))) + "|")
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
                out.append("")
            elif kind == "fig":
                _, key, caption = b
                if key in figures:
                    out += [f"![{_md_cell(caption)}]({figures[key]})", "", f"_{caption}_", ""]
    return "\n".join(out)


# -- entry point -----------------------------------------------------------------------------------------------


def make_figures(run: Any, ev: dict[str, Any], extras: dict[str, Any], plots_dir: Path) -> tuple[dict[str, Path], list]:
    """Draw and save every figure; returns ({key: path}, the mistakes listing)."""
    import matplotlib

    dataset = extras["dataset"]
    classes = ev["classes"]
    paths: dict[str, Path] = {}
    mistakes: list = []
    test = {"accuracy": ev["accuracy"], "loss": ev["loss"]} if ev.get("split", "test") == "test" else None
    with matplotlib.rc_context(STYLE):
        drawers: list[tuple[str, Callable[[], Any]]] = []
        if run.history:
            drawers.append(("curves", lambda: plot_curves(run.history, run.metrics, test)))
            drawers.append(("lr", lambda: plot_lr(run.history)))
        drawers += [
            ("confusion", lambda: plot_confusion(ev)),
            ("per_class", lambda: plot_per_class(ev)),
            ("reliability", lambda: plot_reliability(ev)),
            ("samples", lambda: plot_samples(dataset.x_train, dataset.y_train, classes, seed=run.recipe.seed)),
            (
                "augment",
                lambda: plot_augment(dataset.x_train, dataset.y_train, classes, run.recipe, seed=run.recipe.seed),
            ),
        ]
        for key, draw in drawers:
            fig = draw()
            _save(fig, plots_dir / FIGURES[key])
            paths[key] = plots_dir / FIGURES[key]
        fig, mistakes = plot_mistakes(extras, classes)
        _save(fig, plots_dir / FIGURES["mistakes"])
        paths["mistakes"] = plots_dir / FIGURES["mistakes"]
    return paths, mistakes


def build_report(
    run_dir: Path,
    data_dir: Path | None = None,
    dataset: Any = None,
    split: str = "test",
    logits: Any = None,
) -> dict[str, Any]:
    """Evaluate a run, write plots/*.png, report.html and report.md, merge into metrics.json; return metrics."""
    from cifarlab.evaluate import evaluate_run, load_run_dataset
    from cifarlab.runs import METRICS, load_run, write_json

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    t0 = time.perf_counter()
    if dataset is None:
        dataset = load_run_dataset(run, data_dir)
    ev, extras = evaluate_run(run_dir, split=split, dataset=dataset, logits=logits)
    t1 = time.perf_counter()
    paths, mistakes = make_figures(run, ev, extras, run_dir / PLOTS)
    t2 = time.perf_counter()
    reading = plain_reading(ev, run.history, run.metrics)
    timings = dict(run.metrics.get("timings") or {})
    timings["report_evaluate_seconds"] = t1 - t0
    timings["report_plots_seconds"] = t2 - t1
    title, sections = build_sections(run, ev, reading, mistakes, timings)
    meta = (
        f"Run folder {run_dir.name}; report written {time.strftime('%Y-%m-%d %H:%M:%S')}; "
        f"cifarlab {(run.config.get('versions') or {}).get('cifarlab', '?')}."
    )
    images = {k: p.read_bytes() for k, p in paths.items()}
    rel = {k: f"{PLOTS}/{p.name}" for k, p in paths.items()}
    (run_dir / REPORT_HTML).write_text(render_html(title, sections, images, meta), encoding="utf-8")
    (run_dir / REPORT_MD).write_text(render_markdown(title, sections, rel, meta), encoding="utf-8")

    # Merge: training's keys stay as they are; the evaluation and the report's extras are added.
    metrics = dict(run.metrics)
    metrics["evaluation"] = ev
    for key in ("accuracy", "loss"):
        metrics.setdefault(f"{split}_{key}", ev[key])
    metrics[f"{split}_top5_accuracy"] = ev["top5_accuracy"]
    metrics[f"{split}_ece"] = ev["calibration"]["ece"]
    metrics[f"{split}_macro_f1"] = ev["macro_avg"]["f1"]
    metrics["history"] = run.history
    metrics["run"] = {
        k: run.config.get(k) for k in ("recipe", "seed", "dataset", "normalization", "machine", "versions", "command")
    }
    metrics["report"] = {
        "html": REPORT_HTML,
        "markdown": REPORT_MD,
        "plots": rel,
        "reading": reading,
        "most_confident_mistakes": mistakes,
        "timings": {"evaluate_seconds": t1 - t0, "plots_seconds": t2 - t1, "total_seconds": time.perf_counter() - t0},
    }
    write_json(run_dir / METRICS, metrics)
    return metrics


def report_paths(run_dir: Path) -> list[Path]:
    """The files `build_report` writes, for printing."""
    run_dir = Path(run_dir)
    return [run_dir / REPORT_HTML, run_dir / REPORT_MD, run_dir / "metrics.json", run_dir / PLOTS]
