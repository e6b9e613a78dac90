"""Recipes: every hyperparameter of a training run in one frozen dataclass, grouped like airbench's dict.

A recipe is data. The training loop reads it and nothing else, so a run's `config.json` (which stores
`recipe.to_dict()`) is enough to reproduce it. Each field carries its group and its bounds (`param(...)`);
`validate` checks them all, plus the few rules that involve two fields. The accepted values of `model`,
`augment`, `optimizer` and `schedule` are whatever is registered in `cifarlab.registry`; the other fixed
choices are `Literal` types.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import cifarlab.augment  # noqa: F401  (registers the built-in augmentations)
import cifarlab.models  # noqa: F401  (registers the built-in models)
import cifarlab.train.optim  # noqa: F401  (registers the built-in optimizers and schedules)
from cifarlab.data.dataset import NAMED_DATASETS, canonical_dataset_name
from cifarlab.errors import ConfigError
from cifarlab.registry import AUGMENTS, CALLBACKS, DEFAULT_RECIPE, MODELS, OPTIMIZERS, SCHEDULES, Registry

__all__ = [
    "DEFAULT_RECIPE",
    "GROUPS",
    "RECIPES",
    "Recipe",
    "choices",
    "field_types",
    "get_recipe",
    "param",
    "register_recipe",
    "unused_size_keys",
    "validate",
]

GROUPS = (
    "run",
    "data",
    "model",
    "objective",
    "optimizer",
    "finetune",
    "schedule",
    "averaging",
    "augmentation",
    "evaluation",
    "performance",
)

Bound = tuple[float | None, float | None, bool]  # (low, high, high_is_open)


def param(
    default: Any,
    group: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Registry | None = None,
    each: tuple[float, float] | None = None,
    size: bool = False,
    help: str = "",
) -> Any:
    """A recipe field with its group, bounds (`gt`/`ge`/`le`/`lt`; for tuples `each` = [low, high)) and, for a
    registry-backed string, the registry its value must name. `size=True`: a model-size key, read only by the
    models that declare it (`MODELS.register(..., uses=...)`); `validate` refuses it changed for another model."""
    meta = {"group": group, "gt": gt, "ge": ge, "le": le, "lt": lt, "choices": choices, "each": each, "help": help}
    meta["size"] = size
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


Scaling = Literal["unit", "standardize"]
TTA = Literal["none", "flip", "flip_translate"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Monitor = Literal["val_loss", "val_accuracy", "loss", "accuracy"]


@dataclass(frozen=True)
class Recipe:
    # -- run ----------------------------------------------------------------------------------------------
    name: str = param("custom", "run", help="becomes part of the run folder's name")
    description: str = param("", "run")
    seed: int = param(0, "run", ge=0, le=2**63 - 1, help="split, init, shuffling and augmentation")
    callbacks: tuple[str, ...] = param((), "run", choices=CALLBACKS, help="registered callbacks to add, by name")
    # -- data ---------------------------------------------------------------------------------------------
    dataset: str = param("cifar10", "data", help="cifar10, cifar100, fashion_mnist, or an ImageFolder path")
    val_fraction: float = param(0.2, "data", ge=0.0, le=0.9, help="random split off the training set; 0: none")
    stratified_split: bool = param(False, "data")
    scaling: Scaling = param("unit", "data", help="unit: pixels/255 (the reference); standardize: then mean/std")
    # -- model --------------------------------------------------------------------------------------------
    model: str = param("reference_cnn", "model", choices=MODELS)
    # The model-size keys (`size=True`): each model declares the ones it reads (its `uses=`); the others keep the
    # recipe's value (or the default) for it, as `validate` checks.
    widths: tuple[int, ...] = param(
        (64, 128, 128), "model", size=True, help="airnet, reference_cnn: channels of the three conv stages"
    )
    dense_width: int = param(256, "model", gt=0, size=True, help="reference_cnn: units of the dense layer")
    dropout: tuple[float, ...] = param((0.4, 0.3), "model", each=(0.0, 1.0))
    bn_momentum: float = param(0.01, "model", ge=0.0, le=1.0, help="PyTorch convention: Keras 0.99 == 0.01")
    bn_eps: float = param(1e-3, "model", gt=0)
    whiten_init: bool = param(False, "model", help="first conv set by patch whitening of the training images")
    whiten_kernel: int = param(2, "model", ge=1, le=5, size=True, help="airnet: the whitening conv's kernel size")
    whiten_width: int = param(
        0,
        "model",
        ge=0,
        size=True,
        help="airnet: whitening filters; 0: 2*C*k*k; a source's width to fine-tune across channels",
    )
    whiten_bias_epochs: float = param(
        0.0, "model", ge=0, help="train the whitening bias this many epochs (a fraction counts in steps)"
    )
    head_scale: float = param(
        1.0, "model", gt=0, size=True, help="airnet: logits multiplier (airbench nets scale their head down)"
    )
    # DropBlock (Ghiasi et al. 2018): reference_cnn, preact_resnet18, wrn, efficientnet_b0, in their last two stages.
    dropblock_prob: float = param(0.0, "model", ge=0.0, lt=1.0, help="DropBlock's drop probability; 0: off")
    dropblock_size: int = param(3, "model", ge=1, le=15, help="side of DropBlock's squares, in feature-map pixels")
    dropblock_schedule: float = param(
        1.0, "model", ge=0.0, le=1.0, help="share of training over which the DropBlock rate rises from 0; 0: constant"
    )
    # The deeper networks (preact_resnet18, wrn, efficientnet_b0).
    depth: int = param(16, "model", ge=10, le=202, size=True, help="wrn: layers, 6n+4 (16: WRN-16-k)")
    width_factor: float = param(
        1.0, "model", gt=0, le=16, size=True, help="channel multiplier of preact_resnet18, efficientnet_b0; wrn: its k"
    )
    stochastic_depth: float = param(0.0, "model", ge=0.0, lt=1.0, help="drop rate of the last residual block")
    timm_name: str = param("", "model", help="model=timm: the timm model to build (needs the timm package)")
    # -- objective ----------------------------------------------------------------------------------------
    l2: float = param(1e-4, "objective", ge=0, help="Keras kernel_regularizer: l2 * sum(w^2) added to the loss")
    label_smoothing: float = param(0.0, "objective", ge=0.0, le=0.99)
    # -- optimizer ----------------------------------------------------------------------------------------
    optimizer: str = param("adam", "optimizer", choices=OPTIMIZERS)
    lr: float = param(1e-3, "optimizer", gt=0, help="adam: the LR; sgd, muon: airbench's LR per 1024 examples")
    betas: tuple[float, float] = param((0.9, 0.999), "optimizer", each=(0.0, 1.0))
    eps: float = param(1e-7, "optimizer", gt=0, help="Keras' Adam epsilon, not PyTorch's 1e-8")
    momentum: float = param(0.9, "optimizer", ge=0.0, le=0.999)
    nesterov: bool = param(True, "optimizer")
    weight_decay: float = param(0.0, "optimizer", ge=0, help="sgd, muon: decoupled decay per 1024 examples")
    bias_lr_scale: float = param(1.0, "optimizer", gt=0, help="LR multiplier for BN parameters (sgd, muon)")
    muon_lr: float = param(
        0.24, "optimizer", gt=0, help="muon: the conv filters' LR (a step's size relative to theirs)"
    )
    muon_momentum: float = param(0.6, "optimizer", ge=0.0, le=0.999, help="muon: the conv filters' momentum")
    # -- finetune: with --init (cifarlab.finetune) -------------------------------------------------------------
    freeze_stages: int = param(0, "finetune", ge=0, help="freeze the model's first N stages (its stages())")
    pretrained_lr_scale: float = param(1.0, "finetune", gt=0, help="LR multiplier for the weights --init loaded")
    # -- schedule -----------------------------------------------------------------------------------------
    epochs: int = param(30, "schedule", gt=0)
    batch_size: int = param(128, "schedule", gt=0)
    drop_last: bool = param(False, "schedule", help="Keras trains on the last, partial batch too")
    train_scales: tuple[float, ...] = param(
        (), "schedule", help="progressive resizing: epoch e trains on images scaled by value e (the last holds)"
    )
    schedule: str = param("plateau", "schedule", choices=SCHEDULES)
    warmup_fraction: float = param(0.0, "schedule", ge=0.0, le=1.0)
    start_lr_fraction: float = param(0.0, "schedule", ge=0.0, le=1.0)
    final_lr_fraction: float = param(0.0, "schedule", ge=0.0, le=1.0)
    plateau_factor: float = param(0.5, "schedule", ge=0.0, le=0.999)
    plateau_patience: int = param(2, "schedule", ge=0)
    plateau_min_delta: float = param(1e-4, "schedule", ge=0)
    plateau_cooldown: int = param(0, "schedule", ge=0)
    plateau_min_lr: float = param(0.0, "schedule", ge=0)
    early_stopping_patience: int = param(
        3, "schedule", ge=0, help="0 disables early stopping (and restore_best_weights); Keras's patience=0 is 1 here"
    )
    early_stopping_min_delta: float = param(0.0, "schedule", ge=0)
    restore_best_weights: bool = param(True, "schedule")
    monitor: Monitor = param("val_loss", "schedule")
    # -- weight averaging: airbench's lookahead EMA, every ema_every steps after ema_start_epochs --------------
    ema_decay: float = param(0.0, "averaging", ge=0.0, le=0.99999, help="0 disables it")
    ema_every: int = param(5, "averaging", gt=0)
    ema_start_epochs: float = param(0.0, "averaging", ge=0)
    ema_pow: float = param(3.0, "averaging", ge=0)
    # -- augmentation -------------------------------------------------------------------------------------
    augment: str = param("keras", "augmentation", choices=AUGMENTS)
    rotation_range: float = param(5.0, "augmentation", ge=0, le=180)
    width_shift_range: float = param(0.05, "augmentation", ge=0, lt=1, help="a fraction of the image size")
    height_shift_range: float = param(0.05, "augmentation", ge=0, lt=1, help="a fraction of the image size")
    horizontal_flip: bool = param(True, "augmentation")
    translate_pad: int = param(2, "augmentation", ge=0, le=16, help="pixels; must be smaller than the image")
    alternate_flip: bool = param(False, "augmentation")
    # -- evaluation ---------------------------------------------------------------------------------------
    tta: TTA = param("none", "evaluation")
    eval_batch_size: int = param(1000, "evaluation", gt=0)
    calibrate: bool = param(
        False, "evaluation", help="fit a softmax temperature after training, which predict, serve and export apply"
    )
    # -- performance --------------------------------------------------------------------------------------
    precision: Precision = param("auto", "performance", help="auto: bf16 where the CPU/GPU has it, else fp32")
    channels_last: bool = param(True, "performance")
    cpu_fp32_variant: str = param(
        "", "performance", help="the recipe `cifarlab train` uses instead where this one would train in fp32 on a CPU"
    )
    cuda_graph: bool = param(
        True, "performance", help="on a GPU, replay the training step from one CUDA graph (no per-step launches)"
    )
    cudnn_benchmark: bool = param(
        True, "performance", help="on a GPU, time cuDNN's algorithms for each new shape (false: its heuristics)"
    )
    compile: bool = param(False, "performance", help="reserved: torch.compile does not pay back yet (refused)")

    def __post_init__(self) -> None:
        # An int where a float belongs (ema_start_epochs=3 in a recipe, a plugin's or a Python caller's) is the same
        # value, but would print as 3 where a config file read back gives 3.0: `cifarlab config` output and a
        # run's config.json would not round-trip byte for byte. Stored as the float.
        for name, tuple_of in _float_fields():
            v = getattr(self, name)
            if tuple_of and isinstance(v, tuple):
                if any(_is_int(x) for x in v):
                    object.__setattr__(self, name, tuple(float(x) if _is_int(x) else x for x in v))
            elif not tuple_of and _is_int(v):
                object.__setattr__(self, name, float(v))

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        """A recipe from `to_dict()` output, including run folders of earlier versions."""
        if not isinstance(d, dict):
            raise ConfigError(f"a recipe must be a mapping of recipe keys, got {type(d).__name__}")
        d = dict(d)
        d.pop("extra", None)  # earlier versions stored an always-empty `extra` mapping
        names = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ConfigError(f"unknown recipe keys {unknown}; accepted keys: {', '.join(sorted(names))}")
        from cifarlab.config import parse_value  # (config imports this module)

        # Each value converted and type-checked as a config file's would be: a hand-edited "epochs": "two" is a
        # one-line error naming the key, not a TypeError deep in training.
        kw = {k: parse_value(k, v) for k, v in d.items()}
        # A saved run's dataset path may not exist on this machine; that must not stop loading the run.
        try:
            recipe = cls(**kw)  # values checked above, rules just below
        except TypeError as e:
            raise ConfigError(f"not a valid recipe ({e})") from None
        # base=recipe: a stored run's recipe loads as it trained, whatever it holds for keys its model ignores
        return validate(recipe, check_paths=False, base=recipe)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # (bool is an int; a bool stays for validate to refuse)


@functools.cache
def _float_fields() -> tuple[tuple[str, bool], ...]:
    """(name, is a tuple) of the Recipe fields that hold floats: `float` and `tuple[float, ...]`."""
    out = []
    for name, tp in field_types().items():
        args = typing.get_args(tp) if typing.get_origin(tp) is tuple else ()
        if tp is float or (args and all(a in (float, Ellipsis) for a in args)):
            out.append((name, bool(args)))
    return tuple(out)


@functools.cache
def field_types() -> dict[str, Any]:
    """{field name: its resolved type} of `Recipe` (this module's annotations are strings).

    Cached: get_type_hints evaluates every annotation (~3 ms), and validate() asks once per field."""
    hints = typing.get_type_hints(Recipe)
    return {f.name: hints[f.name] for f in fields(Recipe)}


def choices(key: str) -> tuple[str, ...] | None:
    """The accepted values of a recipe field with a fixed set of them (registered or Literal), else None."""
    f = next((f for f in fields(Recipe) if f.name == key), None)
    if f is None:
        return None
    if f.metadata.get("choices") is not None:
        return f.metadata["choices"].names()
    tp = field_types()[key]
    return tuple(typing.get_args(tp)) if typing.get_origin(tp) is Literal else None


def unregistered(d: dict[str, Any]) -> list[str]:
    """The registry-backed values in a recipe mapping that nothing in this process registers, as `key 'value'`."""
    out = []
    for f in fields(Recipe):
        reg = f.metadata.get("choices")
        if reg is None or f.name not in d:
            continue
        values = d[f.name] if isinstance(d[f.name], (list, tuple)) else [d[f.name]]
        out += [f"{f.name} {v!r}" for v in values if v not in reg]
    return out


# The name becomes part of the run folder's path: no separators, no '..', no hidden folders.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_bounds(key: str, v: Any, m: dict[str, Any]) -> None:
    gt, ge, le, lt = m.get("gt"), m.get("ge"), m.get("le"), m.get("lt")
    if gt is not None and not v > gt:
        raise ConfigError(f"{key}={v!r} must be > {gt}")
    if ge is not None and (le is not None or lt is not None):
        hi = le if le is not None else lt
        ok = ge <= v and (v <= hi if le is not None else v < hi)
        if not ok:
            close = "]" if le is not None else ")"
            raise ConfigError(f"{key}={v!r} must be in [{ge}, {hi}{close}")
    elif ge is not None and not v >= ge:
        raise ConfigError(f"{key}={v!r} must be >= {ge}")


_TYPE_NAMES = {float: "a number", int: "a whole number", bool: "true or false", str: "a string"}


def _type_ok(v: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(v, bool)
    if tp is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if tp is float:  # an int is a float's value too (lr=1)
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if tp is str or typing.get_origin(tp) is Literal:
        return isinstance(v, str)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if not isinstance(v, tuple):
            return False
        elems = [args[0]] * len(v) if len(args) == 2 and args[1] is Ellipsis else list(args)
        return len(elems) == len(v) and all(_type_ok(x, t) for x, t in zip(v, elems, strict=True))
    return True


def _check_type(key: str, v: Any, tp: Any) -> None:
    """A Recipe built in Python (`Recipe.replace`, `register_recipe`) is not parsed as --set and config files are:
    a string or list where a number or tuple belongs failed deep in training, after the run folder existed."""
    if _type_ok(v, tp):
        return
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        each = _TYPE_NAMES.get(args[0], str(args[0]))
        want = f"a tuple of {each.removeprefix('a ')}s" if args[-1] is Ellipsis else f"a tuple of {len(args)} numbers"
        hint = f" (a tuple, not a {type(v).__name__}: {key}={tuple(v)!r})" if isinstance(v, list) else ""
        if isinstance(v, (int, float, str)) and args[-1] is Ellipsis:
            hint = f" (one value is a tuple of one: {key}=({v!r},))"
        raise ConfigError(f"{key}={v!r} must be {want}{hint}")
    literal = typing.get_origin(tp) is Literal
    want = "one of " + ", ".join(map(repr, typing.get_args(tp))) if literal else _TYPE_NAMES.get(tp, str(tp))
    raise ConfigError(f"{key}={v!r} must be {want}, not {type(v).__name__}")


def unused_size_keys(r: Recipe) -> tuple[str, ...]:
    """The model-size keys (`param(size=True)`) that `r.model` does not read; () for a model that declares none
    (`MODELS.register(..., uses=...)` left out, or not registered here)."""
    entry = MODELS.get(r.model) if r.model in MODELS else None
    if entry is None or entry.uses is None:
        return ()
    return tuple(f.name for f in fields(Recipe) if f.metadata.get("size") and f.name not in entry.uses)


def _as_set_value(v: Any) -> str:
    """A value as `--set` writes it: 64,128,128 for a tuple."""
    return ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v) if isinstance(v, tuple) else f"{v:g}"


def _check_unused_size_keys(r: Recipe, base: Recipe | None) -> None:
    """A model-size key the model does not read must keep `base`'s value (what the recipe the user started from
    holds: `fast`'s widths when its model is switched) or the key's default; any other value would be ignored."""
    defaults = {f.name: f.default for f in fields(Recipe)}
    for key in unused_size_keys(r):
        value = getattr(r, key)
        keep = getattr(base, key) if base is not None else defaults[key]
        if value in (keep, defaults[key]):
            continue
        users = [n for n in MODELS.names() if (u := MODELS.get(n).uses) is not None and key in u]
        uses = MODELS.get(r.model).uses or frozenset()
        reads = f"the model-size keys it reads: {', '.join(sorted(uses))}" if uses else "it reads no model-size key"
        raise ConfigError(
            f"{key}={_as_set_value(value)}: model {r.model} does not use {key} ({reads}), so the value would be "
            f"ignored; leave {key} at {_as_set_value(keep)}, or pick a model that uses it "
            f"({', '.join(users) or 'none'})"
        )


def _check_freeze_stages(r: Recipe) -> None:
    """`freeze_stages` within the model's stage count, checked before any data is read: the model is built for
    CIFAR's shape on the meta device (no memory; the number of stages does not follow the data)."""
    import torch

    from cifarlab.models import build_model
    from cifarlab.train.techniques import frozen_stage_modules

    try:
        with torch.device("meta"):
            net = build_model(r, 10, (3, 32, 32))
    except Exception:  # a model that cannot be built this way (a plugin's, another shape): checked when built
        return
    frozen_stage_modules(net, r.freeze_stages, r.model)  # ConfigError: no stages(), or too few


def validate(r: Recipe, check_paths: bool = True, *, base: Recipe | None = None) -> Recipe:
    """Reject values that would fail late or silently train something else.

    `base`: the recipe `r` was derived from (`--recipe`'s, `fit()`'s). A model-size key the model does not read
    (`unused_size_keys`) must keep base's value or the key's default; None: the default only. `base=r` leaves
    those keys alone (a stored run's recipe: what it trained with)."""
    types = field_types()
    for f in fields(r):
        v = getattr(r, f.name)
        _check_type(f.name, v, types[f.name])
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{f.name}={v!r} must be a finite number")
        allowed = choices(f.name)
        for item in v if isinstance(v, tuple) else (v,):
            if allowed is not None and item not in allowed:
                shown = ", ".join(allowed) or "(none registered)"
                raise ConfigError(f"{f.name}={item!r} is not valid; accepted values: {shown}")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            _check_bounds(f.name, v, dict(f.metadata))
        each = f.metadata.get("each")
        if each is not None and any(not (each[0] <= x < each[1]) for x in v):
            raise ConfigError(f"{f.name}={v!r}: each must be in [{each[0]:g}, {each[1]:g})")
    if check_paths and canonical_dataset_name(r.dataset) is None and not Path(r.dataset).exists():
        raise ConfigError(
            f"dataset={r.dataset!r} is neither {', '.join(NAMED_DATASETS)} nor an existing ImageFolder/IDX path"
        )
    if any(not 0 < v <= 1 for v in r.train_scales):
        raise ConfigError(f"train_scales={r.train_scales!r}: each scale must be in (0, 1] (1: full size)")
    if any(w <= 0 for w in r.widths) or len(r.widths) != 3:
        raise ConfigError(f"widths={r.widths!r}: three positive channel counts expected")
    if r.val_fraction == 0 and r.schedule == "plateau" and r.monitor.startswith("val_"):
        raise ConfigError(
            "val_fraction=0 leaves no validation set, but schedule='plateau' monitors "
            f"{r.monitor!r}; use schedule='onecycle' or a val_fraction > 0"
        )
    if r.compile:
        # The NaN a compiled bf16 step gave is understood and fixed (benchmarks/compile_nan.py), but compiling
        # does not pay back where we could measure it: on a 2-core CPU the convolutions are ~80% of a step, the
        # compiled step was no faster (352 ms eager, 386-425 ms compiled) and compiling took 40 s. GPU: unmeasured.
        raise ConfigError(
            "compile=true is not supported yet (on a 2-core CPU compiling takes longer than it saves); "
            "leave compile=false"
        )
    if not _NAME_RE.match(r.name):
        raise ConfigError(f"name={r.name!r} is not valid: use letters, digits, '-', '_' and '.' (no '/')")
    for f in fields(r):  # the rules of the registered pieces the recipe names, kept in their own files
        reg = f.metadata.get("choices")
        value = getattr(r, f.name)
        for item in value if isinstance(value, tuple) else (value,):
            entry = reg.get(item) if reg is not None else None
            if entry is not None and entry.check is not None:
                entry.check(r)
    _check_unused_size_keys(r, base)
    if r.freeze_stages > 0:
        _check_freeze_stages(r)
    if r.val_fraction == 0 and r.monitor.startswith("val_") and r.early_stopping_patience > 0:
        raise ConfigError(
            f"val_fraction=0 leaves no validation set, but early stopping monitors {r.monitor!r}; "
            "set early_stopping_patience=0, monitor=loss, or a val_fraction > 0"
        )
    return r


# -- the named recipes -----------------------------------------------------------------------------------

REFERENCE = Recipe(
    name="reference",
    description="The Keras CNN from the reference talk, exactly as pinned in docs/REFERENCE.md (81.42% in the talk).",
)

# Fast airbench-style recipes: trained on all 50,000 training images (no validation split: the schedule is
# fixed, so nothing needs a validation set), evaluated with test-time augmentation.
_AIR = Recipe(
    name="_air",
    model="airnet",
    val_fraction=0.0,
    scaling="standardize",
    whiten_init=True,
    whiten_kernel=2,
    whiten_bias_epochs=3.0,
    bn_momentum=0.4,
    bn_eps=1e-12,
    head_scale=1 / 9,
    dropout=(),
    l2=0.0,
    label_smoothing=0.2,
    calibrate=True,  # label smoothing leaves the softmax ~20 points under-confident: a temperature undoes it
    optimizer="sgd",
    lr=11.5,
    momentum=0.85,
    nesterov=True,
    weight_decay=0.0153,
    bias_lr_scale=64.0,
    schedule="onecycle",
    warmup_fraction=0.23,
    start_lr_fraction=0.2,
    final_lr_fraction=0.07,
    early_stopping_patience=0,
    restore_best_weights=False,
    drop_last=True,
    augment="flip_translate",
    translate_pad=2,
    alternate_flip=True,
    tta="flip_translate",
    ema_decay=0.95,
    ema_every=5,
    ema_start_epochs=3,
    ema_pow=3.0,
)

# The default: airbench's network at widths 32/64/128 for 2 epochs, with what a short run on a CPU rewards
# (benchmarks/RESULTS.md, "`fast` with Muon"): Muon for the conv filters (+2.4 points over SGD at 2 epochs), the
# first epoch on images at 3/4 size (half the work of a full-size epoch), the whitening bias trained in that epoch
# only (the first conv then needs no input gradient), the weight averaging from mid-epoch 1, flip-only TTA, and
# evaluation batches of 256 (1000 images overflow the CPU's cache: 2x slower). One recipe for both kinds of CPU.
FAST = _AIR.replace(
    name="fast",
    description="The default recipe: reaches the reference's test accuracy in the least wall time.",
    widths=(32, 64, 128),
    epochs=2,
    batch_size=256,
    optimizer="muon",
    muon_lr=0.16,
    train_scales=(0.75, 1.0),
    whiten_bias_epochs=1.0,
    ema_start_epochs=0.5,
    tta="flip",
    # 128: the logits are bit-identical at any batch size here, and smaller batches stay in a CPU's cache (on the
    # bf16 Zen 4 the test evaluation took 1.6 s at 128, 1.65-2.5 s at 256, 3.1 s at 1000; RESULTS session 13)
    eval_batch_size=128,
)

AIR94 = _AIR.replace(
    name="air94",
    description="The most accurate recipe that fits in 15 minutes on a 2-core CPU (airbench94-style).",
    widths=(64, 256, 256),
    epochs=14,  # airbench94 trains 9.9 epochs; 15 minutes on 2 cores allow 14 (~56 s each)
    batch_size=1024,
)

# Deeper networks with the same speed habits (bf16 + channels_last via precision=auto, batched flip/translate,
# label smoothing, EMA, no validation split, flip/translate TTA), for a GPU. SGD is a plain Nesterov one:
# lr 8.8 per 1024 examples is PyTorch's lr 0.4 at batch 512 (0.1 at 128), weight_decay 0.0044 its 5e-4.
_DEEP = _AIR.replace(
    name="_deep",
    whiten_init=False,
    whiten_bias_epochs=0.0,
    bn_momentum=0.1,
    bn_eps=1e-5,
    head_scale=1.0,
    lr=8.8,
    momentum=0.9,
    weight_decay=0.0044,
    bias_lr_scale=1.0,
    warmup_fraction=0.2,
    start_lr_fraction=0.1,
    final_lr_fraction=0.0,
    epochs=18,
    batch_size=512,
    translate_pad=4,  # the usual 4-pixel pad-and-crop: a deep net needs more augmentation than airnet
    ema_start_epochs=2,
)

RESNET18 = _DEEP.replace(
    name="resnet18",
    description="Pre-activation ResNet-18 (11.2M parameters), 35 epochs, airbench habits; past air94 on a GPU.",
    model="preact_resnet18",
    epochs=35,  # 91.58% on an H200 in 34 s of training (18 epochs: 90.51%, below air94's 91.33%)
)

WRN16_8 = _DEEP.replace(
    name="wrn16_8",
    description="Wide-ResNet 16-8 (11.0M parameters, 3x ResNet-18's FLOPs), 18 epochs, airbench habits; for a GPU.",
    model="wrn",
    depth=16,
    width_factor=8.0,
)

EFFNET_B0 = _DEEP.replace(
    name="effnet_b0",
    description="EfficientNet-B0 for 32x32 (4.0M parameters), 18 epochs, airbench habits; for a GPU.",
    model="efficientnet_b0",
    bn_eps=1e-3,  # the paper's
    dropout=(0.2,),  # the paper's, before the classifier
    stochastic_depth=0.1,  # half the paper's 0.2: 18 epochs need less regularization than 350
)

# Their names and DEFAULT_RECIPE are also in cifarlab.registry (BUILTIN_RECIPES), for help that does not import torch.
RECIPES: dict[str, Recipe] = {r.name: r for r in (REFERENCE, FAST, AIR94, RESNET18, WRN16_8, EFFNET_B0)}


def register_recipe(recipe: Recipe, *, replace: bool = False) -> Recipe:
    """Make `recipe` available by name (`--recipe NAME`, `get_recipe`)."""
    validate(recipe, check_paths=False)
    if recipe.name in RECIPES and not replace:
        raise ValueError(f"recipe {recipe.name!r} already exists (pass replace=True to override it)")
    RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; available: {', '.join(RECIPES)}") from None
