"""The one training loop every recipe shares.

`Trainer.fit` runs epochs of (train, validate) and calls its callbacks at every hook; everything else a run
does while training (LR schedules, weight averaging, early stopping, the NaN stop, the history, checkpoints,
progress, TensorBoard, MLflow) is a callback. It stops cleanly on Ctrl-C or a non-finite loss.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.device import autocast, autocast_dtype
from cifarlab.distributed import STOP_CHECK_STEPS, stop_requested
from cifarlab.errors import UserError
from cifarlab.train.callbacks import Callback, CallbackList
from cifarlab.train.graphs import GraphCaptureError, GraphedStep, unsupported_reason
from cifarlab.train.optim import build_optimizer

__all__ = ["FitResult", "History", "NaNGuard", "Trainer", "TrainingDiverged"]

log = logging.getLogger(__name__)


class TrainingDiverged(UserError):
    """The loss or the weights became NaN or infinite."""


_LOWER_LR = "lower the learning rate (--set lr=...) and retry"


def _kept(trainer: Any) -> str:
    n = len(trainer.history)
    return f"The checkpoint after epoch {n} is kept" if n else "No epoch finished, so nothing was saved"


class NaNGuard(Callback):
    """Stops training when the loss (checked every `every` steps) or, at each epoch end, the weights are not
    finite, before any checkpoint or weights file could take the broken weights."""

    order = 80

    def __init__(self, every: int = 1) -> None:
        self.every = every

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if logs is None or batch % self.every:
            return
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss became {loss} at epoch {len(self.trainer.history) + 1}, step {batch + 1}; training "
                f"stopped. {_kept(self.trainer)}; {_LOWER_LR}."
            )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None and not math.isfinite(logs["loss"]):
            raise TrainingDiverged(f"loss became {logs['loss']} in epoch {epoch + 1}; training stopped; {_LOWER_LR}")
        if not all_finite(self.trainer.model):
            raise TrainingDiverged(
                f"the weights became NaN/inf in epoch {epoch + 1}; training stopped. {_kept(self.trainer)}; "
                f"{_LOWER_LR}."
            )


def all_finite(model: nn.Module) -> bool:
    """Whether the model's parameters and floating-point buffers are all finite: a BatchNorm's running variance
    can turn NaN while every weight stays finite (then only saving the weights noticed)."""
    with torch.no_grad():
        tensors = [*model.parameters(), *(b for b in model.buffers() if b.is_floating_point())]
        total = sum(t.detach().float().sum() for t in tensors)
    return math.isfinite(float(total))


class History(Callback):
    """Appends the epoch's row (the talk's Table 1 columns plus events) to `trainer.history`."""

    order = 90

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        assert logs is not None
        row = {k: logs[k] for k in ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")}
        row = {"epoch": epoch + 1, **row, "events": list(logs["events"])}
        if "lr_reduced" in row["events"]:
            row["new_lr"] = self.trainer.get_lr()
        self.trainer.history.append(row)


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    status: str  # "finished", "stopped" (Ctrl-C) or "diverged"
    train_seconds: float
    best_epoch: int | None = None  # 1-based
    stopped_epoch: int | None = None
    restored_epoch: int | None = None
    message: str = ""
    step_mode: str = ""  # Trainer.step_mode: a CUDA graph, or eager and why


class Trainer:
    """Owns the model, optimizer and callbacks; callbacks reach the run through it (LR, weights, step, history)."""

    def __init__(
        self,
        model: nn.Module,
        recipe: Any,
        train_loader: Any,
        val_loader: Any | None = None,
        callbacks: Sequence[Callback] = (),
        device: torch.device | str = "cpu",
        run_dir: Path | None = None,
        dist: Any | None = None,
    ) -> None:
        self.model = model
        # Under torchrun (`cifarlab.distributed.Distributed`): the forward/backward goes through
        # DistributedDataParallel; `model` stays the plain module that is saved and that callbacks see.
        self.dist = dist
        self._ddp: nn.Module | None = None
        self._ddp_params: tuple[int, ...] = ()
        self.run_dir = run_dir  # where the run's files go (None outside a run folder), for callbacks that write
        self.recipe = recipe
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.device = torch.device(device)
        self.dtype = autocast_dtype(recipe.precision, self.device)
        self.optimizer = build_optimizer(model, recipe)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        if len(train_loader) == 0:
            raise UserError("the training set is smaller than one batch: lower batch_size or add images")
        # A NaN check reads the loss back from the device: every step on a CPU, rarely on a GPU.
        guard = NaNGuard(every=1 if self.device.type == "cpu" else 50)
        self.callbacks = CallbackList([*callbacks, guard, History()], trainer=self)
        self.stop_training = False
        self.partial_epoch = False  # the last epoch ended before its last batch (stop_training mid-epoch)
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.start_epoch = 0
        self.train_seconds = 0.0
        self.steps_per_epoch = len(train_loader)
        self.total_steps = recipe.epochs * self.steps_per_epoch
        self.max_epochs = recipe.epochs  # a callback may change it (the time budget runs until its deadline)
        self._graph: GraphedStep | None = None  # made by fit() where the step can be a CUDA graph
        self.eager_reason: str | None = None  # why not, where it cannot

    # -- what callbacks use --------------------------------------------------------------------------------
    def get_lr(self) -> float:
        return float(self.optimizer.param_groups[-1]["lr"])

    def set_lr(self, lr: float) -> None:
        ratio = lr / self.get_lr() if self.get_lr() > 0 else 0.0
        for g in self.optimizer.param_groups:
            g["lr"] = g["lr"] * ratio if ratio else lr

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def set_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)

    # -- loss ----------------------------------------------------------------------------------------------
    def l2_term(self) -> torch.Tensor:
        regularized = getattr(self.model, "regularized_weights", None)
        weights = regularized() if callable(regularized) else []
        if not weights or self.recipe.l2 == 0:
            return torch.zeros((), device=self.device)
        return self.recipe.l2 * sum(w.float().pow(2).sum() for w in weights)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": len(self.history),
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "callbacks": self.callbacks.state_dict(),
            "history": self.history,
            "train_seconds": self.train_seconds,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "stop_training": self.stop_training,
            # what the epochs so far trained with: a resume refuses a config.json edited since (experiment.prepare)
            "recipe": self.recipe.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.callbacks.load_state_dict(state["callbacks"])
        self.history = list(state["history"])
        self.step = int(state["step"])
        self.start_epoch = int(state["epoch"])
        self.train_seconds = float(state["train_seconds"])
        self.stop_training = bool(state.get("stop_training", False))
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    # -- many processes ------------------------------------------------------------------------------------
    def _forward_model(self) -> nn.Module:
        """The module the training step calls: the model itself, or (under torchrun) the model inside
        DistributedDataParallel, wrapped again when a callback changed which parameters train (DDP registers
        the trainable parameters once, when it is built)."""
        if self.dist is None:
            return self.model
        trainable = tuple(i for i, p in enumerate(self.model.parameters()) if p.requires_grad)
        if self._ddp is None or trainable != self._ddp_params:
            self._ddp, self._ddp_params = self.dist.wrap(self.model), trainable
        return self._ddp

    def _agree_before_validation(self) -> None:
        if self.dist is not None:
            self.dist.sync_buffers(self.model)  # BatchNorm statistics: rank 0's on every rank

    # -- epochs --------------------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        lrs = []
        for i, (xb, yb) in enumerate(self.train_loader.epoch(epoch)):
            self.callbacks.on_train_batch_begin(i, {"step": self.step})
            lrs.append(self.get_lr())
            graphed = self._graph_step(xb, yb) if self._graph is not None else None
            if graphed is not None:  # the whole step replayed from a CUDA graph
                step_loss, logits = graphed
                n, step_correct = len(yb), (logits.argmax(1) == yb).sum()
            else:
                step_loss, n, step_correct = self._eager_step(i, xb, yb)
            self.step += 1
            loss_sum += step_loss.double() * n
            correct += step_correct
            seen += n
            logs = {"step": self.step, "loss": step_loss, "size": n, "loss_sum": loss_sum, "correct": correct}
            self.callbacks.on_train_batch_end(i, {**logs, "seen": seen})
            if self.stop_training:  # as in Keras, a callback may end training after any batch
                self.partial_epoch = i + 1 < self.steps_per_epoch
                break
        self.callbacks.on_validation_begin(epoch, {})
        # The LR column: the epoch's mean LR (constant within an epoch for the plateau schedule).
        return {"loss": loss_sum.item() / max(1, seen), "accuracy": correct.item() / max(1, seen), "lr": _mean_lr(lrs)}

    def _graph_step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The step from the CUDA graph; None (and op by op from now on) when the step cannot be captured, e.g. a
        model whose forward reads a value back to the host. A failed capture ran nothing: the batch is not lost."""
        assert self._graph is not None
        try:
            return self._graph(xb, yb)
        except GraphCaptureError as e:
            self._graph, self.eager_reason = None, str(e)
            log.warning("training step: %s; it runs op by op from now on (cuda_graph=false skips the attempt)", e)
            return None

    def _eager_step(self, i: int, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
        """One training step op by op: (the step's loss, images, correct predictions), over all ranks under DDP."""
        r = self.recipe
        forward = self._forward_model()  # after the callbacks: one may have frozen a parameter (DDP re-wraps)
        with autocast(self.device, self.dtype):
            logits = forward(xb)
        ce = F.cross_entropy(logits.float(), yb, label_smoothing=r.label_smoothing)
        if self.dist is None:
            loss = ce + self.l2_term()
        else:
            l2 = self.l2_term()
            weight = self.train_loader.shard_weight(i)  # 1.0 but for a last partial batch split unevenly
            loss = (ce * weight if weight != 1.0 else ce) + l2
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        if self.dist is None:
            return loss.detach(), len(yb), (logits.detach().argmax(1) == yb).sum()
        # the global batch's numbers, the same on every rank: (sum of CE, correct, images) over ranks, and how many
        # ranks were asked to stop (a signal to one of them): all stop after the same step
        part = torch.stack(
            [
                ce.detach().double() * len(yb),
                (logits.detach().argmax(1) == yb).sum().double(),
                torch.full((), float(len(yb)), dtype=torch.float64, device=ce.device),  # no copy: no sync
                torch.full((), stop_requested(), dtype=torch.float64, device=ce.device),
            ]
        )
        total = self.dist.all_reduce_sum(part)
        if (total.device.type == "cpu" or i % STOP_CHECK_STEPS == 0) and total[3].item() > 0:
            raise KeyboardInterrupt  # every rank, here: the run stops as after Ctrl-C
        step_loss = (total[0] / total[2] + l2.detach().double()).float()
        return step_loss, self.train_loader.global_batch_size(i), total[1].round().long()

    @torch.no_grad()
    def validate(self) -> dict[str, float | None]:
        if self.val_loader is None:
            return {"val_loss": None, "val_accuracy": None}
        self.model.eval()
        # Summed on the device, read once (float64, in batch order: the same sum as adding Python floats).
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        for xb, yb in self.val_loader.epoch(0):
            with autocast(self.device, self.dtype):
                logits = self.model(xb)
            loss_sum += F.cross_entropy(
                logits.float(), yb, label_smoothing=self.recipe.label_smoothing, reduction="sum"
            ).double()
            correct += (logits.argmax(1) == yb).sum()
            seen += len(yb)
        # Keras' val_loss includes the regularisation penalty, like the training loss.
        return {
            "val_loss": loss_sum.item() / max(1, seen) + float(self.l2_term()),
            "val_accuracy": correct.item() / max(1, seen),
        }

    def prepare_step(self) -> None:
        """Decide how the training step runs: replayed from a CUDA graph where it can be, else op by op (and
        why). `fit` calls it after `on_train_begin` (a callback may add a hook there); call it before
        `train_epoch` when training without `fit` (the --budget probe), to time the step the run will take."""
        self.eager_reason = unsupported_reason(self)
        if self.eager_reason is None and self._graph is None:
            self._graph = GraphedStep(self)

    @property
    def warmup_steps(self) -> int:
        """Steps before the step's steady pace: the first (allocator, kernel loading, cuDNN's timing), and on a
        CUDA graph its eager warm-up steps and the capture."""
        return self._graph.steps_before_replay if self._graph is not None else 1

    @property
    def step_mode(self) -> str:
        """How the training step ran: a CUDA graph (and how often it was captured), or eagerly and why."""
        return self._graph.describe() if self._graph is not None else f"eager ({self.eager_reason or 'not started'})"

    def fit(self) -> FitResult:
        status, message = "finished", ""
        if self.start_epoch == 0:
            self.callbacks.on_train_begin({})
        self.prepare_step()  # after on_train_begin: a callback may have added a hook
        try:
            epoch = self.start_epoch
            while epoch < self.max_epochs and not self.stop_training:
                self.callbacks.on_epoch_begin(epoch, {})
                t0 = time.perf_counter()
                logs: dict[str, Any] = dict(self.train_epoch(epoch))
                self._agree_before_validation()
                logs.update(self.validate())
                if self.dist is not None:  # rank 0's numbers: every rank takes the same decisions on them
                    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
                    logs.update(zip(keys, self.dist.broadcast_floats([logs[k] for k in keys]), strict=True))
                logs["epoch_seconds"] = time.perf_counter() - t0
                # an epoch a callback cut short is recorded, as in Keras, and says so
                logs["events"] = ["partial_epoch"] if self.partial_epoch else []
                self.train_seconds += logs["epoch_seconds"]
                self.callbacks.on_epoch_end(epoch, logs)
                epoch += 1
        except KeyboardInterrupt:
            status = "stopped"
            done = len(self.history)
            kept = f"the checkpoint after epoch {done} is kept" if done else "no epoch had finished"
            message = f"interrupted during epoch {done + 1}; {kept}"
        except TrainingDiverged as e:
            status, message = "diverged", str(e)
        if status == "finished" and self.stop_training and not self.history:
            log.warning("a callback set stop_training before the first epoch ended: the model was not trained")
        if status == "finished":
            self.callbacks.on_train_end({})
        result = FitResult(
            history=self.history,
            status=status,
            train_seconds=self.train_seconds,
            message=message,
            step_mode=self.step_mode,
        )
        for cb in self.callbacks:
            if getattr(cb, "best_epoch", None) is not None and self.history:
                result.best_epoch = int(cb.best_epoch) + 1  # type: ignore[attr-defined]
                if getattr(cb, "stopped_epoch", 0):
                    result.stopped_epoch = int(cb.stopped_epoch) + 1  # type: ignore[attr-defined]
                if getattr(cb, "restored_epoch", None) is not None:
                    result.restored_epoch = int(cb.restored_epoch) + 1  # type: ignore[attr-defined]
                    # Marked only where it changed the weights: restoring the last epoch's own is a no-op (QA)
                    if result.restored_epoch != self.history[-1].get("epoch"):
                        self.history[-1]["events"].append("restored_best")
        return result


def _mean_lr(lrs: list[float]) -> float:
    if not lrs:
        return 0.0
    return lrs[0] if min(lrs) == max(lrs) else math.fsum(lrs) / len(lrs)
