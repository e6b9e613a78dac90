"""The report's content: a `Document` of sections made of neutral blocks (paragraphs, lists, tables,
figures). The HTML and Markdown renderers walk the same document, so both files say the same thing.
One short function per section; every text that comes from data (class names, file names, config values)
is a plain string here and escaped by the renderer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from cifarlab.budget import describe_width
from cifarlab.evaluate import EvalResult, dataset_warning, top_confusion_counts
from cifarlab.registry import registered_description
from cifarlab.report.common import (
    History,
    Steps,
    corruption_mean,
    has_val,
    kept_epoch,
    last_epoch_steps,
    loss_text,
    most_damaging,
    num,
    pct,
    row,
    seconds,
)
from cifarlab.report.insights import N_TOP_LOSSES, N_UNCERTAIN, PER_DIRECTION, Insights, Item
from cifarlab.runs import run_status
from cifarlab.text import plural, stages_frozen

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


@dataclass(frozen=True)
class Details:
    """Blocks folded away in HTML (`<details>`: long tables); Markdown shows them under a small heading."""

    summary: str
    blocks: tuple[Paragraph | Bullets | Table | Figure, ...]


Block = Paragraph | Bullets | Table | Figure | Details


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


def details(summary: str, *blocks: Paragraph | Bullets | Table | Figure) -> Details:
    return Details(summary, tuple(blocks))


# -- the sections --------------------------------------------------------------------------------------------

PHASES = {
    "data_seconds": "data loading and split",
    "setup_seconds": "model setup",
    "train_seconds": "training",
    "seconds_per_epoch": "training, per epoch (mean)",
    "eval_seconds": "test evaluation after training",
    "total_seconds": "training command, total",
    "process_seconds": "process start to test accuracy (imports included)",
    "calibration_seconds": "softmax temperature fit",
    "report_evaluate_seconds": "report: evaluation",
    "report_plots_seconds": "report: figures",
    "report_saliency_seconds": "report: saliency maps",
    "report_model_seconds": "report: model FLOPs and latency",
}
# A resumed run (several training sessions): which rows time the last process only, and which all sessions.
RESUMED_PHASES = {
    "data_seconds": "data loading and split (last session only)",
    "setup_seconds": "model setup (last session only)",
    "eval_seconds": "test evaluation after training (last session only)",
    "calibration_seconds": "softmax temperature fit (last session only)",
    "total_seconds": "training command, total (last session only)",
    "process_seconds": "process start to test accuracy (last session only, imports included)",
    "train_seconds": "training (all {n} sessions)",
    "seconds_per_epoch": "training, per epoch (mean over all {n} sessions)",
    "sessions_total_seconds": "training sessions, all {n} together",
}
FOLD_EPOCHS = 12  # a per-epoch table longer than this is folded away in HTML
# Keys that say where and how often a recipe ran, not how it trains: changing them keeps a recipe "as pinned".
NOT_THE_METHOD = ("name", "description", "seed", "dataset")


def base_recipe(recipe: Any, config: dict[str, Any]) -> Any:
    """The registered recipe `recipe` derives from: the one config.json names as its base when it does, else the
    registered recipe of that name, else the longest registered name it starts with ("reference-tuned",
    "reference-trial3": `cifarlab tune` names its recipes so); None when there is none."""
    from cifarlab.recipes import RECIPES

    for key in ("base_recipe", "base"):
        name = config.get(key)
        if isinstance(name, str) and name in RECIPES:
            return RECIPES[name]
    if recipe.name in RECIPES:
        return RECIPES[recipe.name]
    prefixes = [n for n in RECIPES if recipe.name.startswith(n + "-")]
    return RECIPES[max(prefixes, key=len)] if prefixes else None


def changed_keys(recipe: Any, base: Any) -> list[str]:
    """The recipe fields whose value differs from `base`'s (all of them but `NOT_THE_METHOD`)."""
    if base is None:
        return []
    mine, theirs = recipe.to_dict(), base.to_dict()
    return [k for k, v in mine.items() if k not in NOT_THE_METHOD and k in theirs and theirs[k] != v]


def _init_rows(init: Any, recipe: Any) -> list[list[str]]:
    """A fine-tuned run says what it started from (config.json's "init", written by `cifarlab.finetune`)."""
    if not isinstance(init, dict) or not init.get("source"):
        return []
    from cifarlab.finetune import InitResult

    try:
        text = InitResult(**init).summary()
    except TypeError:  # a config.json from another version: show the source alone
        text = str(init["source"])
    rows = [["initialized from", text]]
    if recipe.freeze_stages or recipe.pretrained_lr_scale != 1.0:
        how = f"{stages_frozen(recipe.freeze_stages)}; pretrained LR x{recipe.pretrained_lr_scale:g}"
        rows.append(["fine-tuning", how])
    return rows


def budget_stop(budget: Any, history: History, steps: Steps | None) -> dict[str, Any] | None:
    """Where the `--budget` deadline stopped training: {"epoch", "steps", "of"} (steps of that epoch run, of its
    steps; from steps.csv, None when the run has none). The deadline, not the epoch count, ends such a run
    (`cifarlab.budget.TimeBudget`), so its last epoch is where it stopped."""
    if not isinstance(budget, dict) or not budget.get("budget_seconds") or not history:
        return None
    per_epoch = budget.get("steps_per_epoch")
    return {
        "epoch": int(history[-1]["epoch"]),
        "steps": last_epoch_steps(steps),
        "of": per_epoch if isinstance(per_epoch, int) else None,
    }


def _stop_text(stop: dict[str, Any]) -> str:
    if stop.get("steps") is not None and stop.get("of"):
        if stop["steps"] < stop["of"]:
            return f"stopped at the time budget ({stop['steps']} of {stop['of']} steps)"
        return f"stopped at the time budget (after all {stop['of']} steps)"
    return "stopped at the time budget"


def _budget_rows(budget: Any, history: History | None = None, steps: Steps | None = None) -> list[list[str]]:
    """A `--budget` run shows the budget against the time taken, the epochs planned against those run, and what
    the probe chose (cifarlab.budget)."""
    if not isinstance(budget, dict) or not budget.get("budget_seconds"):
        return []
    total, taken = float(budget["budget_seconds"]), budget.get("taken_seconds")
    took = ""
    if isinstance(taken, (int, float)):
        off = taken / total - 1
        side = "over" if off > 0 else "under"
        took = f"; taken {taken:.1f} s: " + ("exactly the budget" if off == 0 else f"{abs(off):.1%} {side} the budget")
    elif budget.get("resumed"):
        took = "; the run was stopped and resumed, so its time is not compared with the budget"
    epochs = budget.get("predicted_epochs")  # absent in runs from before session 9
    planned = f"~{epochs:.1f} planned" if isinstance(epochs, (int, float)) and epochs > 0 else ""
    rows = [["time budget", f"{total:g} s from {budget.get('clock', 'process start')} to the test result{took}"]]
    history = history or []
    stop = budget_stop(budget, history, steps)
    if planned or stop:
        ran = ""
        if stop:
            part = stop["steps"] is not None and stop["of"] and stop["steps"] < stop["of"]
            ran = f"{len(history)} run" + (
                f" (the last, epoch {stop['epoch']}, {stop['steps']} of its {stop['of']} steps: the deadline)"
                if part
                else ""
            )
        rows.append(["budget epochs", ", ".join(x for x in (planned, ran) if x)])
    chose = f"{describe_width(budget)}, TTA {budget.get('tta')}: {budget.get('reason', '')}"
    rows.append(["budget chose", chose])
    return rows


def _summary_text(run: Any) -> str:
    """The recipe's description, unless the run changed it: a recipe derived from a registered one (by `--set`,
    `--config` or `cifarlab tune`) says so and names what changed, instead of the base's description."""
    recipe = run.recipe
    base = base_recipe(recipe, run.config)
    changed = changed_keys(recipe, base)
    if base is None or not changed:
        return recipe.description or (base.description if base is not None else "") or f"Recipe {recipe.name}."
    own = recipe.description if recipe.description and recipe.description != base.description else ""
    keys = ", ".join(changed)
    name = f"{base.name}" if recipe.name == base.name else f"{recipe.name}, derived from {base.name},"
    derived = (
        f"Recipe {name} with {plural(len(changed), 'setting')} changed from the registered {base.name} ({keys}; "
        "the Config section marks them)."
    )
    return f"{own} {derived}" if own else derived


def _resumable(run: Any, status: str) -> bool:
    """A stopped or crashed run with a checkpoint: `cifarlab train --resume` continues it."""
    from cifarlab.runs import CHECKPOINT

    return status in ("stopped", "crashed") and (run.path / CHECKPOINT).exists()


def _resume(run: Any) -> str:
    from cifarlab.runs import resume_command

    return resume_command(run.path, (getattr(run, "config", None) or {}).get("distributed"))


def _status_rows(run: Any, status: str, message: str) -> list[list[str]]:
    """A run that has not finished says so first: how far it got, and how to continue it."""
    if status == "finished":
        return []
    done, planned = len(run.history), run.recipe.epochs
    text = f"{status}"
    if status in ("stopped", "crashed", "running"):
        text += f" after epoch {done} of {planned}" if done else f" before its first epoch ended ({planned} planned)"
    if message:
        text += f": {message.rstrip('.')}"
    rows = [["status", text]]
    if _resumable(run, status):
        rows.append(["to continue it", _resume(run)])
    elif status in ("stopped", "crashed"):
        rows.append(["to continue it", "no checkpoint was kept: train it again"])
    return rows


def _wall_time_row(run: Any, timings: dict[str, Any], status: str) -> list[list[str]]:
    """Training's wall time; a run without it (stopped, crashed) shows the sum of its finished epochs' times."""
    sessions = [s for s in timings.get("session_seconds") or [] if isinstance(s, (int, float))]
    if isinstance(timings.get("train_seconds"), (int, float)):
        text = seconds(timings["train_seconds"])
        if len(sessions) > 1:
            text += f" (all {len(sessions)} sessions: the run was resumed)"
        return [["training wall time", text]]
    epochs = [float(r["epoch_seconds"]) for r in run.history if isinstance(r.get("epoch_seconds"), (int, float))]
    if not epochs:
        return []
    return [
        [
            "training wall time",
            f"{seconds(sum(epochs))} (the sum of the times of its {plural(len(epochs), 'finished epoch')}; the run "
            f"{status} before recording its total)",
        ]
    ]


def _top_k_shown(ev: EvalResult) -> bool:
    """A top-k accuracy with k at least the number of classes is 100% by definition: not worth a row."""
    return ev.top5 is not None and ev.top_k_informative


def _epochs_text(run: Any, status: str, stop: dict[str, Any] | None) -> str:
    """Epochs run of planned, and why they differ (early stopping, the time budget, a stop)."""
    history, metrics = run.history, run.metrics
    done = len(history)
    planned = run.recipe.epochs
    if stop is not None:  # --budget: the deadline, not the epoch count, ends training
        return f"{done} (the time budget ended training)"
    text = f"{done} of {planned} planned"
    if status == "finished" and done < planned and metrics.get("stopped_epoch"):
        text += " (early stopping)"
    elif status != "finished" and done < planned:
        text += f" (the run {status})"
    return text


def summary_section(
    run: Any, ev: EvalResult, reading: list[str], timings: dict[str, Any], steps: Steps | None = None
) -> Section:
    recipe, history, metrics = run.recipe, run.history, run.metrics
    split = ev.split_name
    kept = kept_epoch(history, metrics)
    kept_row = row(history, kept)
    status, message = run_status(run)
    stop = budget_stop(metrics.get("budget"), history, steps)
    status_rows = _status_rows(run, status, message)
    rows = [
        ["recipe", recipe.name],
        *status_rows,
        *_init_rows(run.config.get("init"), recipe),
        *_budget_rows(metrics.get("budget"), history, steps),
        [f"{split} accuracy", pct(ev.accuracy, 2)],
        *([[f"{split} top-{ev.top_k} accuracy", pct(ev.top5, 2)]] if _top_k_shown(ev) else []),
        [f"{split} loss", loss_text(ev.loss)],
        ["macro F1", f"{ev.macro_avg.f1:.4f}"],
        ["expected calibration error", pct(ev.calibration.ece, 2)],
        *_temperature_rows(ev),
    ]
    if kept_row:
        rows.append([f"train accuracy (epoch {kept})", pct(kept_row.get("accuracy"), 2)])
        if kept_row.get("val_accuracy") is not None:
            rows.append([f"validation accuracy (epoch {kept})", pct(kept_row.get("val_accuracy"), 2)])
    if history:
        rows.append(["epochs run", _epochs_text(run, status, stop)])
    rows += _wall_time_row(run, timings, status)
    trained = metrics.get(f"{split}_accuracy")
    if isinstance(trained, float) and abs(trained - ev.accuracy) > 5e-4:
        rows.append([f"{split} accuracy measured at the end of training", pct(trained, 2)])
    blocks: list[Block] = []
    if status != "finished":
        how = "is still running" if status == "running" else status
        resume = _resumable(run, status)
        blocks.append(
            Paragraph(
                f"This run has not finished: it {how} after {plural(len(history), 'epoch')} of {recipe.epochs}; "
                "the numbers below are those of its last saved weights."
                + (f" Continue it with: {_resume(run)}" if resume else "")
            )
        )
    return section(
        "summary",
        "Summary",
        *blocks,
        Paragraph(_summary_text(run)),
        table(["", "value"], rows),
        Paragraph("Reading of the results (computed from the numbers below):"),
        Bullets(tuple(reading)),
    )


def _event_text(r: dict[str, Any], restored_noop: bool = False) -> str:
    names = {
        "best": "best",
        "early_stop": "early stop",
        "restored_best": "best weights restored",
        "partial_epoch": "cut short",
    }
    out = []
    for e in r.get("events") or []:
        if e == "lr_reduced":
            out.append(f"LR → {r['new_lr']:.3g} after this epoch" if r.get("new_lr") else "LR reduced after this epoch")
        elif e == "restored_best" and restored_noop:
            out.append("the last epoch was also the best: nothing to restore")
        else:
            out.append(names.get(e, e))
    return ", ".join(out)


def _epoch_row_class(r: dict[str, Any], stopped: bool = False) -> str:
    css = {"lr_reduced": "drop", "early_stop": "stop", "best": "best"}
    return " ".join(sorted({css[e] for e in set(r.get("events") or []) if e in css} | ({"stop"} if stopped else set())))


def lr_meaning(recipe: Any) -> str:
    """What Table 1's learning rate is: the trainer logs the LR of the optimizer's last param group (`Trainer.get_lr`),
    averaged over the epoch's steps; with several groups, which one that is."""
    if recipe is None:
        return "the mean over the epoch's steps of the learning rate of the optimizer's last parameter group"
    sgd_units = "in PyTorch units: lr × batch_size / 1024 / (1 + 1 / (1 − momentum))"
    if recipe.optimizer == "muon":
        what = (
            f"the SGD group's LR (the weights that are neither conv filters nor BatchNorm; {sgd_units}); the "
            "conv filters step with Muon at muon_lr and BatchNorm at bias_lr_scale × this, on the same schedule"
        )
    elif recipe.optimizer == "sgd":
        what = f"the LR of the weights other than BatchNorm ({sgd_units}); BatchNorm's is bias_lr_scale × this"
    else:
        what = f"the {recipe.optimizer} optimizer's learning rate"
    if recipe.pretrained_lr_scale != 1.0:
        what += f", of the new layers (a fine-tuned run's pretrained ones are at × {recipe.pretrained_lr_scale:g})"
    return "the mean over the epoch's steps of " + what


def _val_meaning(recipe: Any) -> str:
    """How Table 1's validation columns are measured, where that differs from the test figures (so a val_loss of
    0.88 beside a test loss of 0.36 does not read as a fault)."""
    if recipe is None:
        return ""
    loss = "cross-entropy" + (f" with label smoothing {recipe.label_smoothing:g}" if recipe.label_smoothing else "")
    if recipe.l2:
        loss += f" plus the L2 term ({recipe.l2:g} x the squared kernel weights)"
    test_views = f"TTA ({recipe.tta})" if recipe.tta != "none" else "one view"
    return (
        f" The val_ columns are measured as training measures them (as in Keras): one view of each image, the "
        f"training loss ({loss}), no softmax temperature. The test figures use {test_views} and plain "
        "cross-entropy at the run's softmax temperature (where it has one), so the two are not directly "
        "comparable; cifarlab evaluate RUN --split val measures the validation split as the test is measured."
    )


def training_section(
    history: History,
    steps: Steps | None = None,
    recipe: Any = None,
    stop: dict[str, Any] | None = None,
    restored_epoch: int | None = None,
) -> Section:
    """Table 1 and the curves; `stop` (`budget_stop`) marks the epoch where the time budget ended training,
    `restored_epoch` (metrics.json) tells a restore of the last epoch's own weights (a no-op) as such."""
    if not history:
        blocks: list[Block] = [Paragraph("This run has no training history (history.json is missing).")]
        if steps:
            blocks.append(Figure("steps", _steps_caption(steps)))
        return section("training", "Training", *blocks)
    val = has_val(history)
    header = ["epoch", "loss", "accuracy"] + (["val_loss", "val_accuracy"] if val else [])
    header += ["learning rate (mean over the epoch)", "time", "events"]
    last = int(history[-1]["epoch"])
    rows, classes = [], []
    for r in history:
        cells = [str(r["epoch"]), num(r.get("loss"), "loss"), num(r.get("accuracy"), "accuracy")]
        if val:
            cells += [num(r.get("val_loss"), "val_loss"), num(r.get("val_accuracy"), "val_accuracy")]
        events = _event_text(r, restored_noop=restored_epoch == last and int(r["epoch"]) == last)
        stopped_here = stop is not None and int(r["epoch"]) == stop["epoch"]
        if stop is not None and stopped_here:
            events = ", ".join(x for x in (events, stop.get("text") or _stop_text(stop)) if x)
        cells += [f"{float(r['lr']):.3g}", f"{float(r.get('epoch_seconds') or 0):.1f} s", events]
        rows.append(cells)
        classes.append(_epoch_row_class(r, stopped_here))
    intro = Paragraph(
        "Table 1: one row per epoch; rows where the LR was reduced, where training stopped and "
        f"the best epochs are marked. Learning rate: {lr_meaning(recipe)}." + (_val_meaning(recipe) if val else "")
    )
    t1 = table(header, rows, classes)
    epoch_blocks: tuple[Block, ...] = (
        (details(f"Table 1: per-epoch history ({len(history)} epochs)", intro, t1),)
        if len(history) > FOLD_EPOCHS
        else (intro, t1)
    )
    lr_figure = (
        Figure("steps", _steps_caption(steps))
        if steps
        else Figure("lr", "Learning rate per epoch (this run has no steps.csv: per-step curves need a newer run).")
    )
    return section(
        "training",
        "Training",
        *epoch_blocks,
        Figure(
            "curves",
            "Accuracy and loss per epoch (the talk's figures 3 and 4). Dashed grey: LR "
            "reduced; red: early stop; star: the epoch whose weights were kept.",
        ),
        lr_figure,
    )


def _steps_caption(steps: Steps) -> str:
    n = len(steps["step"])
    lrs = steps["lr"]
    return (
        f"Training loss and learning rate at each of the {n:,} optimizer steps (steps.csv): the per-epoch "
        f"means hide warmup, per-step decay and loss spikes. LR from {min(lrs):.3g} to {max(lrs):.3g}."
    )


def _inference_cell(run: Any, inf: Any) -> str:
    """Where and how the logits were computed, and how long it took: this report's own pass, or (logits reused)
    the run's evaluation at the end of training, timed there."""
    if inf is None:
        return "?, precision ? (?), batch ?, –"
    head = f"{inf.device}, precision {inf.precision} ({inf.dtype}), batch {inf.batch_size}"
    if inf.predict_seconds is not None:
        return f"{head}, {seconds(inf.predict_seconds)}"
    took = (run.metrics.get("timings") or {}).get("eval_seconds")
    return f"{head}; the logits of the run's evaluation at the end of training" + (
        f" ({seconds(took)})" if isinstance(took, (int, float)) else ""
    )


def results_section(run: Any, ev: EvalResult) -> Section:
    split = ev.split_name
    inf = ev.inference
    prf = ("precision", "recall", "f1")
    rows = [
        ["images", f"{ev.n:,}"],
        ["accuracy", pct(ev.accuracy, 2)],
        ["error rate", pct(ev.error_rate, 2)],
        *([[f"top-{ev.top_k} accuracy", pct(ev.top5, 2)]] if _top_k_shown(ev) else []),
        ["balanced accuracy", pct(ev.balanced_accuracy, 2)],
        ["loss (cross-entropy)", loss_text(ev.loss)],
        ["macro precision / recall / F1", " / ".join(f"{getattr(ev.macro_avg, m):.4f}" for m in prf)],
        ["weighted precision / recall / F1", " / ".join(f"{getattr(ev.weighted_avg, m):.4f}" for m in prf)],
        ["expected calibration error", pct(ev.calibration.ece, 2)],
        *_temperature_rows(ev),
        ["test-time augmentation", str(inf.tta if inf else run.recipe.tta)],
        ["inference", _inference_cell(run, inf)],
    ]
    return section(f"{split}-results", f"{split.capitalize()} results", table(["metric", "value"], rows))


def per_class_section(ev: EvalResult) -> Section:
    def cells(label: str, m: Any) -> list[str]:
        if not m.applicable:  # no test image of the class: its scores do not exist, and the averages leave it out
            return [label, "n/a", "n/a", "n/a", f"{m.support:,}"]
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
        Figure("per_class", "Precision, recall and F1 per class (table 2)."),
        details(
            f"Table 2: per-class precision, recall, F1 and support ({len(ev.classes)} classes)",
            table(["class", "precision", "recall", "F1", "support"], rows, [""] * len(ev.classes) + ["total", "total"]),
        ),
    )


def _confusion_cell(ev: EvalResult, c: str, counts: dict[str, list[tuple[str, int]]] | None = None) -> str:
    """'dog 13%, bird 5.1%, frog 5.0%': from the counts (`top_confusion_counts`, computed here unless given),
    rounded as the reading rounds them (`share`)."""
    from cifarlab.report.reading import share

    counts = counts if counts is not None else top_confusion_counts(ev.confusion, ev.classes)
    n = ev.per_class[c].support
    return ", ".join(f"{o} {share(k, n)}" for o, k in counts[c]) or "–"


def confusions_section(ev: EvalResult) -> Section:
    classes = list(ev.classes)
    counts = top_confusion_counts(ev.confusion, classes)
    conf_rows = [
        [c, f"{ev.per_class[c].recall:.0%}", _confusion_cell(ev, c, counts)]
        if ev.per_class[c].applicable
        else [c, "n/a", "no test image of this class"]
        for c in classes
    ]
    blocks: list[Block] = [
        Figure(
            "confusion",
            "Confusion matrix (the talk's table 5): rows are the true class, columns the predicted "
            "one; numbers are counts. The mistakes (off the diagonal) are red on their own scale, from 0 to "
            "the largest confusion, so they stay readable; the right answers (diagonal) are green on a 0–100% scale.",
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
        blocks.append(
            details(
                "Confusion matrix counts (rows: true class, columns: predicted class)",
                table(
                    ["true \\ predicted", *classes],
                    [[c, *[f"{int(v):,}" for v in cm[i]]] for i, c in enumerate(classes)],
                ),
            )
        )
    return section("confusions", "Confusions", *blocks)


def _at_temperature(ev: EvalResult) -> str:
    t = ev.inference.temperature if ev.inference else 1.0
    return (
        "" if t == 1.0 else f" (of the logits divided by the run's temperature {t:.4g}, as predict and serve give it)"
    )


def _temperature_rows(ev: EvalResult) -> list[list[str]]:
    """The softmax temperature and the ECE without it, for a run that fitted one (`cifarlab.calibrate`)."""
    inf = ev.inference
    if inf is None or inf.temperature == 1.0:
        return []
    where = f", on {inf.temperature_fitted_on}" if inf.temperature_fitted_on else ""
    if ev.split == "val" and "validation" in (inf.temperature_fitted_on or ""):
        where += ": these images, so the ECE here is optimistic"
    rows = [[f"softmax temperature (fitted after training{where})", f"{inf.temperature:.4g}"]]
    if inf.uncalibrated_ece is not None:
        rows.append(["expected calibration error without it", pct(inf.uncalibrated_ece, 2)])
    return rows


def _mce_text(cal: Any) -> str:
    """The MCE with the bin that sets it: one bin of a few images can set it far above the ECE, and a reader should
    see how much that number rests on."""
    worst = max((b for b in cal.bins if b.gap is not None), key=lambda b: abs(b.gap), default=None)
    if worst is None:
        return pct(cal.mce, 2)
    return f"{pct(cal.mce, 2)} (confidence {worst.lower:.2f}–{worst.upper:.2f}, {plural(worst.count, 'image')})"


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
            f"The softmax output{_at_temperature(ev)} is read as a probability. It is a distribution "
            "(each row in [0, 1], "
            f"summing to 1 within {pc.max_abs_sum_error:.1e}: "
            f"{'yes' if pc.is_distribution else 'NO'}); whether it is a calibrated probability is what "
            "the reliability diagram shows: of the predictions made with confidence p, a share p should "
            "be right."
        ),
        table(
            ["", "value"],
            [
                ["expected calibration error (ECE)", pct(cal.ece, 2)],
                ["maximum calibration error (MCE)", _mce_text(cal)],
                ["mean confidence", pct(cal.mean_confidence, 2)],
                ["accuracy", pct(cal.accuracy, 2)],
                ["bins", str(cal.n_bins)],
                *_temperature_rows(ev),
            ],
        ),
        Figure(
            "reliability",
            "Reliability diagram: bars below the diagonal are over-confident bins; faint bars are bins of too few "
            "images to say much (the table below has each bin's count).",
        ),
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


def _item_rows(items: list[Item]) -> list[list[str]]:
    return [
        [str(it.index), it.true, it.predicted, pct(it.p_true), pct(it.p_pred), f"{it.loss:.3f}", f"{it.margin:.3f}"]
        for it in items
    ]


ITEM_HEADER = ["image index", "true", "predicted", "p(true)", "p(predicted)", "loss", "margin"]


def why_section(ins: Insights) -> Section:
    """The top confused pairs, both directions, with the Grad-CAM overlay for the predicted class."""
    if not ins.pairs:
        return section("why", "Why: the most confused pairs", Paragraph("No mistakes: no class pair is confused."))
    blocks: list[Block] = [
        Paragraph(
            (
                "For the most confused class pair"
                if len(ins.pairs) == 1
                else f"For each of the {len(ins.pairs)} most confused class pairs"
            )
            + ": the images of one class the model "
            f"called the other (the most confident first, at most {PER_DIRECTION} per direction), with the "
            "probability of the true and of the predicted class. Beside each image, Grad-CAM (last "
            "convolution stage) shows where the evidence for the predicted class lies: red is where the "
            "model looked."
        )
    ]
    if ins.saliency_note:
        blocks.append(Paragraph(ins.saliency_note[0].upper() + ins.saliency_note[1:] + "."))
    for k, p in enumerate(ins.pairs, start=1):
        blocks.append(
            Figure(
                f"pair_{k}",
                f"{p.a} shown as {p.b} ({plural(p.n_a_as_b, 'image')}) and {p.b} shown as {p.a} ({p.n_b_as_a:,}), "
                "and why.",
            )
        )
        blocks.append(
            details(
                f"{p.a} ↔ {p.b}: the images shown",
                table(ITEM_HEADER, _item_rows([*p.a_as_b, *p.b_as_a])),
            )
        )
    return section("why", "Why: the most confused pairs", *blocks)


def top_losses_section(ins: Insights) -> Section:
    return section(
        "top-losses",
        "Top losses",
        Paragraph(
            f"The {len(ins.top_losses)} images with the highest loss (at most {N_TOP_LOSSES}; fastai's "
            "plot_top_losses), titled prediction/actual, then loss / probability of the actual class. Confident "
            "mistakes and mislabelled images end up here."
        ),
        Figure("top_losses", "Top losses: prediction/actual, loss / probability of the actual class."),
        details("Top losses: the numbers", table(ITEM_HEADER, _item_rows(ins.top_losses))),
    )


def uncertain_section(ins: Insights) -> Section:
    return section(
        "least-certain",
        "Least certain predictions",
        Paragraph(
            f"The right answers and the mistakes made with the lowest top-1 probability (at most {N_UNCERTAIN} "
            "each): where the model hesitates. Margin = top-1 minus top-2 probability."
        ),
        Figure("uncertain_correct", "Least certain right answers: class, its probability, margin to the runner-up."),
        Figure("uncertain_wrong", "Least certain mistakes: true class and its probability, predicted class and its."),
        details(
            "Least certain predictions: the numbers",
            table(ITEM_HEADER, _item_rows(ins.uncertain_correct + ins.uncertain_wrong)),
        ),
    )


def _si(x: float, unit: str = "") -> str:
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f} {prefix}{unit}"
    return f"{x:,.0f} {unit}".rstrip()


def model_section(ins: Insights) -> Section:
    m = ins.model
    if not m:
        return section("model", "Model", Paragraph(f"Model figures unavailable: {ins.model_note or 'not measured'}."))
    pc = m["parameters"]
    lat = m["latency"]
    rows = [
        ["model", m["name"]],
        ["parameters (total)", f"{pc['total']:,}"],
        ["trainable parameters", f"{pc['trainable']:,}"],
        ["non-trainable (frozen + BatchNorm statistics)", f"{pc['non_trainable']:,}"],
        ["input shape (C, H, W)", " × ".join(str(v) for v in m["input_shape"])],
        ["FLOPs per image (forward pass)", f"{m['flops_per_image']:,} ({_si(m['flops_per_image'], 'FLOP')})"],
    ]
    for value in lat.values():
        if isinstance(value, dict):
            rows.append(
                [
                    f"CPU latency, batch {value['batch']}",
                    f"{value['seconds'] * 1000:.2f} ms ({value['ms_per_image']:.3f} ms per image, "
                    f"median of {value['repeats']})",
                ]
            )
    return section(
        "model",
        "Model",
        Paragraph(
            "Size, compute and speed of the trained model. FLOPs are counted by torch's FlopCounterMode on one "
            "forward pass of one image (a multiply-add counts 2). Latency is measured while the report is built: "
            f"cifarlab.inference.predict_logits on the CPU ({lat['threads']} threads), precision "
            f"{lat['precision']} ({lat['dtype']}), {'channels_last' if lat['channels_last'] else 'contiguous'}, "
            "without test-time augmentation, after one warm-up; it depends on the machine and its load."
        ),
        table(["", "value"], rows),
    )


def robustness_section(rob: dict[str, Any]) -> Section:
    if "error" in rob:
        how = "is not shown" if "other_data" in rob else "cannot be read"
        return section("robustness", "Robustness", Paragraph(f"The corruption evaluation {how}: {rob['error']}"))
    results: dict[str, dict[int, float]] = rob["results"]
    sevs = sorted({s for r in results.values() for s in r})
    rows = []
    for name in sorted(results, key=lambda n: corruption_mean(results[n])):
        r = results[name]
        rows.append([name, *[pct(r.get(s), 1) if s in r else "–" for s in sevs], pct(corruption_mean(r), 1)])
    clean = rob.get("clean_accuracy")
    drop = rob.get("relative_drop")
    summary = [
        ["clean accuracy (same images, uncorrupted)", pct(clean, 2)],
        ["mean accuracy over every corruption and severity", pct(rob["mean_accuracy"], 2)],
        ["relative drop from clean", pct(drop, 1)],
        ["images per corruption and severity", num(rob.get("n"))],
    ]
    worst = most_damaging(rob)
    if worst:
        summary.append(["most damaging corruption (lowest mean accuracy)", f"{worst[0]} ({pct(worst[1], 1)})"])
    return section(
        "robustness",
        "Robustness",
        Paragraph(
            "Accuracy on corrupted copies of the test images (eval_corruptions.json, from `cifarlab evaluate "
            "--corruptions`), one row per corruption, worst first; columns are the severities."
        ),
        table(["", "value"], summary),
        table(["corruption", *[f"severity {s}" for s in sevs], "mean"], rows),
        Figure("robustness", "Accuracy against severity per corruption; severity 0 is the clean accuracy."),
    )


def _val_split_text(split_cfg: dict[str, Any], recipe: Any, n_val: Any) -> str:
    fraction = split_cfg.get("val_fraction", recipe.val_fraction)
    if not fraction or n_val == 0:
        return "none (every training image trains)"
    return (
        f"{pct(fraction, 0)} of the training set, seed {split_cfg.get('seed', recipe.seed)}, "
        f"{'stratified' if split_cfg.get('stratified', recipe.stratified_split) else 'random'}"
    )


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
        ["validation split", _val_split_text(split_cfg, recipe, ds.get("n_val"))],
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


def _config_rows(recipe: Any, config: dict[str, Any] | None = None) -> list[list[str]]:
    """Every recipe field; values changed from the recipe it derives from (`base_recipe`: the registered one of
    its name, or the one a tuned or renamed recipe was made from) are marked, and the registered model,
    optimizer, schedule, augmentation and callbacks carry their registered description."""
    base = base_recipe(recipe, config or {})
    base_d = base.to_dict() if base is not None else {}
    what = "recipe default" if base is None or base.name == recipe.name else f"{base.name}'s"
    changed = changed_keys(recipe, base)
    rows = []
    for key, value in recipe.to_dict().items():
        note = ""
        if base_d and key in base_d and base_d[key] != value and key != "name":
            note = f"changed ({what} {json.dumps(base_d[key])})"
        elif key == "description" and changed and base is not None and value == base.description:
            # the base's own words ("exactly as pinned") no longer describe this run
            note = f"{base.name}'s description; this run changed {plural(len(changed), 'setting')}"
        described = registered_description(key, value)  # what the registered model, optimizer... is
        if described is not None:
            note = f"{note}; {described}" if note else described
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
        details(
            f"Full config ({len(recipe.to_dict())} recipe fields)",
            table(["key", "value", "note"], _config_rows(recipe, config)),
        ),
    )


def _phase_rows(timings: dict[str, Any], temperature: float) -> tuple[list[list[str]], str | None]:
    """The wall-time rows, and for a resumed run a note on them: each session's time, and which rows time the
    last process only (data loading, setup, evaluation, the command's total) and which all sessions (training)."""
    sessions = [float(s) for s in timings.get("session_seconds") or [] if isinstance(s, (int, float))]
    resumed = len(sessions) > 1
    rows = []
    session_rows = [[f"training session {i} of {len(sessions)}", seconds(t)] for i, t in enumerate(sessions, start=1)]
    for k, v in timings.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        if k == "calibration_seconds" and temperature == 1.0:
            continue  # no temperature applies now (never fitted, or removed by `cifarlab calibrate --off`)
        if k == "sessions_total_seconds" and not resumed:
            continue  # one session: the training command's own time
        label = PHASES.get(k, k.replace("_seconds", "").replace("_", " "))
        if resumed and k in RESUMED_PHASES:
            label = RESUMED_PHASES[k].format(n=len(sessions))
        rows.append([label, seconds(v)])
        if resumed and k == "sessions_total_seconds":
            rows += session_rows  # each session beside their sum
            session_rows = []
    if not resumed:
        return rows, None
    rows += session_rows
    parts = " + ".join(f"{t:.1f}" for t in sessions)
    note = (
        f"This run was resumed: it trained in {len(sessions)} sessions ({parts} = {sum(sessions):.1f} s). Rows "
        'marked "last session only" time the process that finished the run; training covers every session.'
    )
    return rows, note


def machine_section(run: Any, timings: dict[str, Any], temperature: float = 1.0) -> Section:
    config = run.config
    mach_rows = [[k, num(v)] for k, v in (config.get("machine") or {}).items()]
    if run.metrics.get("training_step"):  # a CUDA graph, or op by op and why (older runs: absent)
        mach_rows.append(["training step", str(run.metrics["training_step"])])
    mach_rows += [[f"version: {k}", str(v)] for k, v in (config.get("versions") or {}).items()]
    time_rows, note = _phase_rows(timings, temperature)
    return section(
        "machine",
        "Machine and wall time",
        table(["", "value"], mach_rows or [["machine", "not recorded"]]),
        Paragraph("Wall time per phase:" + (f" {note}" if note else "")),
        table(["phase", "time"], time_rows or [["–", "not recorded"]]),
    )


def _stop_mark(run: Any, status: str, steps: Steps | None) -> dict[str, Any] | None:
    """Table 1's mark of where training stopped early: the time budget's deadline, or a stop or crash."""
    stop = budget_stop(run.metrics.get("budget"), run.history, steps)
    if stop is not None or not run.history or status in ("finished", "running"):
        return stop
    what = "was interrupted" if status == "stopped" else status
    return {"epoch": int(run.history[-1]["epoch"]), "text": f"the run {what} after this epoch"}


def build_document(
    run: Any,
    ev: EvalResult,
    reading: list[str],
    mistakes: list[dict[str, Any]],
    timings: dict[str, Any],
    meta: str,
    insights: Insights | None = None,
    steps: Steps | None = None,
    robustness: dict[str, Any] | None = None,
) -> Document:
    """The whole report; a dataset mismatch is the first thing it says. `insights` adds the why/top
    losses/least certain/model sections, `robustness` (eval_corruptions.json) the robustness section."""
    warning = dataset_warning(ev)
    temperature = ev.inference.temperature if ev.inference else 1.0
    stop = _stop_mark(run, run_status(run)[0], steps)
    sections = [
        summary_section(run, ev, reading, timings, steps),
        training_section(run.history, steps, run.recipe, stop, run.metrics.get("restored_epoch")),
        results_section(run, ev),
        per_class_section(ev),
        confusions_section(ev),
    ]
    if insights is not None:
        sections += [why_section(insights), top_losses_section(insights), uncertain_section(insights)]
    sections += [calibration_section(ev), mistakes_section(mistakes)]
    if robustness is not None:
        sections.append(robustness_section(robustness))
    if insights is not None:
        sections.append(model_section(insights))
    sections += [data_section(run, ev), config_section(run), machine_section(run, timings, temperature)]
    return Document(
        title=f"cifarlab run report: {run.path.name}",
        meta=meta,
        warnings=(warning[0].upper() + warning[1:] + ".",) if warning else (),
        sections=tuple(sections),
    )
