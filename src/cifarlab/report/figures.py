"""The report's figures: matplotlib's object API on the Agg canvas (no pyplot state, no display needed),
one shared style, so they look alike and can be drawn from any thread. Figures are drawn to PNG bytes in
memory at twice their display size (`SAVE_DPI` = 2 x `DPI`), so they stay sharp on high-resolution screens; the
HTML shows them at 1x (`width`/`height` attributes). `cifarlab.report.build` writes them.

Image grids (galleries, top losses, mistakes) place their images by hand on one axes instead of an axes per
image in the constrained layout: with dozens of small axes, building and laying them out was most of the time.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from cifarlab.evaluate import EvalResult, Predictions
from cifarlab.report.common import History, Steps, events, has_val, most_damaging, num, row
from cifarlab.report.insights import Insights, Item
from cifarlab.text import plural

FIGURES = {
    "curves": "curves.png",
    "lr": "lr_schedule.png",
    "confusion": "confusion_matrix.png",
    "per_class": "per_class.png",
    "reliability": "reliability.png",
    "mistakes": "mistakes.png",
    "samples": "samples.png",
    "augment": "augmentation.png",
    "steps": "steps.png",  # with steps.csv: per-step LR and loss (replaces "lr")
    "pair_1": "confused_pair_1.png",
    "pair_2": "confused_pair_2.png",
    "pair_3": "confused_pair_3.png",
    "top_losses": "top_losses.png",
    "uncertain_correct": "least_certain_correct.png",
    "uncertain_wrong": "least_certain_wrong.png",
    "robustness": "robustness.png",  # with eval_corruptions.json
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
    # Names come from the data: "$\alpha$" stays those characters, and "$\foo$" cannot crash the report.
    "text.parse_math": False,
}
TRAIN, VAL, TEST = "#1f77b4", "#ff7f0e", "#2ca02c"
DROP, STOP, BEST = "#7f7f7f", "#d62728", "#9467bd"
PRF = ("#4c72b0", "#dd8452", "#55a868")  # precision, recall, F1
DPI = 100  # layout resolution: the size a figure is shown at (CSS pixels)
SCALE = 2  # PNGs are saved at SCALE x DPI
SAVE_DPI = DPI * SCALE


def _figure(width: float, height: float, layout: Literal["constrained"] | None = "constrained") -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Any) -> bytes:
    """The figure as PNG bytes, drawn in memory: the report writes them with `cifarlab.files`."""
    buf = io.BytesIO()
    # No "Software" text chunk: smaller, reproducible PNGs without a URL inside.
    fig.savefig(buf, format="png", dpi=SAVE_DPI, metadata={"Software": None})
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


def smooth(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first points average what there is so far)."""
    v = np.asarray(values, dtype=np.float64)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    n = np.arange(1, len(v) + 1)
    lo = np.maximum(0, n - window)
    return (c[n] - c[lo]) / (n - lo)


def plot_steps(steps: Steps, history: History) -> Any:
    """Per-step training loss (raw and smoothed) and learning rate from steps.csv: warmup, per-step decay and
    spikes that the per-epoch means hide. Epoch boundaries are marked; LR drops of a plateau schedule too."""
    fig = _figure(11, 4.0)
    ax_loss, ax_lr = fig.subplots(1, 2)
    x = np.asarray(steps["step"])
    loss = np.asarray(steps["loss"])
    n = len(x)
    window = max(1, min(200, n // 25))
    ax_loss.plot(x, loss, lw=0.6 if window > 1 else 1.4, alpha=0.35 if window > 1 else 1.0, color=TRAIN,
                 label="loss per step")  # fmt: skip
    if window > 1:
        ax_loss.plot(x, smooth(loss, window), lw=1.8, color=TRAIN, label=f"moving mean ({window} steps)")
    ax_lr.plot(x, steps["lr"], lw=1.8, color=VAL, label="learning rate per step")
    epochs = np.asarray(steps["epoch"])
    starts = x[np.flatnonzero(np.diff(epochs) != 0) + 1] if n else np.array([])
    if len(starts) <= 60:
        for ax in (ax_loss, ax_lr):
            for i, s0 in enumerate(starts):
                ax.axvline(s0, color="#bbbbbb", lw=0.6, zorder=0, label="epoch start" if i == 0 else None)
    lrs = np.asarray(steps["lr"])
    if n and lrs.min() > 0 and lrs.max() / lrs.min() > 20:
        ax_lr.set_yscale("log")
    fin = loss[np.isfinite(loss)]
    if len(fin) > 20:  # a few huge first-step losses would squash the rest of the curve
        hi = float(np.quantile(fin, 0.995))
        ax_loss.set_ylim(max(0.0, float(fin.min()) * 0.9), hi * 1.1 if hi > 0 else None)
    for ax in (ax_loss, ax_lr):
        ax.set_xlabel("optimizer step")
        if n:
            ax.set_xlim(x.min(), x.max())
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title(f"Training loss per step ({n:,} steps)")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("Learning rate per step")
    ax_loss.legend(loc="upper right")
    ax_lr.legend(loc="best")
    return fig


def plot_confusion(ev: EvalResult) -> Any:
    """Confusion-matrix heatmap (the talk's table 5), text = counts. The off-diagonal cells (the mistakes) have
    their own colour scale, from 0 to the largest confusion share, so the confusions are readable; the diagonal
    (the right answers, much larger) is masked out of that scale and drawn in green on a 0-100% scale."""
    from matplotlib.colors import Normalize

    classes = list(ev.classes)
    k = len(classes)
    cm = ev.confusion
    norm = np.asarray(ev.confusion_normalized, dtype=np.float64)
    eye = np.eye(k, dtype=bool)
    off = np.ma.masked_array(norm, mask=eye)
    diag = np.ma.masked_array(norm, mask=~eye)
    off_max = float(off.max()) if k > 1 and off.count() and float(off.max()) > 0 else 1.0
    side = min(14.0, 2.8 + 0.62 * k)
    fig = _figure(side + 1.9, side)
    ax = fig.subplots()
    im = ax.imshow(off, cmap="Reds", norm=Normalize(vmin=0.0, vmax=off_max))
    im.set_label("off-diagonal")
    dim = ax.imshow(diag, cmap="Greens", norm=Normalize(vmin=0.0, vmax=1.0), alpha=0.75)
    dim.set_label("diagonal")
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
                    dark = norm[i, j] / off_max > 0.6 if i != j else False
                    ax.text(
                        j,
                        i,
                        str(cm[i, j]),
                        ha="center",
                        va="center",
                        fontsize=size,
                        fontweight="bold" if i == j else "normal",
                        color="white" if dark else "#222222",
                    )
    bar = fig.colorbar(im, ax=ax, shrink=0.8)
    bar.set_label(f"mistakes: share of the true class (0 to {off_max:.0%})")
    _percent_axis(bar.ax)
    dbar = fig.colorbar(dim, ax=ax, shrink=0.8)
    dbar.set_label("right answers (diagonal): share of the true class")
    _percent_axis(dbar.ax)
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


FEW_IN_BIN = 20  # the reliability diagram draws a bin with fewer images (or under 0.5% of them) faint


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
    # A bin of a handful of images says little (2 images can make an 81-point gap): drawn faint, so the eye goes to
    # the bins that hold the images
    limit = max(FEW_IN_BIN, math.ceil(0.005 * counts.sum()))
    few = counts < limit
    fig = _figure(6.0, 6.4)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    for sel, alpha, label in ((counts > 0) & ~few, 1.0, "accuracy in bin"), ((counts > 0) & few, 0.3, None):
        if not sel.any():
            continue
        top.bar(centers[sel], acc[sel], width, color=TRAIN, edgecolor="white", alpha=alpha, label=label)
        top.bar(
            centers[sel],
            (conf - acc)[sel],
            width,
            bottom=acc[sel],
            color=STOP,
            alpha=0.25 * alpha,
            edgecolor=STOP,
            hatch="//",
            lw=0.5,
            label="gap to mean confidence" if label else None,
        )
    top.plot([0, 1], [0, 1], "--", color="#555555", lw=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    _percent_axis(top)
    top.set_title(f"Reliability diagram (ECE {cal.ece:.2%})")
    handles, labels = top.get_legend_handles_labels()
    if ((counts > 0) & few).any():
        from matplotlib.patches import Patch

        handles.append(Patch(facecolor=TRAIN, alpha=0.3))
        labels.append(f"faint: a bin of fewer than {limit} images")
    top.legend(handles, labels, loc="upper left")
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


GridRow = tuple[str | None, list[tuple[np.ndarray, str]]]  # (heading, [(image HWC uint8, title)])


def image_grid(rows: Sequence[GridRow], title: str, cols: int, cell_w: float = 1.35, note: str | None = None) -> Any:
    """Rows of captioned images, each row with an optional heading, placed by hand (fast, no layout engine).

    Every cell is `cell_w` inches wide; an image keeps its aspect ratio; a row without images shows "none".
    One axes spans the figure in inches and every image is an artist on it: an axes per image (with its ticks,
    spines and title) made building a gallery of 20-80 images most of a report's time."""
    pad = 0.12
    title_h, note_h, head_h = 0.42, (0.3 if note else 0.0), 0.3
    specs = []  # (heading, cells, caption height, image height)
    for heading, cells in rows:
        lines = max([t.count("\n") + 1 for _, t in cells] or [1])
        aspect = max([im.shape[0] / im.shape[1] for im, _ in cells] or [1.0])
        specs.append((heading, cells, 0.05 + 0.15 * lines, (cell_w - pad) * aspect))
    height = title_h + note_h + sum((head_h if h else 0) + cap + img + 0.1 for h, _, cap, img in specs) + 0.05
    width = max(cols * cell_w + 0.1, 4.0)
    # No layout engine at all (not "none", which keeps a placeholder): savefig then skips its layout pre-draw.
    fig = _figure(width, height, layout=None)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    fig.suptitle(title, fontweight="bold", fontsize=11, y=1 - 0.08 / height, va="top")
    y = height - title_h
    if note:
        ax.text(width / 2, y - 0.12, note, ha="center", va="center", fontsize=8.5, color=STOP)
        y -= note_h
    for heading, cells, cap, img in specs:
        if heading:
            ax.text(0.05, y - head_h / 2, heading, ha="left", va="center", fontsize=9.5, fontweight="bold")
            y -= head_h
        if not cells:
            ax.text(0.05, y - cap, "none", ha="left", va="center", fontsize=9, color="#777777")
        for k, (im, text) in enumerate(cells[:cols]):
            left, w = 0.05 + k * cell_w + pad / 2, cell_w - pad
            h = w * im.shape[0] / im.shape[1]
            middle = y - cap - img / 2  # centred in the row's image band; captions in line above the band
            extent = (left, left + w, middle - h / 2, middle + h / 2)
            ax.imshow(im, interpolation="nearest", extent=extent, aspect="auto")
            ax.text(left + w / 2, y - cap + 2 / 72, text, ha="center", va="bottom", fontsize=7.2)
        y -= cap + img + 0.1
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    return fig


def _with_overlay(img: np.ndarray, over: np.ndarray | None) -> np.ndarray:
    """The image, and its saliency overlay beside it (a white 2-pixel gap) when there is one."""
    if over is None:
        return img
    gap = np.full((img.shape[0], 2, 3), 255, dtype=np.uint8)
    return np.concatenate([img, gap, over], axis=1)


def plot_pair(pair: Any, images: Any, overlays: dict[int, np.ndarray], note: str | None) -> Any:
    """One confused pair: images of a predicted as b, then b as a (the most confident first), each with
    p(true) and p(predicted) and, beside it, the Grad-CAM overlay for the predicted class."""
    rows: list[GridRow] = []
    for src, dst, items, total in ((pair.a, pair.b, pair.a_as_b, pair.n_a_as_b), (pair.b, pair.a, pair.b_as_a,
                                                                                   pair.n_b_as_a)):  # fmt: skip
        cells = [
            (
                _with_overlay(_hwc(images[it.pos]), overlays.get(it.pos)),
                f"#{it.index}: p({src}) {it.p_true:.0%}\np({dst}) {it.p_pred:.0%}",
            )  # fmt: skip
            for it in items
        ]
        shown = f"{len(items)} most confident shown" if total > len(items) else "all shown"
        count = "none" if not total else f"{plural(total, 'image')} ({shown})"
        rows.append((f"{src} shown as {dst}: {count}", cells))
    cols = max(1, max(len(r[1]) for r in rows))
    wide = any(it.pos in overlays for it in (*pair.a_as_b, *pair.b_as_a))
    sub = "image | Grad-CAM for the predicted class" if wide else "image"
    return image_grid(rows, f"{pair.a} ↔ {pair.b}, and why ({sub})", max(cols, 3), 2.3 if wide else 1.35, note)


def _cells(images: Any, items: Sequence[Item], caption: Callable[[Item], str]) -> list[tuple[np.ndarray, str]]:
    return [(_hwc(images[it.pos]), caption(it)) for it in items]


def plot_items(images: Any, items: Sequence[Item], title: str, caption: Callable[[Item], str], cols: int = 8) -> Any:
    cells = _cells(images, items, caption)
    rows: list[GridRow] = [(None, cells[i : i + cols]) for i in range(0, len(cells), cols)] or [(None, [])]
    return image_grid(rows, title, cols)


def top_loss_caption(it: Item) -> str:
    """fastai's plot_top_losses title: prediction / actual / loss / probability of the actual class."""
    return f"{it.predicted}/{it.true}\n{it.loss:.2f} / {it.p_true:.2f}"


def uncertain_caption(it: Item) -> str:
    if it.true == it.predicted:
        return f"{it.true} {it.p_pred:.0%}\nmargin {it.margin:.2f}"
    return f"true {it.true} {it.p_true:.0%}\npred {it.predicted} {it.p_pred:.0%}"


def plot_mistakes(
    preds: Predictions, classes: Sequence[str], n: int = 24, cols: int = 8
) -> tuple[Any, list[dict[str, Any]]]:
    """The `n` most confident mistakes: image, true class, predicted class and its probability."""
    probs, y, pred = preds.probs, preds.y_true, preds.y_pred
    wrong = np.flatnonzero(pred != y)
    conf = probs[wrong, pred[wrong]]
    order = wrong[np.argsort(-conf, kind="stable")][:n]
    listing = []
    cells = []
    for i in order:
        p = float(probs[i, pred[i]])
        cells.append((_hwc(preds.images[int(i)]), f"true {classes[y[i]]}\npred {classes[pred[i]]} {p:.0%}"))
        listing.append(
            {"index": int(preds.indices[i]), "true": classes[y[i]], "predicted": classes[pred[i]], "probability": p}
        )
    rows: list[GridRow] = [(None, cells[i : i + cols]) for i in range(0, len(cells), cols)] or [(None, [])]
    return image_grid(rows, "Most confident mistakes", cols), listing


def plot_robustness(robustness: dict[str, Any]) -> Any:
    """Accuracy against corruption severity, one line per corruption (severity 0: the clean images)."""
    from matplotlib import colormaps

    results = robustness["results"]
    clean = robustness.get("clean_accuracy")
    fig = _figure(9.5, 4.4)
    ax = fig.subplots()
    cmap = colormaps["tab20"]
    worst = most_damaging(robustness)
    for k, (name, by_sev) in enumerate(sorted(results.items())):
        sev = sorted(by_sev)
        xs = ([0] if clean is not None else []) + sev
        ys = ([clean] if clean is not None else []) + [by_sev[s] for s in sev]
        bold = worst is not None and name == worst[0]
        ax.plot(xs, ys, "-o", ms=3.5, lw=2.6 if bold else 1.3, color=cmap(k % 20), label=name + (" (worst)" if bold
                                                                                              else ""))  # fmt: skip
    if clean is not None:
        ax.axhline(clean, color="#333333", ls=":", lw=1.2, label=f"clean ({clean:.1%})")
    ax.axhline(robustness["mean_accuracy"], color=STOP, ls="--", lw=1.2,
               label=f"mean corrupted ({robustness['mean_accuracy']:.1%})")  # fmt: skip
    ax.set_xlabel("severity (0: clean)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.xaxis.get_major_locator().set_params(integer=True)
    _percent_axis(ax)
    ax.set_title("Accuracy under corruption, by severity")
    fig.legend(loc="outside right upper", fontsize=7.5)
    return fig


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


def make_figures(
    run: Any,
    ev: EvalResult,
    preds: Predictions,
    insights: Insights | None = None,
    steps: Steps | None = None,
    robustness: dict[str, Any] | None = None,
) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
    """Draw every figure in memory: ({key of FIGURES: PNG bytes}, the most confident mistakes listing).

    `insights` adds the confused-pair galleries, top losses and least certain grids; `steps` (steps.csv) the
    per-step curves instead of the per-epoch LR; `robustness` (eval_corruptions.json) the severity chart."""
    import matplotlib

    dataset = preds.dataset
    classes = list(ev.classes)
    images: dict[str, bytes] = {}
    test = {"accuracy": ev.accuracy, "loss": ev.loss} if ev.split_name == "test" else None
    with matplotlib.rc_context(STYLE):  # type: ignore[arg-type]
        drawers: list[tuple[str, Callable[[], Any]]] = []
        if run.history:
            drawers.append(("curves", lambda: plot_curves(run.history, run.metrics, test)))
        if steps:
            drawers.append(("steps", lambda: plot_steps(steps, run.history)))
        elif run.history:
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
        if insights is not None:
            x = preds.images
            for k, pair in enumerate(insights.pairs, start=1):
                draw_pair = functools.partial(plot_pair, pair, x, insights.overlays, insights.saliency_note)
                drawers.append((f"pair_{k}", draw_pair))
            drawers += [
                ("top_losses", lambda: plot_items(x, insights.top_losses, "Top losses: prediction/actual, "
                                                  "loss / probability of actual", top_loss_caption)),
                ("uncertain_correct", lambda: plot_items(x, insights.uncertain_correct, "Least certain right "
                                                         "answers (lowest top-1 probability)", uncertain_caption)),
                ("uncertain_wrong", lambda: plot_items(x, insights.uncertain_wrong, "Least certain mistakes "
                                                       "(lowest top-1 probability)", uncertain_caption)),
            ]  # fmt: skip
        if robustness and "results" in robustness:
            drawers.append(("robustness", lambda: plot_robustness(robustness)))
        for key, draw in drawers:
            images[key] = png_bytes(draw())
        fig, mistakes = plot_mistakes(preds, classes)
        images["mistakes"] = png_bytes(fig)
    return images, mistakes
