"""The run's files while it trains: a resumable checkpoint and the history, rewritten after every epoch."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from cifarlab.files import atomic_write_bytes, write_json
from cifarlab.train.callbacks import Callback

__all__ = ["HISTORY_COLUMNS", "Checkpoint", "write_history"]

HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds", "events"]


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """history.json (every field) and history.csv (the Table 1 columns, events joined by ';')."""
    write_json(run_dir / "history.json", history)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({**row, "events": ";".join(row.get("events", []))})
    atomic_write_bytes(run_dir / "history.csv", buf.getvalue().encode())


class Checkpoint(Callback):
    """After every epoch (once the NaN guard has passed the weights): `checkpoint.pt` with everything a resume
    needs (model, optimizer, callback states, RNG, history), then history.json/csv. Both writes are atomic, so a
    kill at any moment leaves the previous epoch's files."""

    order = 100

    def __init__(self, run_dir: Path | str, filename: str = "checkpoint.pt") -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / filename

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        from cifarlab.runs import save_checkpoint

        save_checkpoint(self.path, self.trainer.state_dict())
        write_history(self.run_dir, self.trainer.history)
