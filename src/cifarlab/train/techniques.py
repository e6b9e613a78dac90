"""Training techniques a recipe switches on, each a short callback (airbench's habit: one named piece each).

`recipe_callbacks(recipe, has_val)` lists the callbacks a recipe asks for, in Keras' order for the reference
(EarlyStopping first, then the LR schedule), then weight averaging, the whitening-bias freeze and DropBlock's
schedule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cifarlab.errors import ConfigError
from cifarlab.models.dropblock import DropBlock2d
from cifarlab.registry import CALLBACKS
from cifarlab.train.callbacks import Callback, EarlyStopping
from cifarlab.train.optim import schedule_callbacks

__all__ = [
    "DropBlockSchedule",
    "FreezeStages",
    "Lookahead",
    "WhitenBiasFreeze",
    "frozen_stage_modules",
    "recipe_callbacks",
]


class Lookahead(Callback):
    """airbench's EMA: every `every` steps after `start_epochs`, the EMA moves toward the weights and the weights
    jump to the EMA, with a decay that ramps up as decay**every * progress**pow; each epoch ends at the EMA."""

    def __init__(self, decay: float, every: int, start_epochs: float, pow: float) -> None:
        self.decay, self.every, self.start_epochs, self.pow = decay, every, start_epochs, pow
        self.ema: dict[str, torch.Tensor] | None = None

    @staticmethod
    def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def _update(self, decay: float) -> None:
        assert self.ema is not None
        current = self._float_state(self.trainer.model)
        emas = list(self.ema.values())
        weights = [current[k] for k in self.ema]
        # One foreach call each (the same arithmetic as per-tensor lerp_/copy_): two launches on a GPU, not ~80.
        torch._foreach_lerp_(emas, weights, 1 - decay)
        torch._foreach_copy_(weights, emas)

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        t = self.trainer
        step = t.step
        if step < self.start_epochs * t.steps_per_epoch or step % self.every:
            return
        if self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in self._float_state(t.model).items()}
        else:
            self._update(self.decay**self.every * (step / t.total_steps) ** self.pow)

    def on_validation_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.ema is not None:
            self._update(1.0)  # the weights end each epoch at the average

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ema = state["ema"]
        if ema is not None:  # a checkpoint is read on the CPU: the average lives beside the weights
            current = self._float_state(self.trainer.model)
            ema = {k: v.to(current[k].device) for k, v in ema.items()}
        self.ema = ema


class WhitenBiasFreeze(Callback):
    """Train the whitening layer's bias only for the first `epochs` epochs (airbench), if the model has one.

    A fraction counts in steps (0.5: the first half of epoch 1's steps): once frozen, the first conv needs no
    input gradient, which saves a fifth of a step on a CPU."""

    def __init__(self, epochs: float) -> None:
        self.epochs = epochs
        self.epoch = 0

    def _bias(self) -> torch.Tensor | None:
        whiten = getattr(self.trainer.model, "whiten", None)
        return getattr(whiten, "bias", None) if whiten is not None else None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch
        bias = self._bias()
        if bias is not None:
            bias.requires_grad_(epoch < self.epochs)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        # Only ever switches it off: another callback (FreezeStages) may keep it frozen all along.
        if (
            self.epoch < self.epochs < self.epoch + 1
            and self.epoch + batch / self.trainer.steps_per_epoch >= self.epochs
        ):
            bias = self._bias()
            if bias is not None:
                bias.requires_grad_(False)


def frozen_stage_modules(model: nn.Module, n: int, model_name: str = "") -> list[nn.Module]:
    """The first `n` of the model's `stages()` (module groups, input first), checked."""
    stages_fn = getattr(model, "stages", None)
    name = model_name or type(model).__name__
    if not callable(stages_fn):
        raise ConfigError(
            f"freeze_stages={n}: the model {name} does not define stages(), so there are no stages to freeze; set "
            "freeze_stages=0, or give the model a stages() method returning its module groups, input first"
        )
    stages = list(stages_fn())
    if n > len(stages):
        raise ConfigError(f"freeze_stages={n}: the model {name} has {len(stages)} stages")
    return stages[:n]


class FreezeStages(Callback):
    """Keeps the first `n` stages frozen while training. Their parameters were taken out of training before the
    optimizer was built (`cifarlab.finetune.apply_freeze`); this keeps their BatchNorm layers in eval mode, so
    their running statistics stay the pretrained ones too, and keeps a whitening bias frozen after
    `WhitenBiasFreeze` turned it on."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._modules: list[nn.Module] | None = None

    def _frozen(self) -> list[nn.Module]:
        if self._modules is None:
            self._modules = frozen_stage_modules(self.trainer.model, self.n)
        return self._modules

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        for m in self._frozen():
            m.requires_grad_(False)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        for m in self._frozen():  # the loop puts the whole model in train mode every epoch
            m.train(False)


class DropBlockSchedule(Callback):
    """DropBlock's linear schedule (Ghiasi et al. 2018, section 3): before every step, each DropBlock2d in the
    model drops with target_prob * min(1, step / (ramp * total_steps)), from 0 up to its target.

    The paper found a fixed rate hurts early training; ramping over the whole run (ramp=1) is its choice. The
    rate is a function of the trainer's step alone, so the callback keeps no state: a resumed run continues the
    ramp exactly where the checkpoint's step left it.
    """

    def __init__(self, ramp: float = 1.0) -> None:
        if not 0.0 < ramp <= 1.0:
            raise ValueError(f"ramp must be in (0, 1], got {ramp}")
        self.ramp = ramp

    def fraction(self, step: int, total_steps: int) -> float:
        """The share of the target rate in use at `step` of `total_steps`."""
        return min(1.0, step / max(1.0, self.ramp * total_steps))

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        frac = self.fraction(self.trainer.step, self.trainer.total_steps)
        for m in self.trainer.model.modules():
            if isinstance(m, DropBlock2d):
                m.drop_prob = m.target_prob * frac


@CALLBACKS.register("dropblock_schedule")
def dropblock_schedule(recipe: Any) -> DropBlockSchedule:
    """DropBlock's linear ramp of the drop rate, from 0 to each DropBlock2d's target (for a model of your own)."""
    return DropBlockSchedule(recipe.dropblock_schedule or 1.0)


def recipe_callbacks(recipe: Any, has_val: bool) -> list[Callback]:
    """The callbacks a recipe's settings ask for, then those it names in `callbacks` (registered in
    `cifarlab.registry.CALLBACKS`); the run's own machinery is added by the experiment."""
    cbs: list[Callback] = []
    if recipe.early_stopping_patience > 0 and (has_val or not recipe.monitor.startswith("val_")):
        cbs.append(
            EarlyStopping(
                monitor=recipe.monitor,
                min_delta=recipe.early_stopping_min_delta,
                patience=recipe.early_stopping_patience,
                restore_best_weights=recipe.restore_best_weights,
            )
        )
    cbs += schedule_callbacks(recipe, has_val)
    if recipe.ema_decay > 0:
        cbs.append(Lookahead(recipe.ema_decay, recipe.ema_every, recipe.ema_start_epochs, recipe.ema_pow))
    if recipe.whiten_init or recipe.whiten_bias_epochs > 0:
        cbs.append(WhitenBiasFreeze(recipe.whiten_bias_epochs))
    if getattr(recipe, "freeze_stages", 0) > 0:
        cbs.append(FreezeStages(recipe.freeze_stages))  # after WhitenBiasFreeze: frozen wins
    names = getattr(recipe, "callbacks", ())
    if getattr(recipe, "dropblock_prob", 0) > 0 and recipe.dropblock_schedule > 0 and "dropblock_schedule" not in names:
        cbs.append(DropBlockSchedule(recipe.dropblock_schedule))
    for name in names:
        cb = CALLBACKS.build(name, recipe)
        if not isinstance(cb, Callback):  # a class, or None: else a TypeError from the trainer's set_trainer
            raise CALLBACKS.wrong_return(name, cb, "a cifarlab.Callback instance")
        cbs.append(cb)
    return cbs
