"""The run's files while it trains: a resumable checkpoint and the history, rewritten after every epoch."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import torch

from cifarlab.files import atomic_write_bytes, write_json
from cifarlab.train.callbacks import Callback

__all__ = ["HISTORY_COLUMNS", "Checkpoint", "StepLog", "save_checkpoint", "write_history"]

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


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save into memory, then into a temp file beside `path` and renamed: a kill mid-write leaves the previous
    checkpoint, and a full disk is an OSError naming the file (torch.save writing to the file itself turns it into
    a RuntimeError about stream positions)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


class Checkpoint(Callback):
    """After every epoch (once the NaN guard has passed the weights): `checkpoint.pt` with everything a resume
    needs (model, optimizer, callback states, RNG, history), then history.json/csv. Both writes are atomic, so a
    kill at any moment leaves the previous epoch's files."""

    order = 100

    def __init__(self, run_dir: Path | str, filename: str = "checkpoint.pt") -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / filename

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        save_checkpoint(self.path, self.trainer.state_dict())
        write_history(self.run_dir, self.trainer.history)


class StepLog(Callback):
    """Per-step learning rate and loss (the epoch means hide warmup and decay), written to `steps.csv` at each
    epoch end. Losses stay on the device until then, so logging them costs no per-step sync on a GPU."""

    order = 96  # after the history row, before the checkpoint: steps.csv is never behind the checkpoint
    state_required = False  # a run resumed from a checkpoint without it just starts the log there
    FILE = "steps.csv"

    def __init__(self, run_dir: Path | str) -> None:
        self.path = Path(run_dir) / self.FILE
        self.rows: list[tuple[int, int, float, float]] = []
        self._lr: float = 0.0
        self._losses: list[Any] = []
        self._steps: list[tuple[int, float]] = []

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.rows = []

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._lr = self.trainer.get_lr()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        assert logs is not None
        self._steps.append((int(logs["step"]), self._lr))
        self._losses.append(logs["loss"])

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        losses = torch.stack(self._losses).float().cpu().tolist() if self._losses else []
        self.rows += [(step, epoch + 1, lr, loss) for (step, lr), loss in zip(self._steps, losses)]
        self._steps, self._losses = [], []
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step", "epoch", "lr", "loss"])
        w.writerows(self.rows)
        atomic_write_bytes(self.path, buf.getvalue().encode())

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [list(r) for r in self.rows]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows = [(int(r[0]), int(r[1]), float(r[2]), float(r[3])) for r in state.get("rows", [])]
