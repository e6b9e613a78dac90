"""The report's content: a `Document` of sections made of neutral blocks (paragraphs, lists, tables,
figures). The HTML and Markdown renderers walk the same document, so both files say the same thing.
One short function per section; every text that comes from data (class names, file names, config values)
is a plain string here and escaped by the renderer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cifarlab.evaluate import EvalResult, dataset_warning
from cifarlab.report.common import History, has_val, kept_epoch, num, pct, row, seconds

# -- the document model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    row_classes: tuple[str, ...] | None = None  # CSS classes per row (drop, stop, best, total)


@dataclass(frozen=True)
class Figure:
    key: str  # a key of cifarlab.report.figures.FIGURES
    caption: str


Block = Paragraph | Bullets | Table | Figure


@dataclass(frozen=True)
class Section:
    anchor: str
    heading: str
    blocks: tuple[Block, ...]


@dataclass(frozen=True)
class Document:
    title: str
    meta: str
    sections: tuple[Section, ...]
    warnings: tuple[str, ...] = field(default=())  # shown first, in a box above everything else


def table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None) -> Table:
    return Table(tuple(header), tuple(tuple(r) for r in rows), tuple(row_classes) if row_classes else None)


def section(anchor: str, heading: str, *blocks: Block) -> Section:
    return Section(anchor, heading, tuple(blocks))


# -- the sections --------------------------------------------------------------------------------------------

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


def summary_section(run: Any, ev: EvalResult, reading: list[str], timings: dict[str, Any]) -> Section:
    recipe, history, metrics = run.recipe, run.history, run.metrics
    split = ev.split_name
    kept = kept_epoch(history, metrics)
    kept_row = row(history, kept)
    rows = [
        ["recipe", recipe.name],
        [f"{split} accuracy", pct(ev.accuracy, 2)],
        [f"{split} top-{ev.top_k} accuracy", pct(ev.top5, 2)],
        [f"{split} loss", f"{ev.loss:.4f}"],
        ["macro F1", f"{ev.macro_avg.f1:.4f}"],
        ["expected calibration error", pct(ev.calibration.ece, 2)],
    ]
    if kept_row:
        rows.append([f"train accuracy (epoch {kept})", pct(kept_row.get("accuracy"), 2)])
        if kept_row.get("val_accuracy") is not None:
            rows.append([f"validation accuracy (epoch {kept})", pct(kept_row.get("val_accuracy"), 2)])
    if history:
        rows.append(["epochs run", str(len(history))])
    if timings.get("train_seconds") is not None:
        rows.append(["training wall time", seconds(timings["train_seconds"])])
    trained = metrics.get(f"{split}_accuracy")
    if isinstance(trained, float) and abs(trained - ev.accuracy) > 5e-4:
        rows.append([f"{split} accuracy measured at the end of training", pct(trained, 2)])
    return section(
        "summary",
        "Summary",
        Paragraph(recipe.description or f"Recipe {recipe.name}."),
        table(["", "value"], rows),
        Paragraph("Reading of the results (computed from the numbers below):"),
        Bullets(tuple(reading)),
    )


def _event_text(r: dict[str, Any]) -> str:
    names = {"best": "best", "early_stop": "early stop", "restored_best": "best weights restored"}
    out = []
    for e in r.get("events") or []:
        if e == "lr_reduced":
            out.append(f"LR → {r['new_lr']:.3g} after this epoch" if r.get("new_lr") else "LR reduced after this epoch")
        else:
            out.append(names.get(e, e))
    return ", ".join(out)


def _epoch_row_class(r: dict[str, Any]) -> str:
    css = {"lr_reduced": "drop", "early_stop": "stop", "best": "best"}
    return " ".join(sorted(css[e] for e in set(r.get("events") or []) if e in css))


def training_section(history: History) -> Section:
    if not history:
        return section("training", "Training", Paragraph("This run has no training history (history.json is missing)."))
    val = has_val(history)
    header = ["epoch", "loss", "accuracy"] + (["val_loss", "val_accuracy"] if val else [])
    header += ["learning rate", "time", "events"]
    rows = []
    for r in history:
        cells = [str(r["epoch"]), num(r.get("loss"), "loss"), num(r.get("accuracy"), "accuracy")]
        if val:
            cells += [num(r.get("val_loss"), "val_loss"), num(r.get("val_accuracy"), "val_accuracy")]
        cells += [f"{float(r['lr']):.3g}", f"{float(r.get('epoch_seconds') or 0):.1f} s", _event_text(r)]
        rows.append(cells)
    return section(
        "training",
        "Training",
        Paragraph(
            "Table 1: one row per epoch; rows where the LR was reduced, where training stopped and "
            "the best epochs are marked."
        ),
        table(header, rows, [_epoch_row_class(r) for r in history]),
        Figure(
            "curves",
            "Accuracy and loss per epoch (the talk's figures 3 and 4). Dashed grey: LR "
            "reduced; red: early stop; star: the epoch whose weights were kept.",
        ),
        Figure("lr", "Learning rate per epoch."),
    )


def results_section(run: Any, ev: EvalResult) -> Section:
    split = ev.split_name
    inf = ev.inference
    prf = ("precision", "recall", "f1")
    rows = [
        ["images", f"{ev.n:,}"],
        ["accuracy", pct(ev.accuracy, 2)],
        ["error rate", pct(ev.error_rate, 2)],
        [f"top-{ev.top_k} accuracy", pct(ev.top5, 2)],
        ["balanced accuracy", pct(ev.balanced_accuracy, 2)],
        ["loss (cross-entropy)", f"{ev.loss:.4f}"],
        ["macro precision / recall / F1", " / ".join(f"{getattr(ev.macro_avg, m):.4f}" for m in prf)],
        ["weighted precision / recall / F1", " / ".join(f"{getattr(ev.weighted_avg, m):.4f}" for m in prf)],
        ["expected calibration error", pct(ev.calibration.ece, 2)],
        ["test-time augmentation", str(inf.tta if inf else run.recipe.tta)],
        [
            "inference",
            f"{inf.device}, precision {inf.precision} ({inf.dtype}), batch {inf.batch_size}, "
            f"{seconds(inf.predict_seconds)}"
            if inf
            else "?, precision ? (?), batch ?, –",
        ],
    ]
    return section(f"{split}-results", f"{split.capitalize()} results", table(["metric", "value"], rows))


def per_class_section(ev: EvalResult) -> Section:
    def cells(label: str, m: Any) -> list[str]:
        return [label, f"{m.precision:.4f}", f"{m.recall:.4f}", f"{m.f1:.4f}", f"{m.support:,}"]

    rows = [cells(c, m) for c, m in ev.per_class.items()]
    rows += [cells("macro avg", ev.macro_avg), cells("weighted avg", ev.weighted_avg)]
    return section(
        "per-class",
        "Per-class precision, recall and F1",
        Paragraph(
            "Table 2: precision = share of the images predicted as the class that are right; "
            "recall = share of the class's images found; support = images of the class."
        ),
        table(["class", "precision", "recall", "F1", "support"], rows, [""] * len(ev.classes) + ["total", "total"]),
        Figure("per_class", "Precision, recall and F1 per class (table 2)."),
    )


def confusions_section(ev: EvalResult) -> Section:
    classes = list(ev.classes)
    conf_rows = [
        [c, f"{ev.per_class[c].recall:.0%}", ", ".join(f"{o} {s:.0%}" for o, s in ev.top_confusions[c]) or "–"]
        for c in classes
    ]
    blocks: list[Block] = [
        Figure(
            "confusion",
            "Confusion matrix (the talk's table 5): rows are the true class, columns the predicted "
            "one; colour is the share of the true class, numbers are counts.",
        ),
        Paragraph("Each class's most frequent confusions (share of that class's images):"),
        table(["true class", "correct", "most often taken for"], conf_rows),
    ]
    if ev.confused_pairs:
        blocks.append(Paragraph("Class pairs mistaken for each other most often (both directions):"))
        pair_rows = [[f"{p.a} ↔ {p.b}", f"{p.count:,}", f"{p.a_to_b:,}", f"{p.b_to_a:,}"] for p in ev.confused_pairs]
        blocks.append(table(["pair", "mistakes", "a → b", "b → a"], pair_rows))
    if len(classes) <= 20:
        cm = ev.confusion
        blocks.append(Paragraph("Confusion matrix counts (rows: true class, columns: predicted class):"))
        blocks.append(
            table(
                ["true \\ predicted", *classes],
                [[c, *[f"{int(v):,}" for v in cm[i]]] for i, c in enumerate(classes)],
            )
        )
    return section("confusions", "Confusions", *blocks)


def calibration_section(ev: EvalResult) -> Section:
    cal = ev.calibration
    pc = ev.probability_check
    bin_rows = [
        [
            f"{b.lower:.2f}–{b.upper:.2f}",
            f"{b.count:,}",
            pct(b.accuracy),
            pct(b.confidence),
            "–" if b.gap is None else f"{b.gap * 100:+.1f}",
        ]
        for b in cal.bins
        if b.count
    ]
    return section(
        "calibration",
        "Calibration",
        Paragraph(
            "The softmax output is read as a probability. It is a distribution (each row in [0, 1], "
            f"summing to 1 within {pc.max_abs_sum_error:.1e}: "
            f"{'yes' if pc.is_distribution else 'NO'}); whether it is a calibrated probability is what "
            "the reliability diagram shows: of the predictions made with confidence p, a share p should "
            "be right."
        ),
        table(
            ["", "value"],
            [
                ["expected calibration error (ECE)", pct(cal.ece, 2)],
                ["maximum calibration error (MCE)", pct(cal.mce, 2)],
                ["mean confidence", pct(cal.mean_confidence, 2)],
                ["accuracy", pct(cal.accuracy, 2)],
                ["bins", str(cal.n_bins)],
            ],
        ),
        Figure("reliability", "Reliability diagram: bars below the diagonal are over-confident bins."),
        table(["confidence bin", "images", "accuracy", "mean confidence", "confidence − accuracy (points)"], bin_rows),
    )


def mistakes_section(mistakes: list[dict[str, Any]]) -> Section:
    blocks: list[Block] = [
        Figure("mistakes", "The most confident mistakes: true class, predicted class and its probability.")
    ]
    if mistakes:
        rows = [[str(m["index"]), m["true"], m["predicted"], pct(m["probability"])] for m in mistakes]
        blocks.append(table(["image index", "true", "predicted", "probability"], rows))
    return section("mistakes", "Most confident mistakes", *blocks)


def data_section(run: Any, ev: EvalResult) -> Section:
    from cifarlab.augment import describe_augment

    recipe = run.recipe
    ds = dict(run.config.get("dataset") or {})
    dinfo = ev.dataset
    split_cfg = ds.get("split") or {}
    rows = [
        ["dataset", str(ds.get("name", dinfo.name if dinfo else "?"))],
        ["source", str(ds.get("source", dinfo.source if dinfo else "?"))],
        ["checksum (run)", ds.get("checksum") or "–"],
        ["checksum (data evaluated)", (dinfo.checksum if dinfo else "") or "–"],
        ["classes", ", ".join(ev.classes)],
        ["train / validation / test images", " / ".join(num(ds.get(k)) for k in ("n_train", "n_val", "n_test"))],
        [
            "validation split",
            f"{pct(split_cfg.get('val_fraction', recipe.val_fraction), 0)} of the training set, "
            f"seed {split_cfg.get('seed', recipe.seed)}, "
            f"{'stratified' if split_cfg.get('stratified', recipe.stratified_split) else 'random'}",
        ],
        ["evaluated split", f"{ev.split_name} ({ev.n:,} images)"],
        [
            "scaling",
            recipe.scaling
            + (f" (mean {num(run.normalization[0])}, std {num(run.normalization[1])})" if run.normalization[0] else ""),
        ],
        ["augmentation", describe_augment(recipe)],
    ]
    if ev.dataset_mismatch:
        rows.append(["warning", "the data evaluated is not the data the run was trained on (checksums differ)"])
    return section(
        "data",
        "Data and augmentation",
        table(["", "value"], rows),
        Figure("samples", "Sample training images per class (the talk's image 2)."),
        Figure(
            "augment",
            "One training image and four random augmentations with the recipe's settings (the talk's image 3).",
        ),
    )


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


def config_section(run: Any) -> Section:
    config, recipe = run.config, run.recipe
    return section(
        "config",
        "Config",
        Paragraph(
            f"Full recipe as stored in config.json (seed {config.get('seed', recipe.seed)}). Command: "
            f"{config.get('command', '–')}"
        ),
        table(["key", "value", "note"], _config_rows(recipe)),
    )


def machine_section(run: Any, timings: dict[str, Any]) -> Section:
    config = run.config
    mach_rows = [[k, num(v)] for k, v in (config.get("machine") or {}).items()]
    mach_rows += [[f"version: {k}", str(v)] for k, v in (config.get("versions") or {}).items()]
    time_rows = [
        [PHASES.get(k, k.replace("_seconds", "").replace("_", " ")), seconds(v)]
        for k, v in timings.items()
        if isinstance(v, (int, float))
    ]
    return section(
        "machine",
        "Machine and wall time",
        table(["", "value"], mach_rows or [["machine", "not recorded"]]),
        Paragraph("Wall time per phase:"),
        table(["phase", "time"], time_rows or [["–", "not recorded"]]),
    )


def build_document(
    run: Any, ev: EvalResult, reading: list[str], mistakes: list[dict[str, Any]], timings: dict[str, Any], meta: str
) -> Document:
    """The whole report; a dataset mismatch is the first thing it says."""
    warning = dataset_warning(ev)
    return Document(
        title=f"cifarlab run report: {run.path.name}",
        meta=meta,
        warnings=(warning[0].upper() + warning[1:] + ".",) if warning else (),
        sections=(
            summary_section(run, ev, reading, timings),
            training_section(run.history),
            results_section(run, ev),
            per_class_section(ev),
            confusions_section(ev),
            calibration_section(ev),
            mistakes_section(mistakes),
            data_section(run, ev),
            config_section(run),
            machine_section(run, timings),
        ),
    )
