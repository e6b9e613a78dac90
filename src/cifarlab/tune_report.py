"""What `cifarlab tune` writes about a study, every file atomically (`cifarlab.files`):

    trials.csv, trials.md      one row per trial: number, state, value, epochs, seconds, parameters, note
    best.yaml                  the best trial's recipe as a config file (`cifarlab train --config best.yaml`)
    report.html, report.md     the study report: summary, best recipe, final runs, optimization history,
    plots/*.png                learning curves (pruning), parameter importances (fANOVA), slices, the space
    study.json                 every number of the report (counts, best, wall time, importances, final runs)

The figures are Optuna's own (`optuna.visualization.matplotlib`), drawn off-screen; the document is the run
report's (`cifarlab.report`: one `Document`, rendered to self-contained HTML and to Markdown).
"""

from __future__ import annotations

import csv
import functools
import io
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import yaml

from cifarlab import __version__
from cifarlab.files import atomic_write_bytes, atomic_write_text, write_json
from cifarlab.recipes import RECIPES, Recipe, get_recipe
from cifarlab.report.figures import png_bytes
from cifarlab.report.render import render_html, render_markdown
from cifarlab.report.sections import Bullets, Document, Figure, Paragraph, Section, details, section, table
from cifarlab.tune import TuneSettings, counts, quiet_optuna, redact

__all__ = [
    "BEST_CONFIG",
    "REPORT_HTML",
    "REPORT_MD",
    "STUDY_JSON",
    "TRIALS_CSV",
    "TRIALS_MD",
    "best_config_text",
    "importances",
    "trial_rows",
    "write_outputs",
]

TRIALS_CSV = "trials.csv"
TRIALS_MD = "trials.md"
BEST_CONFIG = "best.yaml"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
STUDY_JSON = "study.json"
PLOTS = "plots"
SLICES_PER_FIGURE = 4

_STATE = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


IMPORTANCE_TRIALS = 10  # fewer complete trials than this: fANOVA's importances are a rough hint, and say so


def _seconds(t: Any) -> float | None:
    """The trial's seconds: the ones its console line printed (`seconds`, recorded by the trial), else Optuna's
    start-to-end time (a trial that failed before timing itself)."""
    own = t.user_attrs.get("seconds")
    if isinstance(own, (int, float)) and not isinstance(own, bool) and math.isfinite(own):
        return float(own)
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return (t.datetime_complete - t.datetime_start).total_seconds()


def _seconds_text(x: float | None) -> str:
    """A trial's seconds as the console prints them (one decimal)."""
    return "–" if x is None else f"{x:.1f}"


def sampler_counts(study: Any, startup_trials: int) -> dict[str, int]:
    """How the started trials got their parameters: "random" (TPE draws at random until `startup_trials` trials
    are complete or pruned), "tpe" (modelled on the finished ones), "queued" (fixed ahead: a re-queued trial)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start is not None]
    finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    done = [t.datetime_complete for t in finished if t.datetime_complete is not None]
    out = {"random": 0, "tpe": 0, "queued": 0}
    for t in trials:
        if "fixed_params" in t.system_attrs:
            out["queued"] += 1
        elif sum(1 for d in done if d <= t.datetime_start) < startup_trials:
            out["random"] += 1
        else:
            out["tpe"] += 1
    return out


def _sampler_text(settings: TuneSettings, summary: Mapping[str, Any]) -> str:
    sc = summary.get("sampler_counts") or {}
    head = f"TPE (seed {settings.seed}; its first {settings.startup_trials} trials are drawn at random)"
    if not sc:
        return f"{head} / {summary['pruner']}"
    parts = [f"{sc.get('random', 0)} random", f"{sc.get('tpe', 0)} by TPE"]
    if sc.get("queued"):
        parts.append(f"{sc['queued']} re-queued")
    return f"{head}: trials so far {', '.join(parts)} / {summary['pruner']}"


def trial_rows(study: Any) -> list[dict[str, Any]]:
    """One dict per trial, by number: number, state, value, epochs, seconds, params, note, run_dir, retry_of."""
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    retried_as: dict[int, int] = {}
    for t in trials:
        if isinstance(t.user_attrs.get("retry_of"), int):
            retried_as[t.user_attrs["retry_of"]] = t.number
    best = _best_number(study)
    rows = []
    for t in trials:
        state = _STATE.get(t.state.name, t.state.name.lower())
        notes = []
        if t.number == best:
            notes.append("best")
        if "retry_of" in t.user_attrs:
            notes.append(f"retry of trial {t.user_attrs['retry_of']}")
        if state == "pruned":
            notes.append(f"pruned after epoch {t.user_attrs.get('epochs', max(t.intermediate_values, default=0))}")
        if state == "failed":
            reason = t.user_attrs.get("fail_reason")
            if reason is None and t.number in retried_as:
                retry = next((r for r in trials if r.number == retried_as[t.number]), None)
                reason = retry.user_attrs.get("retry_reason") if retry is not None else None
            notes.append(str(reason or "failed"))
            if t.number in retried_as and "re-queued" not in str(reason):
                notes.append(f"re-queued as trial {retried_as[t.number]}")
        value = t.value if t.state.name == "COMPLETE" else None
        if state == "pruned" and t.intermediate_values:
            value = None  # a pruned trial has no objective value; its last reported value is in the curves
        rows.append(
            {
                "number": t.number,
                "state": state,
                "value": value,
                "epochs": t.user_attrs.get("epochs"),
                "seconds": _seconds(t),
                # a queued trial's parameters are fixed ahead (a re-queued trial's are its original's)
                "params": dict(t.params) or dict(t.system_attrs.get("fixed_params") or {}),
                "note": "; ".join(notes),
                "run_dir": t.user_attrs.get("run_dir"),
                "retry_of": t.user_attrs.get("retry_of"),
            }
        )
    return rows


def _best_number(study: Any) -> int | None:
    try:
        return int(study.best_trial.number)
    except ValueError:  # no complete trial yet
        return None


def _pct(v: Any) -> str:
    """An accuracy as the run reports show it (a percentage, 2 decimals)."""
    return "–" if v is None else f"{float(v) * 100:.2f}%"


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)


def _param_names(rows: Sequence[Mapping[str, Any]], settings: TuneSettings) -> list[str]:
    names = [p.name for p in settings.space.params]
    for r in rows:
        names += [k for k in r["params"] if k not in names]
    return names


def trials_csv(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["number", "state", "value", "epochs", "seconds", *names, "note", "run_dir"])
    for r in rows:
        seconds = None if r["seconds"] is None else round(r["seconds"], 2)
        params = [r["params"].get(n, "") for n in names]
        w.writerow(
            [
                r["number"],
                r["state"],
                _blank(r["value"]),
                _blank(r["epochs"]),
                _blank(seconds),
                *params,
                r["note"],
                r["run_dir"] or "",
            ]
        )
    return buf.getvalue()


def _blank(v: Any) -> Any:
    return "" if v is None else v


def _trials_table(rows: Sequence[Mapping[str, Any]], names: Sequence[str], metric: str) -> Any:
    body = [
        [
            str(r["number"]),
            r["state"],
            _fmt(r["value"]),
            _fmt(r["epochs"]),
            _seconds_text(r["seconds"]),
            *(_fmt(r["params"].get(n)) for n in names),
            r["note"],
        ]
        for r in rows
    ]
    classes = [
        "best" if "best" in r["note"].split("; ") else "drop" if r["state"] in ("pruned", "failed") else ""
        for r in rows
    ]
    return table(["trial", "state", metric, "epochs", "seconds", *names, "note"], body, classes)


# -- best config ---------------------------------------------------------------------------------------------


def best_recipe(settings: TuneSettings, params: Mapping[str, Any]) -> Recipe:
    return settings.final_recipe(params)


def best_config_text(settings: TuneSettings, best: Mapping[str, Any]) -> str:
    """best.yaml: `recipe: BASE` and every key of the tuned recipe that differs from BASE, as `--config` reads it."""
    recipe = best_recipe(settings, best["params"])
    base_name = settings.base_name if settings.base_name in RECIPES else None
    base = get_recipe(base_name).to_dict() if base_name else {}
    tuned = recipe.replace(
        description=f"Tuned by cifarlab tune: study {settings.study_name}, trial {best['number']} "
        f"({settings.metric} {best['value']:.4f})."
    ).to_dict()
    body: dict[str, Any] = {"recipe": base_name} if base_name else {}
    body.update({k: v for k, v in tuned.items() if base.get(k, object()) != v})
    head = (
        f"# The best trial of study {settings.study_name!r} (cifarlab tune): trial {best['number']}, "
        f"{settings.metric} {best['value']:.4f}.\n"
        "# Its full run (the recipe's own epochs and split; trial-only keys dropped):\n"
        f"#   cifarlab train --config {settings.out_dir / BEST_CONFIG}\n"
    )
    return head + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


# -- figures -------------------------------------------------------------------------------------------------


def _draw(plot: Callable[[], Any], after: Callable[[Any], None] | None = None) -> bytes:
    """Call an Optuna matplotlib plot function off-screen (then `after(axes)`) and return the figure as PNG bytes."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    with plt.rc_context({"figure.figsize": (6.4, 4.0), "font.size": 9}), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. a slice whose trials all share one value
        ax = plot()
        fig = np.atleast_1d(ax).flat[0].figure
        try:
            if after is not None:
                after(ax)
            fig.tight_layout()
            return png_bytes(fig)
        finally:
            plt.close(fig)


def importances(study: Any) -> tuple[dict[str, float] | None, str]:
    """fANOVA parameter importances (normalized to sum 1), or None and why not."""
    with quiet_optuna() as optuna:
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if len(complete) < 2:
            return None, f"parameter importances need at least 2 complete trials ({len(complete)} so far)"
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            imp = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except (ValueError, RuntimeError, ImportError) as e:
            return None, f"parameter importances could not be computed ({e})"
    if not imp or not all(math.isfinite(v) for v in imp.values()):
        return None, "parameter importances could not be computed (the complete trials do not vary the parameters)"
    return {k: float(v) for k, v in imp.items()}, ""


def make_figures(study: Any, settings: TuneSettings, have_importances: bool) -> tuple[dict[str, bytes], list[str]]:
    """{key: PNG bytes} of the study's figures, and notes on the ones that could not be drawn."""
    figs: dict[str, bytes] = {}
    notes: list[str] = []
    with quiet_optuna() as optuna:
        vis = optuna.visualization.matplotlib
        target = settings.metric
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        jobs: list[tuple[Any, ...]] = []  # (key, plot, optional after(axes))
        if complete:
            jobs.append(("history", lambda: vis.plot_optimization_history(study, target_name=target)))
        if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            n_curves = sum(1 for t in study.get_trials(deepcopy=False) if t.intermediate_values)

            def label_curves(ax: Any) -> None:
                ax.set_title(f"{target} after each epoch")
                ax.set_xlabel("epoch")
                ax.set_ylabel(target)
                if n_curves > 12 and ax.get_legend() is not None:  # a legend of every trial hides the plot
                    ax.get_legend().remove()

            jobs.append(("curves", functools.partial(vis.plot_intermediate_values, study), label_curves))
        if have_importances:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            jobs.append(
                ("importances", lambda: vis.plot_param_importances(study, evaluator=evaluator, target_name=target))
            )
        if complete:
            names = [p.name for p in settings.space.params if any(p.name in t.params for t in complete)]
            for i in range(0, len(names), SLICES_PER_FIGURE):
                chunk = names[i : i + SLICES_PER_FIGURE]
                jobs.append(
                    (
                        f"slices_{i // SLICES_PER_FIGURE + 1}",
                        functools.partial(vis.plot_slice, study, params=chunk, target_name=target),
                    )
                )
        for key, *job in jobs:
            try:
                figs[key] = _draw(*job)
            except Exception as e:  # a plot Optuna cannot draw for this study must not lose the others
                notes.append(f"figure {key} could not be drawn ({type(e).__name__}: {e})")
    return figs, notes


# -- the document --------------------------------------------------------------------------------------------


def _wall_seconds(study: Any) -> float | None:
    starts = [t.datetime_start for t in study.get_trials(deepcopy=False) if t.datetime_start is not None]
    ends = [t.datetime_complete for t in study.get_trials(deepcopy=False) if t.datetime_complete is not None]
    if not starts or not ends:
        return None
    return (max(ends) - min(starts)).total_seconds()


def _final_mean(final_runs: Sequence[Mapping[str, Any]]) -> tuple[float | None, float | None]:
    accs = [float(r["test_accuracy"]) for r in final_runs if r.get("test_accuracy") is not None]
    if not accs:
        return None, None
    return statistics.fmean(accs), (statistics.stdev(accs) if len(accs) > 1 else None)


def build_document(
    settings: TuneSettings,
    summary: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    figs: Mapping[str, bytes],
    notes: Sequence[str],
) -> Document:
    c = summary["counts"]
    best = summary.get("best")
    wall = summary.get("wall_seconds")
    overview = table(
        ["", "value"],
        [
            ["objective", f"{settings.metric} ({settings.direction}), validation split only"],
            ["trials (budget)", f"{c['complete'] + c['pruned']} of {settings.n_trials} (complete + pruned)"],
            ["complete / pruned / failed", f"{c['complete']} / {c['pruned']} / {c['failed']}"],
            ["running / queued", f"{c['running']} / {c['waiting']}"],
            ["study wall time", "–" if wall is None else f"{wall:.1f} s (first trial start to last trial end)"],
            ["trial time, total", f"{summary['trial_seconds_total']:.1f} s"],
            ["sampler / pruner", _sampler_text(settings, summary)],
            ["trial epochs (max)", str(summary["trial_epochs"])],
            ["storage", summary["storage"]],
        ],
    )
    sections: list[Section] = [section("summary", "Summary", overview)]
    if best is not None:
        params = table(
            ["parameter", "best value", "range"],
            [[p.name, _fmt(best["params"].get(p.name)), p.describe()] for p in settings.space.params],
        )
        sections.append(
            section(
                "best",
                "Best trial",
                Paragraph(
                    f"Trial {best['number']}: {settings.metric} {best['value']:.4f} after {best.get('epochs')} epochs. "
                    f"Its recipe is in {BEST_CONFIG}; train it with: cifarlab train --config "
                    f"{settings.out_dir / BEST_CONFIG}"
                ),
                params,
            )
        )
    else:
        sections.append(section("best", "Best trial", Paragraph("No trial has completed yet.")))
    final = summary.get("final_runs") or []
    if final:
        mean, sd = summary.get("final_mean_test_accuracy"), summary.get("final_sd_test_accuracy")
        rows_f = [
            [
                str(r["seed"]),
                r.get("status", ""),
                _pct(r.get("test_accuracy")),
                _fmt(r.get("epochs_run")),
                str(r.get("run_dir")),
            ]
            for r in final
        ]
        text = (
            f"The best trial's full run, evaluated once on the test set: mean test accuracy {_pct(mean)}"
            if mean is not None
            else "No final run finished."
        )
        if sd is not None:
            text += f" (sd {sd * 100:.2f} points over {len(final)} seeds)"
        sections.append(
            section(
                "final",
                "Final runs (test set)",
                Paragraph(text + "."),
                table(["seed", "status", "test accuracy", "epochs", "run folder"], rows_f),
            )
        )
    else:
        sections.append(
            section(
                "final",
                "Final runs (test set)",
                Paragraph("None yet: the test set is evaluated only by the best trial's full run (--final-seeds)."),
            )
        )
    hist: list[Any] = []
    if "history" in figs:
        hist.append(
            Figure("history", f"Optimization history: {settings.metric} of each complete trial and the best so far")
        )
    if "curves" in figs:
        hist.append(
            Figure(
                "curves",
                f"Learning curves: {settings.metric} after each epoch, the pruner's input; pruned trials stop early",
            )
        )
    sections.append(section("history", "Optimization history", *(hist or [Paragraph("Nothing to plot yet.")])))
    imp = summary.get("importances")
    if imp:
        blocks: list[Any] = [table(["parameter", "importance (fANOVA)"], [[k, f"{v:.3f}"] for k, v in imp.items()])]
        if "importances" in figs:
            blocks.insert(0, Figure("importances", "Parameter importances (fANOVA on the complete trials)"))
        if c["complete"] < IMPORTANCE_TRIALS:
            blocks.insert(
                0,
                Paragraph(
                    f"Caveat: only {c['complete']} complete trials. fANOVA fits a random forest to them; below about "
                    f"{IMPORTANCE_TRIALS} complete trials these importances are a rough hint, not a measurement: run "
                    "more trials (--n-trials) before trusting them."
                ),
            )
        sections.append(section("importances", "Parameter importances", *blocks))
    else:
        sections.append(
            section("importances", "Parameter importances", Paragraph(summary.get("importances_note") or "–"))
        )
    slices: list[Any] = [
        Figure(k, f"Slices: {settings.metric} against each parameter (complete trials)")
        for k in sorted(figs)
        if k.startswith("slices_")
    ]
    sections.append(section("slices", "Slices", *(slices or [Paragraph("Nothing to plot yet.")])))
    space_rows = [[p.name, p.describe()] for p in settings.space.params]
    trial_keys = [f"{k}={v}" for k, v in [*settings.space.trial, *settings.trial_overrides]]
    space_blocks: list[Any] = [table(["parameter", "range"], space_rows)]
    if trial_keys:
        space_blocks.append(
            Paragraph("Trial-only recipe keys (dropped by the final run): " + ", ".join(trial_keys) + ".")
        )
    sections.append(section("space", f"Search space ({settings.space.source})", *space_blocks))
    sections.append(
        section("trials", "Trials", details(f"all {len(rows)} trials", _trials_table(rows, names, settings.metric)))
    )
    if notes:
        sections.append(section("notes", "Notes", Bullets(tuple(notes))))
    return Document(
        title=f"Study {settings.study_name}: tuning {settings.base_name}",
        meta=f"cifarlab {__version__} · {time.strftime('%Y-%m-%d %H:%M')} · {settings.out_dir}",
        sections=tuple(sections),
    )


# -- writing -------------------------------------------------------------------------------------------------


def write_outputs(
    study: Any,
    settings: TuneSettings,
    *,
    invocation_seconds: float | None = None,
    final_runs: Sequence[Mapping[str, Any]] | None = None,
    report: bool | None = None,
) -> dict[str, Any]:
    """Write the trials table, best.yaml, the report (unless `report` or settings.report is False) and study.json
    for `study`; returns study.json's content."""
    report = settings.report if report is None else report
    import optuna

    out = settings.out_dir
    rows = trial_rows(study)
    names = _param_names(rows, settings)
    c = counts(study)
    best_n = _best_number(study)
    best = None
    if best_n is not None:
        bt = study.best_trial
        best = {
            "number": bt.number,
            "value": float(bt.value),
            "params": dict(bt.params),
            "epochs": bt.user_attrs.get("epochs"),
            "best_epoch": bt.user_attrs.get("best_epoch"),
            "run_dir": bt.user_attrs.get("run_dir"),
            "config": str(out / BEST_CONFIG),
        }
    imp, imp_note = importances(study) if report else (None, "not computed (no report)")
    final = list(final_runs or [])
    mean, sd = _final_mean(final)
    summary: dict[str, Any] = {
        "study": settings.study_name,
        "storage": redact(settings.storage_url),
        "recipe": settings.base_name,
        "metric": settings.metric,
        "direction": settings.direction,
        "n_trials": settings.n_trials,
        "counts": c,
        "pruned": c["pruned"],
        "best": best,
        "wall_seconds": _wall_seconds(study),
        "trial_seconds_total": sum(r["seconds"] or 0.0 for r in rows),
        "invocation_seconds": invocation_seconds,
        "workers": settings.workers,
        "pruner": settings.pruner,
        "prune_after": settings.prune_after,
        "trial_epochs": settings.trial_recipe().epochs,
        "space": settings.space.raw,
        "trial_overrides": [list(kv) for kv in settings.trial_overrides],
        "sampler_counts": sampler_counts(study, settings.startup_trials),
        "importances": imp,
        "importances_note": imp_note,
        "importances_caveat": c["complete"] < IMPORTANCE_TRIALS if imp else None,
        "final_runs": final,
        "final_mean_test_accuracy": mean,
        "final_sd_test_accuracy": sd,
        "versions": {"cifarlab": __version__, "optuna": optuna.__version__},
    }
    atomic_write_text(out / TRIALS_CSV, trials_csv(rows, names))
    trials_doc = Document(
        title=f"Trials of study {settings.study_name}",
        meta=f"{settings.metric} ({settings.direction}) on the validation split; {c['complete']} complete, "
        f"{c['pruned']} pruned, {c['failed']} failed",
        sections=(section("trials", "Trials", _trials_table(rows, names, settings.metric)),),
    )
    atomic_write_text(out / TRIALS_MD, render_markdown(trials_doc, {}))
    if best is not None:
        atomic_write_text(out / BEST_CONFIG, best_config_text(settings, best))
    if report:
        figs, notes = make_figures(study, settings, imp is not None)
        for key, data in figs.items():
            atomic_write_bytes(out / PLOTS / f"{key}.png", data)
        doc = build_document(settings, summary, rows, names, figs, notes)
        atomic_write_text(out / REPORT_HTML, render_html(doc, figs))
        atomic_write_text(out / REPORT_MD, render_markdown(doc, {k: f"{PLOTS}/{k}.png" for k in figs}))
    write_json(out / STUDY_JSON, summary)
    return summary
