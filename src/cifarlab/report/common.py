"""Helpers the report's parts share: reading the training history and the run's optional files (steps.csv,
eval_corruptions.json), formatting numbers for people."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cifarlab.evaluate import TrainingState

History = list[dict[str, Any]]

# -- history ---------------------------------------------------------------------------------------------


def events(history: History, name: str) -> list[int]:
    """The epochs whose row carries the event `name` (lr_reduced, early_stop, best, ...)."""
    return [int(r["epoch"]) for r in history if name in (r.get("events") or [])]


def has_val(history: History) -> bool:
    return any(r.get("val_loss") is not None for r in history)


def kept_epoch(history: History, metrics: dict[str, Any]) -> int | None:
    """The epoch whose weights the saved model has: the restored best one, else the last."""
    if metrics.get("restored_epoch"):
        return int(metrics["restored_epoch"])
    return int(history[-1]["epoch"]) if history else None


def row(history: History, epoch: int | None) -> dict[str, Any]:
    """The history row of `epoch` ({} when there is none)."""
    for r in history:
        if r.get("epoch") == epoch:
            return r
    return {}


# -- numbers and lists as text ----------------------------------------------------------------------------


def pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x * 100:.{digits}f}%"


def join_list(items: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def loss_text(v: float) -> str:
    """A loss for the report: four decimals, or three significant digits for a diverged run's 7.5e+15 (or inf)."""
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.3g}"


def num(v: Any, key: str = "") -> str:
    """A value as the report's tables show it; `key` picks the format (accuracies as percentages, ...)."""
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
        return ", ".join(num(x) for x in v) if v else "–"
    if isinstance(v, dict):
        return json.dumps(v) if v else "–"
    return str(v)


def seconds(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.1f} s" + (f" ({s / 60:.1f} min)" if s >= 120 else "")


# -- optional run files: steps.csv, eval_corruptions.json ---------------------------------------------------

STEPS_CSV = "steps.csv"  # written by cifarlab.train.checkpoint.StepLog
CORRUPTIONS_JSON = "eval_corruptions.json"  # written by `cifarlab evaluate --corruptions`

Steps = dict[str, list[float]]  # "step", "epoch", "lr", "loss": one value per optimizer step


def read_steps(run_dir: Path) -> Steps | None:
    """The per-step log (step, epoch, lr, loss) of `<run>/steps.csv`; None when absent (older runs), empty or
    unreadable (the report then falls back to the per-epoch curves)."""
    import csv
    import math

    path = Path(run_dir) / STEPS_CSV
    if not path.is_file():
        return None
    out: Steps = {"step": [], "epoch": [], "lr": [], "loss": []}
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for r in csv.DictReader(f):
                vals = {k: float(r[k]) for k in out}
                if not all(math.isfinite(vals[k]) for k in ("step", "epoch", "lr")):
                    return None
                for k in out:
                    out[k].append(vals[k])
    except (OSError, ValueError, KeyError, TypeError, csv.Error):
        return None
    return out if out["step"] else None


def read_corruptions(run_dir: Path) -> dict[str, Any] | None:
    """`<run>/eval_corruptions.json` with int severities, or None when the file is absent.

    Returns {"clean_accuracy", "n", "seed", "results": {name: {severity: accuracy}}, "mean_accuracy",
    "relative_drop"}; a damaged file gives {"error": message}, so the report says so instead of failing, and a file
    computed on other data than the run's test set {"error": message, "other_data": its name}: not the run's
    robustness, so not shown as it."""
    from cifarlab.errors import UserError
    from cifarlab.files import read_json
    from cifarlab.runs import stale_result

    path = Path(run_dir) / CORRUPTIONS_JSON
    if not path.exists():
        return None
    try:
        raw = read_json(path)
        other = _other_data(run_dir, raw)
        if other is not None:  # e.g. written by `--test-data X --corruptions` before that had a file of its own
            return {
                "error": f"{CORRUPTIONS_JSON} holds results on other data ({other}), not this run's test set; run "
                f"cifarlab evaluate {run_dir} --corruptions for the run's own",
                "other_data": other,
            }
        if stale_result(run_dir, raw, path):
            return {
                "error": f"{CORRUPTIONS_JSON} was computed from earlier weights of this run (before it was resumed "
                f"or recalibrated); run cifarlab evaluate {run_dir} --corruptions again"
            }
        results = {
            str(name): {int(s): float(a) for s, a in sorted(by_sev.items(), key=lambda t: int(t[0]))}
            for name, by_sev in raw["results"].items()
        }
        if not results:
            raise ValueError("no corruption results")
        accs = [a for r in results.values() for s, a in r.items() if s > 0] or [
            a for r in results.values() for a in r.values()
        ]
        clean = raw.get("clean_accuracy")
        mean = raw.get("mean_accuracy")
        mean = float(mean) if mean is not None else sum(accs) / len(accs)
        drop = raw.get("relative_drop")
        if drop is None and clean:
            drop = 1.0 - mean / float(clean)
        return {
            "clean_accuracy": float(clean) if clean is not None else None,
            "n": raw.get("n"),
            "seed": raw.get("seed"),
            "results": results,
            "mean_accuracy": mean,
            "relative_drop": float(drop) if drop is not None else None,
        }
    except UserError as e:
        return {"error": str(e)}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return {"error": f"{path} is not a corruption evaluation ({type(e).__name__}: {e}); the file is damaged"}


def corruption_mean(by_severity: dict[int, float]) -> float:
    """A corruption's mean accuracy over its severities 1..5, as eval_corruptions.json's `per_corruption`:
    severity 0 (the clean images, when asked for) is not a corruption."""
    corrupted = [a for s, a in by_severity.items() if s > 0] or list(by_severity.values())
    return sum(corrupted) / len(corrupted)


def _other_data(run_dir: Path, raw: Any) -> str | None:
    """The name of the data a corruption evaluation was computed on when that is not the run's own test set, else
    None: another test set (`evaluate --test-data`: its name ends "(test data)", it has no checksum), or data
    whose checksum differs from the one the run recorded. A file that records no dataset is taken as the run's."""
    from cifarlab.errors import UserError
    from cifarlab.files import read_json
    from cifarlab.runs import CONFIG

    data = raw.get("dataset") if isinstance(raw, dict) else None
    if not isinstance(data, dict):
        return None
    name = str(data.get("name") or "?")
    if name.endswith("(test data)"):
        return name
    try:
        recorded = (read_json(Path(run_dir) / CONFIG).get("dataset") or {}).get("checksum")
    except (UserError, OSError, AttributeError):  # no readable config: nothing to compare with
        return None
    given = data.get("checksum")
    if recorded and given and given != recorded:
        return f"{name}, checksum {given} where the run's is {recorded}"
    return None


def most_damaging(robustness: dict[str, Any]) -> tuple[str, float] | None:
    """The corruption with the lowest mean accuracy over its severities, and that mean."""
    results = robustness.get("results") or {}
    means = {name: corruption_mean(r) for name, r in results.items() if r}
    if not means:
        return None
    name = min(means, key=lambda n: (means[n], n))
    return name, means[name]


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) in pixels of PNG bytes, from the IHDR chunk."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        raise ValueError("not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def last_epoch_steps(steps: Steps | None) -> int | None:
    """Optimizer steps steps.csv logged in the last epoch (a run stopped at its time budget mid-epoch has fewer
    than an epoch's); None without steps."""
    if not steps:
        return None
    last = max(steps["epoch"])
    return len({s for s, e in zip(steps["step"], steps["epoch"], strict=True) if e == last})


def training_state(run: Any, steps: Steps | None) -> TrainingState | None:
    """What the run's files say about how its training ended, for the reading (None when its config cannot
    say). `steps`: the run's steps.csv, already read by the report."""
    from cifarlab.errors import UserError
    from cifarlab.evaluate import TrainingState
    from cifarlab.runs import resume_command, run_status

    try:
        # as the report's summary reads it: the training process's own report, written just before it marks the
        # folder finished, is of a finished run
        status: str | None = run_status(run)[0]
    except (UserError, OSError, AttributeError):
        status = None
    status = None if status == "unknown" else status  # no file says: the reading then says nothing about it
    try:
        recipe = run.recipe
        planned, calibrate = int(recipe.epochs), bool(recipe.calibrate)
    except (UserError, AttributeError, TypeError, ValueError):
        return None
    return TrainingState(
        run_dir=str(run.path),
        status=status,
        planned_epochs=planned,
        calibrate=calibrate,
        last_epoch_steps=last_epoch_steps(steps),
        resume=resume_command(run.path, (getattr(run, "config", None) or {}).get("distributed")),
    )
