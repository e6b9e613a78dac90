"""Training to a wall-clock budget: `cifarlab train --budget 60s`.

The budget covers the run from process start to the test accuracy: interpreter start and imports, data
loading, the probe below, training, the softmax temperature fit and the final test evaluation. The report,
written afterwards, is timed separately (`report_seconds` in metrics.json).

1. **Probe.** A few real training steps (the recipe's loop, loader and augmentation) and one inference batch
   are timed at the recipe's width and at one other width, on this machine, now. Step time is modelled as
   `a + b * scale**2` through those two points (a conv's work grows with the product of its in and out
   channels; `a` is the per-step overhead that does not), which predicts every other width. The width is the
   key the model declares (`MODELS.register(..., uses=...)`): `widths` (airnet, reference_cnn), else
   `width_factor` (preact_resnet18, wrn, efficientnet_b0; up to its bound, 16). A model with neither (timm, a
   plugin's model that declares no `uses=`) keeps its size: one probe, and the plan chooses epochs and TTA only.
2. **Plan.** Of the widths `WIDTH_SCALES` times the recipe's, the widest one that trains the recipe's epochs
   in the time left after the predicted evaluation is chosen (a larger budget then buys more epochs at the
   widest width). Test-time augmentation is reduced (flip_translate -> flip -> none) while evaluation would
   take more than `EVAL_SHARE` of the budget. A recipe with progressive resizing (`train_scales`) keeps it: one
   more probe times a step on its smallest images, which gives each epoch's step cost relative to a full-size
   one (`a + b * scale**2` again, over the image side), and the epochs that fit are counted with those costs.
   Where the budget would end before half an epoch at the final size, the plan trains at full size throughout
   (a net that never saw full-size images tests badly on them) and its reason says so.
3. **Keep time.** The LR schedule of a step-indexed recipe (onecycle) runs over `trainer.total_steps`, which
   the `TimeBudget` callback re-estimates from the measured step times as training goes. So the schedule
   ends annealed when the time is up even if the machine slows down or speeds up mid-run, and training stops
   at the deadline (mid-epoch if need be). Plateau schedules just stop at the deadline.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cifarlab.calibrate import CALIBRATION_IMAGES
from cifarlab.errors import ConfigError
from cifarlab.inference import predict_logits, recipe_options
from cifarlab.train.callbacks import Callback

__all__ = [
    "PROCESS_START",
    "BudgetPlan",
    "Clock",
    "TimeBudget",
    "epochs_that_fit",
    "image_scale_costs",
    "parse_duration",
    "plan_budget",
    "process_age",
    "steps_that_fit",
]

WIDTH_SCALES = (2.0, 1.5, 1.0, 0.75, 0.5, 0.375, 0.25)
EVAL_SHARE = 0.1  # the most of the budget the final evaluation may take before TTA views are dropped
MARGIN = 0.015  # of the budget, kept free for the epoch-end work that is not timed (history, weights file)
# After the test result: writing metrics/status files and the interpreter's exit, which a budget (for the whole
# command) must leave room for. It was 1.3-1.7 s on a 2-core Zen 3 and 0.4 s on a Zen 4, mostly unloading torch;
# since the CLI ends with os._exit (`cli.exit_now`) it is 0.06 s on the Zen 4, where a 1.0 s reserve ended 30 s
# budgets 5.2% early (benchmarks/RESULTS.md, session 14). 0.25 s leaves room for a slower disk or CPU.
EXIT_SECONDS = 0.25
MIN_BUDGET = 5.0
_TTA_FALLBACK = {"flip_translate": "flip", "flip": "none"}
_TTA_VIEWS = {"none": 1, "flip": 2, "flip_translate": 6}
_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0, "m": 60.0, "min": 60.0}
_UNITS |= {"mins": 60.0, "minute": 60.0, "minutes": 60.0, "h": 3600.0, "hr": 3600.0, "hour": 3600.0}
_UNITS |= {"hours": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*")
_IMPORTED = time.perf_counter()


def usable_seconds(budget: float) -> float:
    """The part of a budget that start-up, training and the test evaluation may use."""
    return budget * (1 - MARGIN) - EXIT_SECONDS


def parse_duration(text: str | float, name: str = "--budget") -> float:
    """Seconds in '90', '90s', '2m', '1.5min', '1h30m', '10 minutes'; errors name the setting as `name`."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        s = text.strip().lower()
        pos, seconds, last = 0, 0.0, math.inf
        for m in _PART.finditer(s):
            unit = _UNITS.get(m.group(2))
            if m.group(2) == "" and pos > 0:  # '1m30', '1h30': the unit below the last one
                unit = {3600.0: 60.0, 60.0: 1.0}.get(last)
            # Parts from hours down to seconds, each once ('1m1m', '30 30', '1.5.2m' are typos, not sums).
            if m.start() != pos or unit is None or unit >= last:
                pos = -1
                break
            seconds += float(m.group(1)) * unit
            last = unit
            pos = m.end()
        if not s or pos != len(s):
            raise ConfigError(f"{name} {text!r} is not a duration; write e.g. 90s, 2m, 1.5min, 1h30m or 600")
    if not math.isfinite(seconds) or seconds < MIN_BUDGET:
        raise ConfigError(f"{name} {text!r}: give at least {MIN_BUDGET:g} s (the run has to start and evaluate)")
    return seconds


def process_age() -> float:
    """Seconds since this process started (from /proc on Linux; elsewhere since cifarlab.budget was imported)."""
    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - _IMPORTED


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Clock:
    """Where a budget's time counts from: process start (the CLI: start-up and imports are part of what the user
    waits for) or the moment `cifarlab.fit(budget=...)` was called (a notebook's kernel may be hours old)."""

    origin: str = "process start"
    started: float | None = None  # time.perf_counter() at the origin; None: the process's start

    @classmethod
    def from_now(cls, origin: str) -> Clock:
        return cls(origin, time.perf_counter())

    def elapsed(self) -> float:
        return process_age() if self.started is None else time.perf_counter() - self.started


PROCESS_START = Clock()


def scaled_widths(widths: tuple[int, ...], scale: float) -> tuple[int, ...]:
    """Channel counts times `scale`, rounded to multiples of 8 (at least 8): what vector units like."""
    return tuple(max(8, int(round(w * scale / 8)) * 8) for w in widths)


def width_key(recipe: Any) -> str | None:
    """The recipe key `--budget` scales for the recipe's model: `widths` where the model declares it, else
    `width_factor`, else None (the model declares neither, or nothing: its size stays, only epochs are planned)."""
    from cifarlab.registry import MODELS

    uses = MODELS.get(recipe.model).uses if recipe.model in MODELS else None
    return next((k for k in ("widths", "width_factor") if uses and k in uses), None)


def width_scales(recipe: Any) -> tuple[float, ...]:
    """The scales the budget may choose among, widest first: `WIDTH_SCALES`; those within width_factor's bound
    for a model scaled by it; only 1 for a model without a width key."""
    key = width_key(recipe)
    if key is None:
        return (1.0,)
    if key == "width_factor":
        top = next(f.metadata.get("le") for f in dataclasses.fields(recipe) if f.name == "width_factor")
        return tuple(s for s in WIDTH_SCALES if top is None or recipe.width_factor * s <= top)
    return WIDTH_SCALES


def scaled_recipe(recipe: Any, scale: float) -> Any:
    """`recipe` with its model's width (`width_key`) times `scale`; unchanged for a model without one."""
    key = width_key(recipe)
    if key == "widths":
        return recipe.replace(widths=scaled_widths(recipe.widths, scale))
    if key == "width_factor":
        return recipe.replace(width_factor=recipe.width_factor * scale)
    return recipe


@dataclass
class Probe:
    scale: float
    widths: tuple[int, ...]  # the net's widths; () where its width is `width_factor`, or it has none
    cost: float  # scale**2: a conv net's work per image relative to the recipe's width
    step_seconds: float | None = None  # measured; None where predicted from the two probes
    eval_seconds_per_image: float | None = None  # one inference view, measured on one batch
    width_factor: float | None = None  # the net's width_factor, for a model scaled by it


def _probe_at(recipe: Any, scale: float) -> Probe:
    """A probe (not yet measured) of `recipe` at `scale` x its model's width."""
    r, key = scaled_recipe(recipe, scale), width_key(recipe)
    widths = tuple(r.widths) if key == "widths" else ()
    return Probe(scale, widths, scale**2, width_factor=r.width_factor if key == "width_factor" else None)


def describe_width(plan: Any) -> str:
    """What the budget chose for the net's width, from a `BudgetPlan` or its stored dict (older runs: widths)."""
    d = plan if isinstance(plan, dict) else vars(plan)
    scale, factor, widths = d.get("scale", 1), d.get("width_factor"), d.get("widths")
    if factor is not None:
        return f"width_factor {factor:g} ({scale:g}x the recipe's)"
    if widths:
        return f"widths {list(widths)} ({scale:g}x the recipe's)"
    return "the recipe's net as it is (its model has no width setting to scale: epochs only)"


@dataclass
class BudgetPlan:
    """What the budget chose and why; stored in config.json and metrics.json, shown in the report."""

    budget_seconds: float
    planned_at: float  # seconds on the budget's clock when the plan was made (start-up, data loading and the probe)
    probe_seconds: float
    widths: tuple[int, ...]
    scale: float
    epochs: int
    tta: str
    predicted_step_seconds: float
    predicted_train_seconds: float
    predicted_eval_seconds: float
    steps_per_epoch: int
    probes: list[Probe] = field(default_factory=list)
    reason: str = ""
    width_factor: float | None = None  # the chosen width_factor, for a model scaled by it (then widths is ())
    # Each epoch's step time relative to a full-size step (`train_scales`; the last holds); empty: all 1.
    epoch_costs: list[float] = field(default_factory=list)
    predicted_epochs: float = 0.0
    taken_seconds: float | None = None  # clock origin to test accuracy, filled in at the end
    clock: Clock = PROCESS_START  # what the budget counts from; stored as its origin

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["clock"] = self.clock.origin
        return d

    def describe(self) -> str:
        return (
            f"budget {self.budget_seconds:g} s: {describe_width(self)}, "
            f"~{self.predicted_epochs:.1f} epochs ({self.predicted_step_seconds * 1000:.0f} ms/step at full size), "
            f"TTA {self.tta}; "
            f"{self.planned_at:.1f} s used before training (start-up, data, {self.probe_seconds:.1f} s probe), "
            f"~{self.predicted_train_seconds:.0f} s to train, ~{self.predicted_eval_seconds:.1f} s to evaluate"
            + (f": {self.reason}" if self.reason else "")
        )


class _StepTimes(Callback):
    """Probe helper: timestamps after each step; stops the epoch after `steps` steps."""

    def __init__(self, steps: int, device: torch.device) -> None:
        self.steps, self.device, self.times = steps, device, [time.perf_counter()]

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter())
        if len(self.times) > self.steps:
            self.trainer.stop_training = True


def _probe(
    recipe: Any,
    scale: float,
    build: Callable[[Any], nn.Module],
    loader: Callable[[Any], Any],
    x_eval: torch.Tensor | None,
    device: torch.device,
    steps: int,
) -> Probe:
    """Time `steps` training steps of epoch 1 (at its image size) at `scale` x the recipe's width, and one
    inference batch `x_eval` (None: not timed)."""
    from cifarlab.train.loop import Trainer

    r = scaled_recipe(recipe, scale)
    model = build(r)
    timer = _StepTimes(0, device)
    trainer = Trainer(model, r, loader(r), None, callbacks=[timer], device=device)
    trainer.prepare_step()  # the step the run will take: on a GPU, replayed from a CUDA graph
    skip = trainer.warmup_steps  # not counted: allocator, kernel loading, cuDNN's timing, a graph's capture
    timer.steps = steps + skip
    trainer.train_epoch(0)
    step = (timer.times[-1] - timer.times[skip]) / max(1, len(timer.times) - 1 - skip)
    per_img = _eval_seconds_per_image(model, r, x_eval, device) if x_eval is not None else None
    p = _probe_at(recipe, scale)
    p.step_seconds, p.eval_seconds_per_image = step, per_img
    return p


def image_scale_costs(scales: tuple[float, ...], smallest_ratio: float) -> list[float]:
    """Step time of each epoch of `scales` relative to a full-size step, as `alpha + (1 - alpha) * s**2` (the
    convolutions' work follows the pixel count, `alpha` is the part that does not), with `alpha` fitted to the
    measured ratio `smallest_ratio` at the smallest scale."""
    s_min = min(scales)
    if s_min >= 1:
        return [1.0 for _ in scales]
    alpha = min(1.0, max(0.0, (smallest_ratio - s_min**2) / (1 - s_min**2)))
    return [alpha + (1 - alpha) * s**2 for s in scales]


def epochs_that_fit(seconds: float, epoch_seconds: Callable[[int], float]) -> float:
    """How many epochs (a fraction for the last) fit in `seconds`, epoch e taking `epoch_seconds(e)`."""
    e = 0
    while seconds > 0 and e < 100_000:
        cost = max(epoch_seconds(e), 1e-12)
        if seconds < cost:
            return e + seconds / cost
        seconds -= cost
        e += 1
    return float(e)


def _cost(costs: Sequence[float], epoch: int) -> float:
    return costs[min(epoch, len(costs) - 1)] if costs else 1.0


def _eval_seconds_per_image(model: nn.Module, recipe: Any, x_eval: torch.Tensor, device: torch.device) -> float:
    """Seconds per image of one inference view (no TTA), timed on `x_eval` after a warm-up."""
    opts = {**recipe_options(recipe), "tta": "none"}
    predict_logits(model, x_eval[:8], device=device, **opts)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    predict_logits(model, x_eval, device=device, **opts)
    _sync(device)
    return (time.perf_counter() - t0) / len(x_eval)


def _line(p1: Probe, p2: Probe, what: str = "step_seconds") -> tuple[float, float]:
    """(a, b) of `what` (step_seconds or eval_seconds_per_image) = a + b * cost through two probes (b, a >= 0)."""
    y1, y2 = getattr(p1, what), getattr(p2, what)
    assert y1 is not None and y2 is not None
    if abs(p1.cost - p2.cost) < 1e-9:
        return 0.0, y1 / p1.cost
    b = (y1 - y2) / (p1.cost - p2.cost)
    if b <= 0:  # overhead-bound (a GPU with a small net): width costs nothing measurable
        return min(y1, y2), 0.0
    a = max(0.0, y1 - b * p1.cost)
    return a, b


@dataclass
class _Option:
    probe: Probe
    step: float
    tta: str
    eval_seconds: float
    train_seconds: float
    epochs: float


def _options(
    probes: list[Probe],
    a: float,
    b: float,
    eval_1x: float,
    recipe: Any,
    budget: float,
    now: float,
    n: dict,
    eval_line: tuple[float, float] | None = None,
    epoch_costs: Sequence[float] = (),
) -> list[_Option]:
    """What each width would get from the budget, widest first, under full-size step time `a + b * cost` (times
    `epoch_costs[e]` in epoch e: image scales); inference time per image is `eval_line` (a, b) in the same way
    once two widths were timed, else it scales like the step time (`eval_1x` seconds per image at the recipe's
    width)."""
    out = []
    for p in probes:
        step = p.step_seconds if p.step_seconds is not None else a + b * p.cost
        if p.eval_seconds_per_image is not None:
            per_img = p.eval_seconds_per_image
        elif eval_line is not None:
            # Narrow nets infer relatively slower than they train: the whitening layer and the memory traffic of
            # a batch do not shrink with the width, so the step time's ratio under-predicts (60 s budget: 5 s
            # predicted, 15 s taken); the two measured widths' own line does not.
            per_img = eval_line[0] + eval_line[1] * p.cost
        else:
            per_img = eval_1x * (a + b * p.cost) / max(a + b, 1e-12)
        tta = recipe.tta
        while _TTA_VIEWS[tta] * per_img * n["test"] > EVAL_SHARE * budget and tta in _TTA_FALLBACK:
            tta = _TTA_FALLBACK[tta]
        eval_s = _TTA_VIEWS[tta] * per_img * n["test"]
        left = usable_seconds(budget) - now - eval_s

        def per_epoch(e: int, step: float = step, per_img: float = per_img) -> float:
            return step * _cost(epoch_costs, e) * n["steps"] + per_img * n["val"]

        out.append(_Option(p, step, tta, eval_s, left, epochs_that_fit(left, per_epoch)))
    return out


def _choose(options: list[_Option], epochs: int) -> _Option:
    """The widest net that trains the recipe's epochs; else the narrowest (it trains the most epochs)."""
    return next((o for o in options if o.epochs >= epochs), options[-1])


def plan_budget(
    recipe: Any,
    budget_seconds: float,
    *,
    build: Callable[[Any], nn.Module],
    loader: Callable[[Any], Any],
    x_eval: torch.Tensor,
    n_test: int,
    n_val: int,
    steps_per_epoch: int,
    device: torch.device,
    probe_steps: int = 2,
    clock: Clock = PROCESS_START,
) -> tuple[Any, BudgetPlan]:
    """Probe, then choose widths, epochs and TTA for `budget_seconds` on `clock` (from process start); returns
    (the recipe to train, the plan). `build(recipe)` makes a model on the device; `loader(recipe)` the training
    BatchLoader; `x_eval` is one batch of evaluation images (uint8) to time inference on."""
    t0 = time.perf_counter()
    scales = tuple(recipe.train_scales)
    full = recipe.replace(train_scales=()) if scales else recipe  # the width probes time full-size steps
    scales_w = width_scales(recipe)
    probes = [_probe_at(recipe, scale) for scale in scales_w]
    # The temperature fit (`cifarlab.calibrate`) runs inference on up to 1,000 more images before the test.
    n_cal = min(CALIBRATION_IMAGES, n_val or CALIBRATION_IMAGES) if recipe.calibrate else 0
    n = {"test": n_test + n_cal, "val": n_val, "steps": steps_per_epoch}

    def measure(scale: float) -> Probe:
        i = scales_w.index(scale)
        measured = _probe(full, scale, build, loader, x_eval, device, probe_steps)
        probes[i] = measured
        return measured

    base = measure(1.0)
    assert base.step_seconds is not None and base.eval_seconds_per_image is not None
    costs: list[float] = []
    if scales and min(scales) < 1:
        small = _probe(full.replace(train_scales=(min(scales),)), 1.0, build, loader, None, device, probe_steps)
        assert small.step_seconds is not None
        costs = image_scale_costs(scales, small.step_seconds / base.step_seconds)
    eval_1x = base.eval_seconds_per_image
    if len(probes) > 1:
        # Second probe: the width a compute-bound guess would choose (or half width), to fit `a + b * cost`.
        now = clock.elapsed()
        guess = _choose(_options(probes, 0.0, base.step_seconds, eval_1x, recipe, budget_seconds, now, n), 1)
        second = measure(guess.probe.scale if guess.probe.scale != 1.0 else 0.5)
        a, b = _line(base, second)
        eval_line: tuple[float, float] | None = _line(base, second, "eval_seconds_per_image")
    else:  # no width to choose: the one measured net is the plan's
        a, b, eval_line = 0.0, base.step_seconds, None
    now = clock.elapsed()
    options = _options(probes, a, b, eval_1x, recipe, budget_seconds, now, n, eval_line, costs)
    o = _choose(options, recipe.epochs)
    note = ""
    if costs and o.epochs < len(scales) - 0.5:
        # The run would end before half an epoch at the final image size: train at full size throughout.
        note = (
            f"; full-size images throughout (train_scales={list(scales)} left out: the budget ends before half an "
            "epoch at the final size)"
        )
        recipe, costs = full, []
        options = _options(probes, a, b, eval_1x, recipe, budget_seconds, now, n, eval_line)
        o = _choose(options, recipe.epochs)
    elif costs:
        shown = ", ".join(f"{c:.2f}" for c in costs)
        note = f"; train_scales={list(scales)} kept (step cost per epoch vs full size: {shown})"
    if len(probes) == 1:
        reason = f"model {recipe.model} has no width setting to scale, so only epochs and TTA were planned"
        if o.epochs * steps_per_epoch >= 1:
            reason += f": ~{o.epochs:.1f} of the recipe's {recipe.epochs} epochs fit in the time left"
    elif o.epochs >= recipe.epochs:
        reason = f"the widest net that trains the recipe's {recipe.epochs} epochs in the time left"
        if o is options[0]:
            reason += f"; the time left buys ~{o.epochs:.1f} epochs of it in all"
            if math.ceil(o.epochs) > o.epochs:  # the header's "N epochs max": the last one ends at the deadline
                reason += f" ({math.ceil(o.epochs)} epochs max, the last one cut at the deadline)"
    else:
        reason = f"even the narrowest net trains only {o.epochs:.2f} of the recipe's {recipe.epochs} epochs"
    if o.epochs < recipe.epochs and o.epochs * steps_per_epoch < 1:
        raise ConfigError(
            f"a budget of {budget_seconds:g} s leaves no time to train on this machine: {now:.1f} s went to "
            f"start-up, data loading and the probe, and evaluating takes ~{o.eval_seconds:.1f} s; give a "
            f"larger {'--budget' if clock.started is None else 'budget='}"  # the CLI's clock, or fit()'s
        )
    chosen = scaled_recipe(recipe, o.probe.scale).replace(epochs=max(1, math.ceil(o.epochs)), tta=o.tta)
    if o.probe.eval_seconds_per_image is None:
        # The chosen width was not probed, so its evaluation time is an extrapolation, and the deadline hangs on
        # it (60 s budgets ended 5% early or 17% late on it): time one inference batch of that net now.
        per_img = _eval_seconds_per_image(build(chosen), chosen, x_eval, device)
        o.probe.eval_seconds_per_image = per_img
        eval_s = _TTA_VIEWS[o.tta] * per_img * n_test
        o.train_seconds, o.eval_seconds = o.train_seconds + o.eval_seconds - eval_s, eval_s
    plan = BudgetPlan(
        budget_seconds=budget_seconds,
        planned_at=now,
        probe_seconds=time.perf_counter() - t0,
        widths=o.probe.widths,
        width_factor=o.probe.width_factor,
        scale=o.probe.scale,
        epochs=chosen.epochs,
        tta=o.tta,
        predicted_step_seconds=o.step,
        predicted_train_seconds=max(0.0, o.train_seconds),
        predicted_eval_seconds=o.eval_seconds,
        steps_per_epoch=steps_per_epoch,
        probes=probes,
        reason=reason + note,
        clock=clock,
        epoch_costs=costs,
        predicted_epochs=o.epochs,
    )
    return chosen, plan


class TimeBudget(Callback):
    """Ends training at `deadline` (seconds on `clock`: process age by default), re-estimating
    `trainer.total_steps` from the measured step times so a step-indexed LR schedule finishes annealed just then."""

    order = 5  # before the schedules read total_steps at the next step
    state_required = False

    def __init__(
        self,
        deadline: float,
        device: torch.device | str = "cpu",
        window: int = 30,
        clock: Clock = PROCESS_START,
        epoch_costs: Sequence[float] = (),
    ) -> None:
        self.deadline = deadline
        self.clock = clock
        self.epoch_costs = list(epoch_costs)  # each epoch's step time relative to a full-size one (last holds)
        self.epoch = 0
        self.device = torch.device(device)
        self.check_every = 1 if self.device.type == "cpu" else 10  # a GPU is timed only after a sync
        self.stamps: deque[tuple[int, float]] = deque(maxlen=window)
        self.epoch_overhead = 0.0  # validation + epoch-end work, measured
        self._epoch_end_t: float | None = None
        self.stopped_at_step: int | None = None
        self._resumed: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # At each checkpoint: what a resumed run needs to go on with the same plan (the LR schedule's length as
        # last estimated, the training time the budget had left) rather than train every planned epoch.
        return {
            "total_steps": int(self.trainer.total_steps),
            "seconds_left": self.deadline - self.clock.elapsed(),
            "epoch_overhead": self.epoch_overhead,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resumed = dict(state)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.trainer.max_epochs = 10**9  # the deadline ends training, not the recipe's epoch count

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self._resumed is not None:
            # A resumed session (its on_train_begin is not called): the schedule goes on from the step count it had,
            # and training ends when the time the first session had left is spent (its start-up not counted).
            state, self._resumed = self._resumed, None
            self.trainer.max_epochs = 10**9
            self.trainer.total_steps = int(state["total_steps"])
            self.deadline = self.clock.elapsed() + float(state["seconds_left"])
            self.epoch_overhead = float(state.get("epoch_overhead", 0.0))
        if self._epoch_end_t is not None:
            self.epoch_overhead = max(self.epoch_overhead, time.perf_counter() - self._epoch_end_t)
        self.epoch = epoch
        self.stamps.clear()  # the step after an epoch boundary includes a new permutation: start afresh

    def on_validation_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_end_t = time.perf_counter()

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        t = self.trainer
        if t.step % self.check_every or math.isinf(self.deadline):  # inf: a resumed run without the budget's state
            return
        _sync(self.device)
        self.stamps.append((t.step, time.perf_counter()))
        left = self.deadline - self.clock.elapsed() - self.epoch_overhead  # the last epoch's end still has to run
        if left <= 0 or len(self.stamps) < 2:
            if left <= 0:
                self._stop(t)
            return
        (s0, t0), (s1, t1) = self.stamps[0], self.stamps[-1]
        per_step = (t1 - t0) / (s1 - s0)  # at this epoch's image size (the stamps restart every epoch)
        steps_left = steps_that_fit(
            left, per_step, self.epoch, t.step, t.steps_per_epoch, self.epoch_overhead, self.epoch_costs
        )
        if steps_left <= 0:
            self._stop(t)
        else:
            t.total_steps = t.step + steps_left

    def _stop(self, t: Any) -> None:
        t.total_steps = t.step
        t.stop_training = True
        self.stopped_at_step = t.step


def steps_that_fit(
    seconds: float,
    per_step: float,
    epoch: int,
    step: int,
    steps_per_epoch: int,
    epoch_overhead: float,
    epoch_costs: Sequence[float] = (),
) -> int:
    """Training steps that fit in `seconds` from global step `step` in epoch `epoch`, a step now taking
    `per_step` and one in epoch e `per_step * cost(e) / cost(epoch)`; every further epoch boundary costs
    `epoch_overhead` (validation and the epoch-end work)."""
    unit = per_step / _cost(epoch_costs, epoch)
    in_epoch = (-step) % steps_per_epoch  # steps left in this epoch (0: it just ended)
    steps, e = 0, epoch
    while seconds > 0 and e < epoch + 100_000:
        each = unit * _cost(epoch_costs, e)
        if seconds < in_epoch * each:
            return steps + int(seconds / each)
        seconds -= in_epoch * each
        steps += in_epoch
        seconds -= epoch_overhead
        e, in_epoch = e + 1, steps_per_epoch
    return steps
