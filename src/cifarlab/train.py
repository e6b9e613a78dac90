"""The one training loop every recipe shares.

`Trainer.fit` runs epochs of (train, validate, callbacks), keeps a per-epoch history with events, writes
a resumable checkpoint after every epoch, and stops cleanly on Ctrl-C or a non-finite loss.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cifarlab.errors import UserError
from cifarlab.inference import autocast, autocast_dtype
from cifarlab.recipes import Recipe


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


# -- optimiser, schedule, weight averaging ---------------------------------------------------------------


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if recipe.optimizer == "adam":
        # Keras Adam adds epsilon to sqrt(v) before bias correction, PyTorch after; with eps=1e-7 the two
        # differ by < 1e-7 relative, so torch's fused implementation is used.
        return torch.optim.Adam(params, lr=recipe.lr, betas=recipe.betas, eps=recipe.eps)
    # SGD in airbench's decoupled form: recipe.lr and weight_decay are per 1024 examples and independent
    # of momentum; we use mean (not summed) losses, hence the factor batch_size.
    scale = recipe.batch_size / (1024 * (1 + 1 / (1 - recipe.momentum)))
    lr = recipe.lr * scale
    decay = recipe.weight_decay * scale  # per-step shrink factor for every parameter
    # BatchNorm shifts get a much larger LR (bias_lr_scale) but the same per-step decay.
    trainable = {id(p) for p in params}
    norm = [p for n, p in model.named_parameters() if ".norm" in n and id(p) in trainable]
    norm_ids = {id(p) for p in norm}
    other = [p for p in params if id(p) not in norm_ids]
    groups = [
        {
            "params": norm,
            "lr": lr * recipe.bias_lr_scale,
            "weight_decay": decay / (lr * recipe.bias_lr_scale),
        },
        {"params": other, "lr": lr, "weight_decay": decay / lr},
    ]
    return torch.optim.SGD(
        [g for g in groups if g["params"]], momentum=recipe.momentum, nesterov=recipe.nesterov
    )


def lr_multiplier(recipe: Recipe, step: int, total_steps: int) -> float:
    """Per-step LR multiplier for the 'onecycle' schedule (piecewise linear: start -> 1 -> final)."""
    if recipe.schedule != "onecycle":
        return 1.0
    peak = int(recipe.warmup_fraction * total_steps)
    if step < peak:
        frac = step / max(1, peak)
        return recipe.start_lr_fraction + (1 - recipe.start_lr_fraction) * frac
    frac = (step - peak) / max(1, total_steps - peak)
    return 1 + (recipe.final_lr_fraction - 1) * min(1.0, frac)


class Lookahead:
    """airbench's EMA: every k steps the EMA moves toward the weights and the weights jump to the EMA."""

    def __init__(self, model: nn.Module) -> None:
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        current = model.state_dict()
        for k, ema in self.state.items():
            ema.lerp_(current[k], 1 - decay)
            current[k].copy_(ema)


# -- the loop --------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    status: str  # "finished", "stopped" (Ctrl-C) or "diverged"
    train_seconds: float
    best_epoch: int | None = None  # 1-based
    stopped_epoch: int | None = None
    restored_epoch: int | None = None
    message: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Owns the model, optimiser and callbacks; the callbacks talk to it through get/set_lr and weights."""

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        train_loader: Any,
        val_loader: Any | None = None,
        callbacks: Sequence[Any] = (),
        device: torch.device | str = "cpu",
        checkpoint_path: Path | None = None,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
        progress: bool = False,
        log: Callable[[str], None] | None = print,
    ) -> None:
        self.model = model
        self.recipe = recipe
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.device = torch.device(device)
        self.dtype = autocast_dtype(recipe.precision, self.device)
        self.optimizer = build_optimizer(model, recipe)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        from cifarlab.callbacks import CallbackList

        self.callbacks = CallbackList(list(callbacks))
        self.callbacks.set_trainer(self)
        self.checkpoint_path = checkpoint_path
        self.on_epoch_end = on_epoch_end
        self.progress = progress
        self.log = log or (lambda s: None)
        self.stop_training = False
        self.history: list[dict[str, Any]] = []
        self.step = 0
        self.start_epoch = 0
        self.train_seconds = 0.0
        self.lookahead: Lookahead | None = None
        self.total_steps = recipe.epochs * len(train_loader)

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
        weights = self.model.regularized_weights() if hasattr(self.model, "regularized_weights") else []
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
            "lookahead": self.lookahead.state if self.lookahead is not None else None,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "stop_training": self.stop_training,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.callbacks.load_state_dict(state["callbacks"])
        if state.get("lookahead") is not None:
            self.lookahead = Lookahead(self.model)
            self.lookahead.state = state["lookahead"]
        self.history = list(state["history"])
        self.step = int(state["step"])
        self.start_epoch = int(state["epoch"])
        self.train_seconds = float(state["train_seconds"])
        self.stop_training = bool(state.get("stop_training", False))
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])

    def save_checkpoint(self) -> None:
        if self.checkpoint_path is not None:
            from cifarlab.runs import save_checkpoint

            save_checkpoint(self.checkpoint_path, self.state_dict())

    # -- epochs --------------------------------------------------------------------------------------------
    def _set_whiten_bias(self, epoch: int) -> None:
        whiten = getattr(self.model, "whiten", None)
        if whiten is not None and whiten.bias is not None:
            whiten.bias.requires_grad_(epoch < self.recipe.whiten_bias_epochs)

    def _check_finite(self, epoch: int) -> None:
        with torch.no_grad():
            total = sum(p.detach().float().sum() for p in self.model.parameters())
        if not math.isfinite(float(total)):
            raise TrainingDiverged(
                f"the weights became NaN/inf in epoch {epoch + 1}; training stopped. The last good checkpoint "
                "is kept; lower the learning rate (--set lr=...) and retry."
            )

    def train_epoch(self, epoch: int) -> dict[str, float]:
        r = self.recipe
        self.model.train()
        self._set_whiten_bias(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        seen = 0
        check_every = 1 if self.device.type == "cpu" else 50  # a NaN check syncs the GPU: do it rarely there
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=len(self.train_loader),
                desc=f"epoch {epoch + 1}/{r.epochs}",
                unit="batch",
                leave=False,
                dynamic_ncols=True,
                file=sys.stderr,
            )
        t0 = time.perf_counter()
        ema_start = r.ema_start_epochs * len(self.train_loader)
        lrs = []
        for i, (xb, yb) in enumerate(self.train_loader.epoch(epoch)):
            if r.schedule == "onecycle":
                m = lr_multiplier(r, self.step, self.total_steps)
                for g, base in zip(self.optimizer.param_groups, self.base_lrs):
                    g["lr"] = base * m
            lrs.append(self.get_lr())
            with autocast(self.device, self.dtype):
                logits = self.model(xb)
            ce = F.cross_entropy(logits.float(), yb, label_smoothing=r.label_smoothing)
            loss = ce + self.l2_term()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            self.step += 1
            if r.ema_decay > 0 and self.step >= ema_start and self.step % r.ema_every == 0:
                if self.lookahead is None:
                    self.lookahead = Lookahead(self.model)
                else:
                    rho = r.ema_decay**r.ema_every * (self.step / self.total_steps) ** r.ema_pow
                    self.lookahead.update(self.model, rho)
            n = len(yb)
            loss_sum += loss.detach().double() * n
            correct += (logits.detach().argmax(1) == yb).sum()
            seen += n
            if i % check_every == 0 and not math.isfinite(loss.item()):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at epoch {epoch + 1}, step {i + 1}; training stopped. "
                    "The last good checkpoint is kept; lower the learning rate (--set lr=...) and retry."
                )
            if bar is not None:
                bar.update(1)
                if i % 10 == 0:
                    rate = seen / max(1e-9, time.perf_counter() - t0)
                    bar.set_postfix(
                        loss=f"{loss_sum.item() / seen:.4f}",
                        acc=f"{correct.item() / seen:.4f}",
                        img_s=f"{rate:.0f}",
                    )
        if self.lookahead is not None:
            self.lookahead.update(self.model, 1.0)  # the weights end each epoch at the average
        if bar is not None:
            bar.close()
        mean_loss = loss_sum.item() / max(1, seen)
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"loss became {mean_loss} in epoch {epoch + 1}; training stopped")
        # The LR column: the epoch's mean LR (constant within an epoch for the plateau schedule).
        return {
            "loss": mean_loss,
            "accuracy": correct.item() / max(1, seen),
            "lr": _mean_lr(lrs),
        }

    @torch.no_grad()
    def validate(self) -> dict[str, float | None]:
        if self.val_loader is None:
            return {"val_loss": None, "val_accuracy": None}
        self.model.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        for xb, yb in self.val_loader.epoch(0):
            with autocast(self.device, self.dtype):
                logits = self.model(xb)
            loss_sum += F.cross_entropy(
                logits.float(), yb, label_smoothing=self.recipe.label_smoothing, reduction="sum"
            ).item()
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
        # Keras' val_loss includes the regularisation penalty, like the training loss.
        return {
            "val_loss": loss_sum / max(1, seen) + float(self.l2_term()),
            "val_accuracy": correct / max(1, seen),
        }

    def fit(self) -> FitResult:
        r = self.recipe
        status, message = "finished", ""
        if self.start_epoch == 0:
            self.callbacks.on_train_begin({})
        try:
            for epoch in range(self.start_epoch, r.epochs):
                if self.stop_training:
                    break
                self.callbacks.on_epoch_begin(epoch, {})
                t0 = time.perf_counter()
                logs: dict[str, Any] = dict(self.train_epoch(epoch))
                lr = logs.pop("lr")
                logs.update(self.validate())
                seconds = time.perf_counter() - t0
                logs["events"] = []
                self.callbacks.on_epoch_end(epoch, logs)
                self._check_finite(epoch)  # never checkpoint weights an exploding last step broke
                row = {
                    "epoch": epoch + 1,
                    "loss": logs["loss"],
                    "accuracy": logs["accuracy"],
                    "val_loss": logs["val_loss"],
                    "val_accuracy": logs["val_accuracy"],
                    "lr": lr,
                    "epoch_seconds": seconds,
                    "events": list(logs["events"]),
                }
                if "lr_reduced" in row["events"]:
                    row["new_lr"] = self.get_lr()
                self.history.append(row)
                self.train_seconds += seconds
                self.log(format_epoch_line(row, r.epochs))
                self.save_checkpoint()
                if self.on_epoch_end is not None:
                    self.on_epoch_end(row)
        except KeyboardInterrupt:
            status = "stopped"
            message = (
                f"interrupted during epoch {len(self.history) + 1}; the checkpoint after epoch "
                f"{len(self.history)} is kept"
            )
        except TrainingDiverged as e:
            status, message = "diverged", str(e)
        if status == "finished":
            self.callbacks.on_train_end({})
        result = FitResult(
            history=self.history, status=status, train_seconds=self.train_seconds, message=message
        )
        for cb in self.callbacks.callbacks:
            if hasattr(cb, "best_epoch") and getattr(cb, "best_epoch", None) is not None and self.history:
                result.best_epoch = int(cb.best_epoch) + 1
                if getattr(cb, "stopped_epoch", 0):
                    result.stopped_epoch = int(cb.stopped_epoch) + 1
                if getattr(cb, "restored_epoch", None) is not None:
                    result.restored_epoch = int(cb.restored_epoch) + 1
                    self.history[-1]["events"].append("restored_best")
        return result


def _mean_lr(lrs: list[float]) -> float:
    if not lrs:
        return 0.0
    return lrs[0] if min(lrs) == max(lrs) else math.fsum(lrs) / len(lrs)


# -- printing --------------------------------------------------------------------------------------------


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
