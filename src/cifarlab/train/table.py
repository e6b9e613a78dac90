"""Printing the training history: one line per epoch while training, the talk's Table 1 at the end."""

from __future__ import annotations

from typing import Any

__all__ = ["describe_events", "format_epoch_line", "format_history_table"]


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_epoch_line(row: dict[str, Any], epochs: int) -> str:
    parts = [
        f"epoch {row['epoch']:>2}/{epochs}",
        f"loss {_f(row['loss'], '.4f')}",
        f"acc {_f(row['accuracy'], '.4f')}",
    ]
    if row.get("val_loss") is not None:
        parts += [f"val_loss {_f(row['val_loss'], '.4f')}", f"val_acc {_f(row['val_accuracy'], '.4f')}"]
    parts += [f"lr {row['lr']:.3g}", f"{row['epoch_seconds']:.1f}s"]
    marks = describe_events(row)
    return "  ".join(parts) + (f"  [{marks}]" if marks else "")


def describe_events(row: dict[str, Any]) -> str:
    names = {"best": "best", "early_stop": "early stop", "restored_best": "best weights restored"}
    out = []
    for e in row.get("events", []):
        if e == "lr_reduced":
            out.append(f"LR -> {row['new_lr']:.3g}" if "new_lr" in row else "LR reduced")
        else:
            out.append(names.get(e, e))
    return ", ".join(out)


def format_history_table(history: list[dict[str, Any]], train_seconds: float | None = None) -> str:
    """The reference talk's Table 1: one row per epoch, LR drops and the stop marked."""
    head = (
        f"{'epoch':>5}  {'loss':>7}  {'accuracy':>8}  {'val_loss':>8}  {'val_acc':>7}  {'lr':>9}  {'time':>6}  events"
    )
    lines = [head, "-" * len(head)]
    for row in history:
        lines.append(
            f"{row['epoch']:>5}  {_f(row['loss'], '.4f'):>7}  {_f(row['accuracy'], '.4f'):>8}  "
            f"{_f(row['val_loss'], '.4f'):>8}  {_f(row['val_accuracy'], '.4f'):>7}  {row['lr']:>9.2e}  "
            f"{row['epoch_seconds']:>5.1f}s  {describe_events(row)}"
        )
    if train_seconds is not None:
        lines.append(f"training wall time: {train_seconds:.1f} s ({train_seconds / 60:.1f} min)")
    return "\n".join(lines)
