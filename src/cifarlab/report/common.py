"""Helpers the report's parts share: reading the training history, formatting numbers for people."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

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
