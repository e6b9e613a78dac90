"""What a person sees while a run trains: a progress bar on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

from cifarlab.train.callbacks import Callback
from cifarlab.train.table import format_epoch_line

__all__ = ["EpochLog", "ProgressBar"]


def _running(logs: dict) -> tuple[float, float]:
    seen = max(1, logs["seen"])
    return float(logs["loss_sum"]) / seen, float(logs["correct"]) / seen


class EpochLog(Callback):
    """One line per epoch (the Table 1 row, events marked). With `every_seconds`, also a progress line at most
    that often within an epoch, so a log file or a pipe never goes silent for a whole slow epoch."""

    order = 95

    def __init__(self, log: Callable[[str], None] = print, every_seconds: float | None = None) -> None:
        self.log = log
        self.every = every_seconds
        self._t0 = self._last = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._t0 = self._last = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.every is None or logs is None:
            return
        now = time.perf_counter()
        if now - self._last < self.every:
            return
        self._last = now
        t = self.trainer
        done, total = batch + 1, t.steps_per_epoch
        loss, acc = _running(logs)
        rate = logs["seen"] / max(1e-9, now - self._t0)
        eta = (now - self._t0) / done * (total - done)
        self.log(
            f"  epoch {len(t.history) + 1}/{t.recipe.epochs}: {done}/{total} batches  loss {loss:.4f}  "
            f"acc {acc:.4f}  {rate:.0f} img/s  epoch ETA {eta:.0f}s"
        )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.log(format_epoch_line(self.trainer.history[-1], self.trainer.recipe.epochs))


class ProgressBar(Callback):
    """A tqdm bar per epoch on a terminal: batches, running loss and accuracy, images per second, ETA."""

    order = 95

    def __init__(self, file: Any = None) -> None:
        self.file = file or sys.stderr
        self.bar: Any = None
        self._t0 = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        from tqdm.auto import tqdm

        t = self.trainer
        self._t0 = time.perf_counter()
        self.bar = tqdm(
            total=t.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{t.recipe.epochs}",
            unit="batch",
            leave=False,
            dynamic_ncols=True,
            file=self.file,
        )

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.bar is None or logs is None:
            return
        self.bar.update(1)
        if batch % 10 == 0:  # reading the running sums syncs a GPU: not every step
            loss, acc = _running(logs)
            rate = logs["seen"] / max(1e-9, time.perf_counter() - self._t0)
            self.bar.set_postfix(loss=f"{loss:.4f}", acc=f"{acc:.4f}", img_s=f"{rate:.0f}")

    def on_validation_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
