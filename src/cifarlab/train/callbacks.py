"""Callbacks: the one extension point of the training loop, and the Keras 3 ones the reference needs.

Hooks, in the order the loop calls them (Keras' names where Keras has the hook):

    on_train_begin(logs)                       once, not again on resume
    on_epoch_begin(epoch, logs)                epoch is 0-based
    on_train_batch_begin(batch, logs)          logs: {"step": global step}
    on_train_batch_end(batch, logs)            logs: {"step", "loss" (tensor), "size", "loss_sum", "correct", "seen"}
    on_validation_begin(epoch, logs)           after the epoch's last step, before validation (always called)
    on_epoch_end(epoch, logs)                  logs: loss, accuracy, val_loss, val_accuracy, lr, epoch_seconds,
                                               events (callbacks append strings such as "best", "lr_reduced")
    on_train_end(logs)                         only when training finished (not on Ctrl-C or divergence)

Callbacks run sorted by their `order` (stable; default 0, the Keras ones and user callbacks). The run's own
machinery sits after them: the NaN guard (80), the history row (90), logging (95), the session clock (99),
the checkpoint (100) and
loggers such as TensorBoard or MLflow (110), so a checkpoint always holds every callback's updated state. A
callback's `state_dict()` is saved in every checkpoint and given back by `load_state_dict()` on resume.

`EarlyStopping` and `ReduceLROnPlateau` follow `keras/src/callbacks/early_stopping.py` and
`keras/src/callbacks/reduce_lr_on_plateau.py` (Keras 3) decision for decision, so that the pinned
reference recipe stops and lowers its learning rate at the same epochs Keras would for the same
sequence of `val_loss` values. Epochs are 0-based here, as in Keras' `on_epoch_end(epoch, ...)`;
the history table adds 1.

Callbacks talk to a small trainer interface (`TrainerLike`) instead of a model, and record what they
did as strings in `logs["events"]`: "best", "early_stop" (EarlyStopping), "lr_reduced"
(ReduceLROnPlateau).

Resuming: `state_dict()` holds everything a callback needs to continue mid-training. Load it before
or after `on_train_begin()`; a callback that was just loaded skips the reset `on_train_begin` would
otherwise do, so either call order resumes correctly (or the trainer may skip `on_train_begin` on
resume; the flag is cleared at the next epoch end). The learning rate itself lives in the
optimizer, whose state the trainer checkpoints.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np
from torch import Tensor

__all__ = [
    "Callback",
    "CallbackList",
    "EarlyStopping",
    "ReduceLROnPlateau",
    "TrainerLike",
]


class TrainerLike(Protocol):
    """What a callback may use of the trainer."""

    stop_training: bool

    def get_lr(self) -> float: ...

    def set_lr(self, lr: float) -> None: ...

    def get_weights(self) -> dict[str, Tensor]: ...

    def set_weights(self, state: dict[str, Tensor]) -> None: ...


def _events(logs: dict | None) -> list[str]:
    """The epoch's event list (a throwaway list when the caller passed no logs)."""
    if logs is None:
        return []
    return logs.setdefault("events", [])


# Direction of the metrics a Keras model can report, for mode="auto" in EarlyStopping. Keras reads
# `metric._direction` off the compiled metrics ("up" for accuracy-like metrics, "down" otherwise);
# we have no compiled metrics, so the names we can log are listed here.
_METRIC_DIRECTIONS: dict[str, str] = {
    "loss": "down",
    "accuracy": "up",
    "acc": "up",
    "binary_accuracy": "up",
    "categorical_accuracy": "up",
    "sparse_categorical_accuracy": "up",
    "top_k_categorical_accuracy": "up",
    "sparse_top_k_categorical_accuracy": "up",
    "auc": "up",
    "precision": "up",
    "recall": "up",
    "f1_score": "up",
    "fbeta_score": "up",
    "crossentropy": "down",
    "categorical_crossentropy": "down",
    "sparse_categorical_crossentropy": "down",
    "binary_crossentropy": "down",
    "mean_squared_error": "down",
    "mean_absolute_error": "down",
    "mse": "down",
    "mae": "down",
}


class Callback:
    """Base class: every hook is a no-op; state is empty."""

    trainer: Any  # the Trainer (TrainerLike is the part the Keras callbacks need)
    order: int = 0
    # A resumed run must give this callback its saved state (False for loggers, which may be added on resume).
    state_required: bool = True

    def set_trainer(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_begin(self, logs: dict | None = None) -> None:
        pass

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        pass

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        pass

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        pass

    def on_validation_begin(self, epoch: int, logs: dict | None = None) -> None:
        pass

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        pass

    def on_train_end(self, logs: dict | None = None) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class EarlyStopping(Callback):
    """Stop training when the monitored quantity stops improving (Keras 3 `EarlyStopping`).

    Keras rules reproduced here:
    - `min_delta` is taken as `abs(min_delta)` and negated in "min" mode, so an improvement is
      `current - min_delta < best` (min) or `current - min_delta > best` (max), strictly.
    - mode "auto": "min" if the monitor minus a "val_" prefix is "loss", else the metric's
      direction; unknown names raise ValueError (Keras raises it on the first epoch end, we raise
      at construction so a typo does not cost a training run).
    - `best` starts at +-inf and, as in Keras, is not reset by `on_train_begin`.
    - On every monitored epoch `wait` is incremented *before* the comparison; an improvement
      resets it to 0 only if it also beats `baseline` (when given). Training stops when
      `wait >= patience and epoch > 0`.
    - Epochs before `start_from_epoch`, and epochs whose logs lack the monitor (a warning), are
      ignored entirely.
    - With `restore_best_weights`, the weights of the first monitored epoch are snapshotted even if
      it does not improve (e.g. NaN), and the best weights are restored at train end whenever a
      snapshot exists, whether or not training stopped early.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        min_delta: float = 0.0,
        patience: int = 0,
        verbose: int = 0,
        mode: str = "auto",
        baseline: float | None = None,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
    ) -> None:
        self.monitor = monitor
        self.patience = patience
        self.verbose = verbose
        self.baseline = baseline
        self.min_delta = abs(min_delta)
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        if mode not in ("auto", "min", "max"):
            warnings.warn(f"EarlyStopping mode {mode} is unknown, fallback to auto mode.", stacklevel=2)
            mode = "auto"
        self.mode = mode
        self._minimize = self._resolve_minimize()
        if self._minimize:
            self.min_delta *= -1
        self.best: float = math.inf if self._minimize else -math.inf
        self.wait = 0
        self.stopped_epoch = 0
        self.best_epoch = 0
        self.best_weights: dict[str, Tensor] | None = None
        self.restored_epoch: int | None = None
        self._resumed = False

    def _resolve_minimize(self) -> bool:
        if self.mode == "min":
            return True
        if self.mode == "max":
            return False
        direction = _METRIC_DIRECTIONS.get(self.monitor.removeprefix("val_"))
        if direction is None:
            raise ValueError(
                f"EarlyStopping callback received monitor={self.monitor} but cannot determine "
                "whether that metric should be maximized or minimized. Pass mode='max' or mode='min'."
            )
        return direction == "down"

    def _is_improvement(self, value: float, reference: float) -> bool:
        # Keras: monitor_op(value - min_delta, reference), min_delta already signed.
        if self._minimize:
            return value - self.min_delta < reference
        return value - self.min_delta > reference

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self._resumed:  # a checkpoint was just loaded: keep its counters
            self._resumed = False
            return
        self.wait = 0
        self.stopped_epoch = 0
        self.best_weights = None
        self.best_epoch = 0
        self.restored_epoch = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._resumed = False  # training has continued: a later on_train_begin resets normally
        current = self._monitor_value(logs)
        if current is None or epoch < self.start_from_epoch:
            return
        if self.restore_best_weights and self.best_weights is None:
            # First monitored epoch: its weights are the best seen so far, improved or not.
            self.best_weights = self.trainer.get_weights()
            self.best_epoch = epoch

        self.wait += 1
        if self._is_improvement(current, self.best):
            self.best = current
            self.best_epoch = epoch
            _events(logs).append("best")
            if self.restore_best_weights:
                self.best_weights = self.trainer.get_weights()
            if self.baseline is None or self._is_improvement(current, self.baseline):
                self.wait = 0
            return

        if self.wait >= self.patience and epoch > 0:
            self.stopped_epoch = epoch
            self.trainer.stop_training = True
            _events(logs).append("early_stop")

    def on_train_end(self, logs: dict | None = None) -> None:
        if self.stopped_epoch > 0 and self.verbose > 0:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")
        if self.restore_best_weights and self.best_weights is not None:
            if self.verbose > 0:
                print(f"Restoring model weights from the end of the best epoch: {self.best_epoch + 1}.")
            self.trainer.set_weights(self.best_weights)
            self.restored_epoch = self.best_epoch

    def _monitor_value(self, logs: dict | None) -> float | None:
        logs = logs or {}
        value = logs.get(self.monitor)
        if value is None:
            warnings.warn(
                f"Early stopping conditioned on metric `{self.monitor}` which is not available. "
                f"Available metrics are: {','.join(k for k in logs if k != 'events')}",
                stacklevel=3,
            )
            return None
        return float(value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": float(self.best),
            "wait": self.wait,
            "stopped_epoch": self.stopped_epoch,
            "best_epoch": self.best_epoch,
            "restored_epoch": self.restored_epoch,
            "best_weights": (
                None if self.best_weights is None else {k: v.clone() for k, v in self.best_weights.items()}
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.wait = int(state["wait"])
        self.stopped_epoch = int(state["stopped_epoch"])
        self.best_epoch = int(state["best_epoch"])
        self.restored_epoch = state.get("restored_epoch")
        weights = state.get("best_weights")
        self.best_weights = None if weights is None else {k: v.clone() for k, v in weights.items()}
        self._resumed = True


class ReduceLROnPlateau(Callback):
    """Multiply the LR by `factor` when the monitored quantity plateaus (Keras 3 `ReduceLROnPlateau`).

    Keras rules reproduced here:
    - mode "auto" means "min" unless "acc" is a substring of the monitor name (a different rule from
      EarlyStopping's). Improvement: `current < best - min_delta` (min) or
      `current > best + min_delta` (max), strictly; `min_delta` is used as given (no abs).
    - Every epoch writes `logs["learning_rate"]`, the LR the epoch trained with (before any cut).
    - In cooldown, each epoch first decrements the cooldown counter and zeroes `wait`; the counter
      is re-checked after the decrement, so the last cooldown epoch already counts towards `wait`.
    - An improvement sets `best` and zeroes `wait` even in cooldown.
    - When `wait >= patience` the LR is cut to `max(lr * factor, min_lr)` if `lr > min_lr` compared
      in float32 (Keras' LR is a float32 variable), then cooldown starts and `wait` is zeroed.
      At the floor `wait` keeps growing and nothing else happens.
    - `on_train_begin` resets best, wait and cooldown.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        factor: float = 0.1,
        patience: int = 10,
        verbose: int = 0,
        mode: str = "auto",
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
    ) -> None:
        if factor >= 1.0:
            raise ValueError(f"ReduceLROnPlateau does not support a factor >= 1.0. Received factor={factor}")
        self.monitor = monitor
        self.factor = factor
        self.min_lr = min_lr
        self.min_delta = min_delta
        self.patience = patience
        self.verbose = verbose
        self.cooldown = cooldown
        if mode not in ("auto", "min", "max"):
            warnings.warn(f"Learning rate reduction mode {mode} is unknown, fallback to auto mode.", stacklevel=2)
            mode = "auto"
        self.mode = mode
        self._minimize = mode == "min" or (mode == "auto" and "acc" not in monitor)
        self.best = 0.0
        self.wait = 0
        self.cooldown_counter = 0
        self._resumed = False
        self._reset()

    def _reset(self) -> None:
        self.best = math.inf if self._minimize else -math.inf
        self.cooldown_counter = 0
        self.wait = 0

    def _is_improvement(self, current: float, best: float) -> bool:
        if self._minimize:
            return current < best - self.min_delta
        return current > best + self.min_delta

    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self._resumed:
            self._resumed = False
            return
        self._reset()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._resumed = False
        if logs is None:
            logs = {}
        old_lr = float(self.trainer.get_lr())
        logs["learning_rate"] = old_lr
        current = logs.get(self.monitor)
        if current is None:
            warnings.warn(
                f"Learning rate reduction is conditioned on metric `{self.monitor}` which is not "
                f"available. Available metrics are: {','.join(k for k in logs if k != 'events')}.",
                stacklevel=2,
            )
            return
        current = float(current)

        if self.in_cooldown():
            self.cooldown_counter -= 1
            self.wait = 0

        if self._is_improvement(current, self.best):
            self.best = current
            self.wait = 0
        elif not self.in_cooldown():
            self.wait += 1
            if self.wait >= self.patience:
                # float32 comparison as in Keras: stops "reducing" an LR already at the floor.
                if np.float32(old_lr) > np.float32(self.min_lr):
                    new_lr = max(old_lr * self.factor, self.min_lr)
                    self.trainer.set_lr(new_lr)
                    _events(logs).append("lr_reduced")
                    if self.verbose > 0:
                        print(f"\nEpoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to {new_lr}.")
                    self.cooldown_counter = self.cooldown
                    self.wait = 0

    def state_dict(self) -> dict[str, Any]:
        return {"best": float(self.best), "wait": self.wait, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.wait = int(state["wait"])
        self.cooldown_counter = int(state["cooldown_counter"])
        self._resumed = True


_HOOKS = (
    "on_train_begin",
    "on_epoch_begin",
    "on_train_batch_begin",
    "on_train_batch_end",
    "on_validation_begin",
    "on_epoch_end",
    "on_train_end",
)


class CallbackList:
    """Calls each hook on every callback, sorted by `order` (stable: equal orders keep the given order).

    A hook that no callback overrides costs nothing per batch: only overriding callbacks are called.
    """

    def __init__(self, callbacks: Iterable[Callback] | None = None, trainer: Any = None):
        self.callbacks: list[Callback] = sorted(callbacks or [], key=lambda cb: cb.order)
        self._by_hook = {h: self._overriding(h) for h in _HOOKS}
        if trainer is not None:
            self.set_trainer(trainer)

    def _overriding(self, hook: str) -> list[Callback]:
        base = getattr(Callback, hook)
        return [cb for cb in self.callbacks if getattr(type(cb), hook, base) is not base]

    def __iter__(self) -> Iterator[Callback]:
        return iter(self.callbacks)

    def __len__(self) -> int:
        return len(self.callbacks)

    def set_trainer(self, trainer: Any) -> None:
        for cb in self.callbacks:
            cb.set_trainer(trainer)

    def on_train_begin(self, logs: dict | None = None) -> None:
        for cb in self._by_hook["on_train_begin"]:
            cb.on_train_begin(logs)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        for cb in self._by_hook["on_epoch_begin"]:
            cb.on_epoch_begin(epoch, logs)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        for cb in self._by_hook["on_train_batch_begin"]:
            cb.on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        for cb in self._by_hook["on_train_batch_end"]:
            cb.on_train_batch_end(batch, logs)

    def on_validation_begin(self, epoch: int, logs: dict | None = None) -> None:
        for cb in self._by_hook["on_validation_begin"]:
            cb.on_validation_begin(epoch, logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        for cb in self._by_hook["on_epoch_end"]:
            cb.on_epoch_end(epoch, logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        for cb in self._by_hook["on_train_end"]:
            cb.on_train_end(logs)

    def state_dict(self) -> dict[str, Any]:
        entries = [{"class": type(cb).__name__, "state": cb.state_dict()} for cb in self.callbacks]
        return {"callbacks": [e for e in entries if e["state"]]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Give each stateful callback the saved state of the same class, in order. A callback that needs its
        state (`state_required`) and finds none means the run is resumed with other callbacks: an error. Saved
        state no callback takes (a logger dropped on resume) is ignored."""
        entries = list(state["callbacks"])
        for cb in self.callbacks:
            if not cb.state_dict():  # stateless now (and so it saved nothing)
                continue
            match = next((e for e in entries if e["class"] == type(cb).__name__), None)
            if match is None:
                if cb.state_required:
                    raise ValueError(f"the checkpoint holds no state for callback {type(cb).__name__}")
                continue
            entries.remove(match)
            cb.load_state_dict(match["state"])
