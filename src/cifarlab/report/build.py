"""Building a run's report: evaluate, draw the figures, write report.html, report.md, plots/*.png and
metrics.json. Everything is computed in memory first, then each file is written atomically through
`cifarlab.files`: a full disk or a read-only folder leaves every old file whole, and is one error line."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cifarlab.errors import UserError
from cifarlab.evaluate import EvalResult, Predictions, dataset_warning
from cifarlab.report.common import read_corruptions, read_steps, training_state
from cifarlab.report.figures import FIGURES, SCALE, make_figures
from cifarlab.report.insights import collect
from cifarlab.report.reading import plain_reading
from cifarlab.report.render import render_html, render_markdown
from cifarlab.report.sections import build_document

PLOTS = "plots"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"


class ReportWriteError(UserError):
    """A report file could not be written (full disk, read-only folder): the message names the file.
    The file keeps its old content (atomic writes)."""

    def __init__(self, path: Path, exc: OSError) -> None:
        super().__init__(f"cannot write {path}: {exc.strerror or exc}")
        self.path = path
        self.errno = exc.errno


def _write(path: Path, data: bytes | str) -> None:
    from cifarlab.files import atomic_write_bytes

    try:
        atomic_write_bytes(path, data.encode("utf-8") if isinstance(data, str) else data)
    except OSError as exc:
        raise ReportWriteError(path, exc) from exc


def _write_json(path: Path, obj: Any) -> None:
    from cifarlab.files import write_json

    try:
        write_json(path, obj)
    except OSError as exc:
        raise ReportWriteError(path, exc) from exc


def write_report(ev: EvalResult, preds: Predictions, evaluate_seconds: float = 0.0) -> dict[str, Any]:
    """Draw the figures and write the report of an evaluation (`evaluate_run`'s result) into its run folder;
    return the merged metrics (as written to metrics.json)."""
    run = preds.run
    run_dir = Path(run.path)
    split = ev.split_name
    t1 = time.perf_counter()
    steps = read_steps(run_dir)
    ev = dataclasses.replace(ev, training=training_state(run, steps))  # how training ended, for the reading
    robustness = read_corruptions(run_dir)
    insights = collect(run, ev, preds)
    t_ins = time.perf_counter()
    images, mistakes = make_figures(run, ev, preds, insights, steps, robustness)
    t2 = time.perf_counter()
    reading = plain_reading(ev, run.history, run.metrics, robustness, run.recipe.label_smoothing)
    timings = dict(run.metrics.get("timings") or {})
    # The time of the report training wrote (metrics.json) is not this report's, which cannot time itself
    timings.pop("report_seconds", None)
    timings["report_evaluate_seconds"] = evaluate_seconds
    timings["report_saliency_seconds"] = insights.seconds.get("saliency_seconds", 0.0)
    timings["report_model_seconds"] = insights.seconds.get("model_seconds", 0.0)
    timings["report_plots_seconds"] = t2 - t_ins
    meta = (
        f"Run folder {run_dir.name}; report written {time.strftime('%Y-%m-%d %H:%M:%S')}; "
        f"cifarlab {(run.config.get('versions') or {}).get('cifarlab', '?')}."
    )
    doc = build_document(run, ev, reading, mistakes, timings, meta, insights, steps, robustness)
    rel = {k: f"{PLOTS}/{FIGURES[k]}" for k in images}
    html_text = render_html(doc, images, scale=SCALE)
    md_text = render_markdown(doc, rel)

    # Merge: training's keys stay as they are; the evaluation and the report's extras are added.
    from cifarlab.runs import METRICS

    ev_dict = ev.to_dict()
    metrics = dict(run.metrics)
    metrics["evaluation"] = ev_dict
    metrics.setdefault(f"{split}_accuracy", ev.accuracy)  # the argmax: the same with or without a temperature
    # The loss is the report's: at the run's softmax temperature, as predict and serve give the probabilities
    # (training's own may predate the temperature, or a later `cifarlab calibrate`); the plain softmax's is kept
    # under its own key.
    metrics[f"{split}_loss"] = ev.loss
    metrics[f"{split}_loss_uncalibrated"] = ev.inference.uncalibrated_loss if ev.inference else None
    metrics[f"{split}_top5_accuracy"] = ev.top5
    metrics[f"{split}_ece"] = ev.calibration.ece
    metrics[f"{split}_macro_f1"] = ev.macro_avg.f1
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
        **insights.to_dict(),
        "model": insights.model,
        "steps": {"file": "steps.csv", "n": len(steps["step"])} if steps else None,
        "robustness": robustness,
        "timings": {
            "evaluate_seconds": evaluate_seconds,
            **{f"{k}": v for k, v in insights.seconds.items()},
            "plots_seconds": t2 - t_ins,
            "total_seconds": evaluate_seconds + time.perf_counter() - t1,
        },
    }
    for key, data in images.items():
        _write(run_dir / rel[key], data)
    _write(run_dir / REPORT_HTML, html_text)
    _write(run_dir / REPORT_MD, md_text)
    _write_json(run_dir / METRICS, metrics)
    return metrics


def build_report(
    run_dir: Path,
    data_dir: Path | None = None,
    dataset: Any = None,
    split: str = "test",
    logits: Any = None,
    on_warning: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a run, write plots/*.png, report.html and report.md, merge into metrics.json; return metrics.

    `on_warning(line)` is called with the dataset-mismatch warning as soon as the evaluation knows it (before
    the figures are drawn). A file that cannot be written raises `ReportWriteError` (a `UserError`)."""
    from cifarlab.evaluate import evaluate_run, load_run_dataset
    from cifarlab.runs import load_run

    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    if dataset is None:
        dataset = load_run_dataset(load_run(run_dir), data_dir)
    ev, preds = evaluate_run(run_dir, split=split, dataset=dataset, logits=logits)
    warning = dataset_warning(ev)
    if warning and on_warning is not None:
        on_warning(warning)
    return write_report(ev, preds, evaluate_seconds=time.perf_counter() - t0)


def report_paths(run_dir: Path) -> list[Path]:
    """The files `build_report` writes, for printing."""
    from cifarlab.runs import METRICS

    run_dir = Path(run_dir)
    return [run_dir / REPORT_HTML, run_dir / REPORT_MD, run_dir / METRICS, run_dir / PLOTS]
