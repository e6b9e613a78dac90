"""The report's figures: matplotlib's object API on the Agg canvas (no pyplot state, no display needed),
one shared style, so they look alike and can be drawn from any thread. Figures are drawn to PNG bytes in
memory; `cifarlab.report.build` writes them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from cifarlab.evaluate import EvalResult, Predictions
from cifarlab.report.common import History, events, has_val, num, row

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

# -- figure style ----------------------------------------------------------------------------------------

STYLE: dict[str, Any] = {
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


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes, drawn in memory: the report writes them with `cifarlab.files`."""
    buf = io.BytesIO()
    # No "Software" text chunk: smaller, reproducible PNGs without a URL inside.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _percent_axis(ax: Any, axis: str = "y") -> None:
    from matplotlib.ticker import PercentFormatter

    getattr(ax, f"{axis}axis").set_major_formatter(PercentFormatter(1.0, decimals=0))


# -- the figures ---------------------------------------------------------------------------------------------


def plot_curves(history: History, metrics: dict[str, Any], test: dict[str, Any] | None = None) -> Any:
    """Accuracy and loss per epoch, train and validation (the talk's figures 3 and 4), with LR drops,
    the early stop and the kept (best) epoch marked and the test result as a dotted line."""
    fig = _figure(11, 4.2)
    axes = fig.subplots(1, 2)
    ep = [r["epoch"] for r in history]
    drops = events(history, "lr_reduced")
    stops = events(history, "early_stop")
    kept = metrics.get("restored_epoch") or metrics.get("best_epoch")
    for ax, key, label in ((axes[0], "accuracy", "Accuracy"), (axes[1], "loss", "Loss")):
        ax.plot(ep, [r.get(key) for r in history], "-o", ms=3.5, color=TRAIN, label=f"train {key}")
        if has_val(history):
            ax.plot(ep, [r.get(f"val_{key}") for r in history], "-o", ms=3.5, color=VAL, label=f"validation {key}")
            if kept and row(history, kept).get(f"val_{key}") is not None:
                ax.plot(
                    [kept],
                    [row(history, kept)[f"val_{key}"]],
                    "*",
                    ms=14,
                    color=BEST,
                    label=f"best epoch ({kept})",
                    zorder=5,
                )
        if test and test.get(key) is not None:
            ax.axhline(test[key], ls=":", lw=1.5, color=TEST, label=f"test {key} ({num(test[key], key)})")
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


def plot_lr(history: History) -> Any:
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
    for i, e in enumerate(events(history, "lr_reduced")):
        ax.axvline(e + 0.5, color=DROP, ls="--", lw=1, label="LR reduced" if i == 0 else None)
    for i, e in enumerate(events(history, "early_stop")):
        ax.axvline(e, color=STOP, lw=1.5, alpha=0.8, label="early stop" if i == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title("Learning-rate schedule")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return fig


def plot_confusion(ev: EvalResult) -> Any:
    """Confusion-matrix heatmap (the talk's table 5): colour = share of the true class, text = count."""
    classes = list(ev.classes)
    k = len(classes)
    cm = ev.confusion
    norm = ev.confusion_normalized
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
    ax.set_title(f"Confusion matrix ({ev.n:,} {ev.split_name} images)")
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


def plot_per_class(ev: EvalResult) -> Any:
    """Per-class precision, recall and F1 bars (the talk's table 2), overall accuracy as a line."""
    classes = list(ev.classes)
    k = len(classes)
    fig = _figure(min(40.0, max(7.0, 0.75 * k + 2)), 4.0)
    ax = fig.subplots()
    x = np.arange(k)
    w = 0.27
    for off, key, color in zip((-w, 0, w), ("precision", "recall", "f1"), PRF):
        ax.bar(
            x + off,
            [getattr(ev.per_class[c], key) for c in classes],
            w,
            color=color,
            label="F1" if key == "f1" else key,
        )
    ax.axhline(ev.accuracy, color="#333333", ls=":", lw=1.2, label=f"accuracy ({ev.accuracy:.1%})")
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


def plot_reliability(ev: EvalResult) -> Any:
    """Reliability diagram: accuracy per confidence bin against the diagonal, and how many images fall in
    each bin. A bar below the diagonal means the model is over-confident there."""
    cal = ev.calibration
    bins = cal.bins
    m = cal.n_bins
    width = 1.0 / m
    centers = np.array([(b.lower + b.upper) / 2 for b in bins])
    acc = np.array([b.accuracy if b.accuracy is not None else 0.0 for b in bins])
    conf = np.array([b.confidence if b.confidence is not None else 0.0 for b in bins])
    counts = np.array([b.count for b in bins], dtype=float)
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
    top.set_title(f"Reliability diagram (ECE {cal.ece:.2%})")
    top.legend(loc="upper left")
    bottom.bar(centers, counts / max(1, counts.sum()), width, color="#8c8c8c", edgecolor="white")
    bottom.axvline(cal.accuracy, color=TEST, lw=1.5, label=f"accuracy {cal.accuracy:.1%}")
    bottom.axvline(cal.mean_confidence, color=STOP, lw=1.5, ls="--", label=f"mean confidence {cal.mean_confidence:.1%}")
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


def plot_mistakes(
    preds: Predictions, classes: Sequence[str], n: int = 24, cols: int = 8
) -> tuple[Any, list[dict[str, Any]]]:
    """The `n` most confident mistakes: image, true class, predicted class and its probability."""
    probs, y, pred = preds.probs, preds.y_true, preds.y_pred
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
        ax.imshow(_hwc(preds.images[int(i)]))
        p = float(probs[i, pred[i]])
        ax.set_title(f"true {classes[y[i]]}\npred {classes[pred[i]]} {p:.0%}", fontsize=7.5, fontweight="normal")
        listing.append(
            {"index": int(preds.indices[i]), "true": classes[y[i]], "predicted": classes[pred[i]], "probability": p}
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


def make_figures(run: Any, ev: EvalResult, preds: Predictions) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    """Draw every figure in memory: ({key of FIGURES: PNG bytes}, the most confident mistakes listing)."""
    import matplotlib

    dataset = preds.dataset
    classes = list(ev.classes)
    images: dict[str, bytes] = {}
    test = {"accuracy": ev.accuracy, "loss": ev.loss} if ev.split_name == "test" else None
    with matplotlib.rc_context(STYLE):  # type: ignore[arg-type]
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
            images[key] = png_bytes(draw())
        fig, mistakes = plot_mistakes(preds, classes)
        images["mistakes"] = png_bytes(fig)
    return images, mistakes
