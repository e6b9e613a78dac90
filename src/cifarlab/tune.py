"""Hyperparameter search with Optuna: the library behind `cifarlab tune`.

    space = load_space("reference.yaml" or None, recipe)       the search space, from YAML, checked
    result = tune(TuneSettings(recipe=..., space=..., ...))     the study, its trials, outputs, final runs

A trial is an ordinary run folder made by the experiment's steps (`prepare` -> `open_run` -> `train`), with
two differences: it stops after training (no test evaluation, no weights, no report), and a `TrialPruning`
callback reports the validation metric to Optuna after every epoch. When the pruner says stop, the callback
sets `trainer.stop_training` (the loop ends cleanly after that epoch, like early stopping); the objective
then marks the run folder `pruned` and raises `optuna.TrialPruned`. The objective reads validation only:
the test set is evaluated once, by the best trial's full run at the end (`final_seeds`).

Studies live in an Optuna RDB storage: an SQLite file in the study folder by default, or any URL
(`postgresql://...`) that many workers on many machines share. The budget `n_trials` counts COMPLETE and
PRUNED trials of the whole study, and it is never overshot by parallel workers: a trial that starts when
`n_trials` other live trials (complete, pruned, running or waiting) have lower numbers fails at once as
`surplus`. A trial whose worker was killed is marked FAILED and re-queued (same parameters, a new number):
at once when this machine sees that its process is gone, else after Optuna's heartbeat grace period.

Optuna is an optional extra (`pip install 'cifarlab[tune]'`), imported only here and in `tune_report`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import inspect
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cifarlab.config import _NoAliasLoader, accepted_keys, apply_overrides, parse_value, yaml_problem
from cifarlab.errors import ConfigError, Interrupted, UserError
from cifarlab.files import read_json, require_regular_file, write_json
from cifarlab.recipes import RECIPES, Recipe, _check_bounds, field_types, unused_size_keys, validate
from cifarlab.text import plural
from cifarlab.train.callbacks import Callback

__all__ = [
    "OBJECTIVES",
    "Param",
    "Space",
    "TrialPruning",
    "TuneResult",
    "TuneSettings",
    "default_space_path",
    "load_space",
    "recover_killed_trials",
    "require_optuna",
    "tune",
    "worker_main",
]

Log = Callable[[str], None]

# The validation metrics a study can optimize, and their direction.
OBJECTIVES: dict[str, str] = {"val_accuracy": "maximize", "val_loss": "minimize"}
PRUNERS = ("median", "hyperband", "none")
# Keys a search space may not tune: they name or locate the run, or are noise (seed).
NOT_TUNABLE = ("name", "description", "dataset", "seed")
# Keys that draw the validation split: trials scored on different images cannot be compared (set them in `trial:`).
SPLIT_KEYS = ("val_fraction", "stratified_split")
MAX_SPACE_BYTES = 1 << 20
MAX_RETRIES = 2  # a trial killed again and again (it may be what kills its worker) is re-queued at most this often
MAX_CONSECUTIVE_FAILURES = 5  # a worker whose trials keep failing stops instead of looping
HEARTBEAT_SECONDS = 30  # Optuna heartbeat: a RUNNING trial silent for GRACE_SECONDS is failed and re-queued
GRACE_SECONDS = 120
STUDY_DB = "study.db"
WORKER_SPEC = "tune-worker.json"
TRIALS_DIR = "trials"
FINAL_DIR = "final"

# Trial and run-folder states.
COMPLETE, PRUNED, FAILED = "complete", "pruned", "failed"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def require_optuna() -> Any:
    """The optuna module, or a UserError that names the extra to install."""
    try:
        import optuna
    except ImportError:
        raise UserError(
            "cifarlab tune needs Optuna, which is not installed: pip install 'cifarlab[tune]' (or pip install "
            "optuna; a PostgreSQL --storage also needs psycopg2)"
        ) from None
    return optuna


@contextlib.contextmanager
def quiet_optuna() -> Iterator[Any]:
    """Optuna with its experimental-feature warnings silenced (heartbeats, plots) and its logger at ERROR: the
    tune module prints one line per trial itself."""
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module="optuna")
        yield optuna


# -- search spaces ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _fields() -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(Recipe)}


@dataclass(frozen=True)
class Param:
    """One tuned recipe key: `name` is the key as written (`lr`, or `dropout.0` for one element of a tuple)."""

    name: str
    field: str
    index: int | None
    kind: str  # "float", "int" or "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            assert self.low is not None and self.high is not None
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=step, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def describe(self) -> str:
        if self.kind == "categorical":
            return "one of " + ", ".join(str(c) for c in self.choices)
        scale = "log-uniform" if self.log else "uniform"
        step = f", step {self.step:g}" if self.step is not None else ""
        return f"{self.kind} in [{self.low:g}, {self.high:g}], {scale}{step}"


@dataclass(frozen=True)
class Space:
    """A study's search space: the tuned keys, and what the file says about the study (metric, trial-only
    recipe keys). `raw` is the checked mapping (stored with the study to tell a resume from a new study)."""

    params: tuple[Param, ...]
    metric: str | None = None
    trial: tuple[tuple[str, Any], ...] = ()
    recipe: str | None = None
    source: str = "<space>"
    raw: dict[str, Any] = field(default_factory=dict)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """Every parameter drawn for an Optuna trial: {name: value}."""
        return {p.name: p.suggest(trial) for p in self.params}

    def apply(self, recipe: Recipe, values: Mapping[str, Any]) -> Recipe:
        """`recipe` with the drawn values set (tuple elements by index), validated."""
        return validate(_apply(recipe, self.params, values), check_paths=False, base=recipe)


def _apply(recipe: Recipe, params: Sequence[Param], values: Mapping[str, Any]) -> Recipe:
    changes: dict[str, Any] = {}
    for p in params:
        if p.name not in values:
            continue
        v = values[p.name]
        if p.index is None:
            changes[p.field] = parse_value(p.field, v)
        else:
            items = list(changes.get(p.field, getattr(recipe, p.field)))
            items[p.index] = v
            changes[p.field] = parse_value(p.field, items)
    return recipe.replace(**changes) if changes else recipe


def _number(where: str, raw: Any, integer: bool) -> float:
    """A bound or step from YAML: PyYAML reads `1e-4` (no dot) as a string, so numeric strings are accepted."""
    if isinstance(raw, bool):
        raise ConfigError(f"{where}={raw!r} is not a number")
    if isinstance(raw, str):
        try:
            raw = int(raw) if integer and re.fullmatch(r"\s*[+-]?\d+\s*", raw) else float(raw)
        except ValueError:
            raise ConfigError(f"{where}={raw!r} is not a number") from None
    if not isinstance(raw, (int, float)) or not math.isfinite(raw):
        raise ConfigError(f"{where}={raw!r} is not a finite number")
    if integer and (isinstance(raw, float) and not raw.is_integer()):
        raise ConfigError(f"{where}={raw!r} must be an integer (the recipe key is an integer)")
    return int(raw) if integer else float(raw)


def _unknown(where: str, key: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown key {key!r}{hint}; accepted: {', '.join(known)}")


def _param(src: str, name: Any, spec: Any, recipe: Recipe) -> Param:
    where = f"space {src}: params.{name}"
    if not isinstance(name, str):
        raise ConfigError(f"space {src}: parameter names must be recipe keys, got {name!r}")
    key, _, idx = name.partition(".")
    types = field_types()
    if key not in types:
        raise _unknown(f"space {src}: params", name, accepted_keys())
    if key in NOT_TUNABLE:
        raise ConfigError(f"{where}: {key!r} cannot be tuned (it names or locates the run, or is noise)")
    if key in SPLIT_KEYS:
        raise ConfigError(
            f"{where}: {key!r} cannot be tuned: it draws the validation split, so each trial would be scored on "
            f"other images; set it for every trial under `trial:` (e.g. trial: {{{key}: ...}})"
        )
    tp = types[key]
    index: int | None = None
    elem = tp
    if typing.get_origin(tp) is tuple:
        if idx:
            n = len(getattr(recipe, key))
            if not idx.isdigit() or int(idx) >= n:
                if n == 0:  # (fast has no dropout at all: "dropout.0 .. dropout.-1" said nothing)
                    raise ConfigError(
                        f"{where}: recipe {recipe.name!r} has no {key} (an empty list), so there is no {name} to tune"
                    )
                raise ConfigError(
                    f"{where}: {key} holds {n} values in recipe {recipe.name!r}; tune one as {key}.0 .. {key}.{n - 1}"
                )
            index = int(idx)
            args = typing.get_args(tp)
            elem = args[0] if args[-1] is Ellipsis else args[index]
    elif idx:
        raise ConfigError(f"{where}: {key} is not a list: write it without '.{idx}'")
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"{where}: expected a mapping such as {{low: 1e-4, high: 1e-2, log: true}} or {{choices: [...]}}"
        )
    unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices"})
    if unknown:
        raise _unknown(where, str(unknown[0]), ["low", "high", "log", "step", "choices"])

    def check(value: Any, what: str) -> Any:
        """`value` converted to the key's type and within the recipe's bounds for it, else a ConfigError."""
        try:
            if index is None:
                parsed = parse_value(key, value)
            else:
                items = list(getattr(recipe, key))
                items[index] = value
                parsed = parse_value(key, items)[index]
            _check_field_bounds(key, parsed)
        except ConfigError as e:
            raise ConfigError(f"{where}: {what}: {e}") from None
        return parsed

    if "choices" in spec:
        if set(spec) - {"choices"}:
            raise ConfigError(f"{where}: give either choices or low/high (with log, step), not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: choices must be a non-empty list")
        out = []
        for c in choices:
            if isinstance(c, (list, tuple)) and index is None and typing.get_origin(tp) is tuple:
                check(list(c), f"choice {c!r}")
                out.append(",".join(str(x) for x in c))  # Optuna's categorical values are scalars
            elif isinstance(c, (str, int, float, bool)):
                out.append(check(c, f"choice {c!r}"))
            else:
                raise ConfigError(f"{where}: choice {c!r} is not a value {name} takes")
        if len(set(map(str, out))) != len(out):
            raise ConfigError(f"{where}: choices repeat a value")
        return Param(name, key, index, "categorical", choices=tuple(out))

    if elem not in (int, float):
        raise ConfigError(f"{where}: {name} is not a number: give choices: [...] instead of low/high")
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: needs low and high (or choices)")
    integer = elem is int
    low = _number(f"{where}.low", spec["low"], integer)
    high = _number(f"{where}.high", spec["high"], integer)
    if not low < high:
        raise ConfigError(f"{where}: low={low:g} must be smaller than high={high:g}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{where}.log={log!r} must be true or false")
    step = None
    if spec.get("step") is not None:
        step = _number(f"{where}.step", spec["step"], integer)
        if step <= 0:
            raise ConfigError(f"{where}.step={step:g} must be > 0")
        if log:
            raise ConfigError(f"{where}: log and step cannot be combined (Optuna draws log-uniform values unstepped)")
        # Optuna would shrink the range to the last step that fits (to [low, low] when step > high - low), with
        # only a warning: a space that does not say what it tunes.
        steps = (high - low) / step
        if abs(steps - round(steps)) > 1e-9 * max(1.0, steps):
            fit = low + math.floor(steps + 1e-9) * step
            raise ConfigError(
                f"{where}: step={step:g} does not divide high - low = {high - low:g} (Optuna would tune "
                f"[{low:g}, {fit:g}]); choose a step that does, or high={fit:g}"
            )
    if log and low <= 0:
        raise ConfigError(f"{where}: log: true needs low > 0 (got low={low:g})")
    check(low, f"low={low:g}")
    check(high, f"high={high:g}")
    return Param(name, key, index, "int" if integer else "float", low=low, high=high, log=log, step=step)


def _check_field_bounds(key: str, value: Any) -> None:
    """The recipe's bounds for one value of field `key` (an element, for a tuple field). The rules that involve
    several fields are checked on each trial's recipe (`Space.apply`)."""
    meta = dict(_fields()[key].metadata)
    if isinstance(value, tuple):
        for item in value:
            _check_field_bounds(key, item)
        return
    each = meta.get("each")
    if each is not None and not (each[0] <= value < each[1]):
        raise ConfigError(f"{key}: {value!r} must be in [{each[0]:g}, {each[1]:g})")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}={value!r} must be a finite number")
        _check_bounds(key, value, meta)


def space_from_dict(data: Any, recipe: Recipe, source: str = "<space>") -> Space:
    """A `Space` from a parsed space file, checked against `recipe` (keys, types, bounds)."""
    src = source
    if not isinstance(data, Mapping):
        raise ConfigError(f"space {src}: expected a mapping with `params:`, got {type(data).__name__}")
    known = ["recipe", "metric", "trial", "params", "description"]
    for k in data:
        if k not in known:
            raise _unknown(f"space {src}", str(k), known)
    base = data.get("recipe")
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"space {src}: recipe={base!r} must be a recipe name")
    metric = data.get("metric")
    if metric is not None and metric not in OBJECTIVES:
        raise ConfigError(f"space {src}: metric={metric!r} is not valid; accepted: {', '.join(OBJECTIVES)}")
    trial = data.get("trial") or {}
    if not isinstance(trial, Mapping):
        raise ConfigError(f"space {src}: trial must be a mapping of recipe keys (e.g. val_fraction: 0.1)")
    trial_items = tuple((str(k), v) for k, v in trial.items())
    for k, _ in trial_items:
        if k in NOT_TUNABLE and k != "seed":
            raise ConfigError(f"space {src}: trial.{k}: {k!r} cannot change between trials and the final run")
    trial_base = apply_overrides(recipe, list(trial_items), source=f"space {src}: trial")  # checks keys and values
    params = data.get("params")
    if not isinstance(params, Mapping) or not params:
        raise ConfigError(
            f"space {src}: needs `params:`, a mapping of recipe keys to ranges "
            "(e.g. lr: {low: 1e-4, high: 1e-2, log: true})"
        )
    out = tuple(_param(src, name, spec, recipe) for name, spec in params.items())
    unused = unused_size_keys(trial_base) if all(p.field != "model" for p in out) else ()
    for p in out:
        if p.field in unused:  # every trial would train the same model: refused now, not at the first trial
            raise ConfigError(
                f"space {src}: params.{p.name}: model {trial_base.model} does not use {p.field}, so the value would "
                "be ignored; tune a key the model uses"
            )
    fields_tuned: dict[str, list[Param]] = {}
    for p in out:
        fields_tuned.setdefault(p.field, []).append(p)
    for key, ps in fields_tuned.items():
        if len(ps) > 1 and any(p.index is None for p in ps):
            raise ConfigError(f"space {src}: params tune {key} both as a whole and by element; pick one")
    clean = json.loads(json.dumps(dict(data), default=str))  # plain JSON types, stored with the study
    return Space(out, metric, trial_items, base, src, clean)


def default_space_path(recipe_name: str) -> Path | None:
    """The search space shipped for a built-in recipe (`cifarlab/spaces/<name>.yaml`), or None."""
    path = resources.files("cifarlab") / "spaces" / f"{recipe_name}.yaml"
    return Path(str(path)) if path.is_file() else None


def load_space(path: Path | str | None, recipe: Recipe, base_name: str | None = None) -> Space:
    """The space in YAML file `path` (or the default space of `base_name`), checked against `recipe`."""
    if path is None:
        name = base_name or recipe.name
        path = default_space_path(name)
        if path is None:
            shipped = sorted(p for p in RECIPES if default_space_path(p) is not None)
            raise ConfigError(
                f"recipe {name!r} has no default search space (shipped: {', '.join(shipped)}); write one and "
                "pass --space FILE (see cifarlab/spaces/reference.yaml for the format)"
            )
    path = Path(path)
    try:
        require_regular_file(path, "search-space file")
        if path.stat().st_size > MAX_SPACE_BYTES:
            raise ConfigError(f"--space {path}: too large for a search space (limit 1 MiB)")
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliasLoader)
    except ConfigError:
        raise
    except UserError as e:
        raise ConfigError(f"--space {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--space {path}: cannot read it ({e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--space {path}: not valid YAML ({yaml_problem(e)})") from None
    return space_from_dict(data, recipe, str(path))


# -- settings -------------------------------------------------------------------------------------------------


@dataclass
class TuneSettings:
    """Everything a study needs. `recipe` is what the final run trains (base recipe + --config/--set); trials
    train it with the drawn parameters and the trial-only overrides (the space's `trial:` and --trial-set)."""

    recipe: Recipe
    space: Space
    study_name: str
    out_dir: Path
    base_name: str = ""  # the named recipe that best.yaml starts from (`recipe: NAME`)
    storage: str | None = None  # None: sqlite:///<out_dir>/study.db
    metric: str = "val_accuracy"
    n_trials: int = 20
    timeout: float | None = None
    workers: int = 1
    pruner: str = "median"
    prune_after: int = 3  # no trial is pruned before this many epochs
    seed: int = 0  # TPE seed; worker i uses seed + i
    startup_trials: int = 10  # random trials before TPE models the results
    trial_overrides: tuple[tuple[str, Any], ...] = ()  # --trial-set KEY=VALUE, after the space's trial:
    final_seeds: int = 1
    data_dir: Path | None = None
    device: str = "auto"
    verbose: bool = False
    quiet: bool = False
    report: bool = True  # False: no report.html/.md nor figures (the tables, best.yaml and study.json still)
    plugins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.base_name = self.base_name or self.recipe.name
        if not _NAME_RE.match(self.study_name):
            raise ConfigError(f"--study {self.study_name!r}: use letters, digits, '-', '_' and '.'")
        if self.metric not in OBJECTIVES:
            raise ConfigError(f"--metric {self.metric!r}: accepted: {', '.join(OBJECTIVES)}")
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner {self.pruner!r}: accepted: {', '.join(PRUNERS)}")
        for name, value, low in (
            ("--n-trials", self.n_trials, 1),
            ("--workers", self.workers, 1),
            ("--prune-after", self.prune_after, 1),
            ("--final-seeds", self.final_seeds, 0),
            ("--startup-trials", self.startup_trials, 0),
        ):
            if value < low:
                raise ConfigError(f"{name}={value} must be >= {low}")
        if self.timeout is not None and not (0 < self.timeout < math.inf):  # (nan fails both comparisons)
            raise ConfigError(f"--timeout={self.timeout} must be a number of seconds > 0 (leave it out for none)")
        most = max(4, 4 * (os.cpu_count() or 1))
        if self.workers > most:  # each worker is a process of its own that trains with its own threads
            raise ConfigError(
                f"--workers={self.workers} on a machine with {os.cpu_count()} CPUs: at most {most} (each worker is a "
                "training process; more than the cores only slows every trial)"
            )
        if self.storage and self.storage.startswith("sqlite:") and _sqlite_path(self.storage) is None:
            raise ConfigError(
                f"--storage {self.storage}: an in-memory SQLite database cannot be shared by workers or resumed; give "
                "a file (sqlite:///path/study.db) or leave --storage out"
            )

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.metric]

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out_dir / STUDY_DB).resolve()}"

    def trial_recipe(self) -> Recipe:
        """The recipe every trial starts from: the final recipe plus the trial-only overrides."""
        r = apply_overrides(self.recipe, list(self.space.trial), source=f"space {self.space.source}: trial")
        r = apply_overrides(r, list(self.trial_overrides), source="--trial-set")
        return validate(r, check_paths=False, base=self.recipe)

    def final_recipe(self, params: Mapping[str, Any]) -> Recipe:
        """The best trial's full run: the final recipe with the trial's parameters (no trial-only overrides)."""
        tuned = self.space.apply(self.recipe, params)
        return tuned.replace(name=f"{self.base_name}-tuned")

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe.to_dict(),
            "space": self.space.raw,
            "space_source": self.space.source,
            "study_name": self.study_name,
            "out_dir": str(self.out_dir.resolve()),
            "base_name": self.base_name,
            "storage": self.storage,
            "metric": self.metric,
            "n_trials": self.n_trials,
            "timeout": self.timeout,
            "workers": self.workers,
            "pruner": self.pruner,
            "prune_after": self.prune_after,
            "seed": self.seed,
            "startup_trials": self.startup_trials,
            "trial_overrides": [list(kv) for kv in self.trial_overrides],
            "final_seeds": self.final_seeds,
            "data_dir": str(self.data_dir) if self.data_dir is not None else None,
            "device": self.device,
            "verbose": self.verbose,
            "quiet": self.quiet,
            "report": self.report,
            "plugins": list(self.plugins),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TuneSettings:
        recipe = Recipe.from_dict(d["recipe"])
        space = space_from_dict(d["space"], recipe, d.get("space_source", "<space>"))
        return cls(
            recipe=recipe,
            space=space,
            study_name=d["study_name"],
            out_dir=Path(d["out_dir"]),
            base_name=d.get("base_name", ""),
            storage=d.get("storage"),
            metric=d["metric"],
            n_trials=int(d["n_trials"]),
            timeout=d.get("timeout"),
            workers=int(d.get("workers", 1)),
            pruner=d.get("pruner", "median"),
            prune_after=int(d.get("prune_after", 3)),
            seed=int(d.get("seed", 0)),
            startup_trials=int(d.get("startup_trials", 10)),
            trial_overrides=tuple((str(k), v) for k, v in d.get("trial_overrides", [])),
            final_seeds=int(d.get("final_seeds", 1)),
            data_dir=Path(d["data_dir"]) if d.get("data_dir") else None,
            device=d.get("device", "auto"),
            verbose=bool(d.get("verbose", False)),
            quiet=bool(d.get("quiet", False)),
            report=bool(d.get("report", True)),
            plugins=tuple(d.get("plugins", ())),
        )

    def identity(self) -> dict[str, Any]:
        """What makes a study the same study: resuming with anything else here is refused."""
        return {
            "metric": self.metric,
            "trial_recipe": self.trial_recipe().to_dict(),
            "params": self.space.raw.get("params"),
        }


# -- storage and study ---------------------------------------------------------------------------------------


def _sqlite_path(url: str) -> Path | None:
    if not url.startswith("sqlite:///"):
        return None
    rest = url[len("sqlite:///") :].split("?", 1)[0]
    return Path(rest) if rest and rest != ":memory:" else None


def redact(url: str) -> str:
    """A storage URL safe to print or write: the password hidden."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)


def open_storage(url: str) -> Any:
    """An Optuna RDB storage with heartbeats (a silent RUNNING trial is failed and re-queued) and, for SQLite,
    a long lock timeout (parallel workers write the same file)."""
    with quiet_optuna() as optuna:
        db = _sqlite_path(url)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {"heartbeat_interval": HEARTBEAT_SECONDS, "grace_period": GRACE_SECONDS}
        sig = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
        name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in sig else "failed_trial_callback"
        kwargs[name] = _requeue_stale
        engine: dict[str, Any] = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
        try:
            if db is not None:
                return _locked_sqlite_storage(optuna)(
                    url, lock_path=db.with_name(db.name + ".lock"), engine_kwargs=engine, **kwargs
                )
            return optuna.storages.RDBStorage(url, engine_kwargs=engine, **kwargs)
        except ImportError as e:
            scheme = url.split(":", 1)[0].split("+")[0]
            package = {"postgresql": "psycopg2-binary", "mysql": "PyMySQL", "mssql": "pyodbc"}.get(scheme)
            how = f"pip install {package}" if package else "install the driver SQLAlchemy names for this URL"
            raise UserError(
                f"--storage {redact(url)}: the database driver is missing ({e}); {how} in this environment"
            ) from None
        except Exception as e:  # sqlalchemy's errors: a bad URL, a server that refuses, a locked or damaged file
            raise UserError(
                f"--storage {redact(url)}: cannot open the study storage ({type(e).__name__}: {e})"
            ) from None


@functools.lru_cache(maxsize=1)
def _locked_sqlite_storage(optuna: Any) -> type:
    """RDBStorage for an SQLite file whose trial state changes are atomic across processes.

    Optuna claims a WAITING trial (and fails a stale RUNNING one) by reading its state and writing the new one,
    relying on SELECT ... FOR UPDATE; SQLite has no row locks and pysqlite runs the read outside any
    transaction, so two workers both saw a re-queued trial WAITING and both ran it. A file lock beside the
    database makes each read-check-write one step (server databases such as PostgreSQL lock the row)."""
    from filelock import FileLock  # a dependency of torch

    class LockedSQLiteStorage(optuna.storages.RDBStorage):
        def __init__(self, url: str, *, lock_path: Path, **kwargs: Any) -> None:
            self._lock_path = str(lock_path)
            super().__init__(url, **kwargs)

        def set_trial_state_values(self, trial_id: int, state: Any, values: Sequence[float] | None = None) -> bool:
            with FileLock(self._lock_path):
                return bool(super().set_trial_state_values(trial_id, state, values))

    return LockedSQLiteStorage


def _requeue_stale(study: Any, trial: Any) -> None:
    """Optuna's heartbeat found `trial` silent (its worker died, maybe on another machine): run it again."""
    requeue(study, trial, f"no heartbeat from its worker for {GRACE_SECONDS} s")


def requeue(study: Any, trial: Any, reason: str) -> int | None:
    """Queue a new trial with the parameters of failed `trial` (not more than MAX_RETRIES times along one chain);
    returns the new trial's number, or None when the chain has been retried enough."""
    chain = [*list(trial.user_attrs.get("retry_chain", [])), trial.number]
    if len(chain) > MAX_RETRIES:
        return None
    with quiet_optuna():
        study.enqueue_trial(
            dict(trial.params), user_attrs={"retry_of": trial.number, "retry_chain": chain, "retry_reason": reason}
        )
    from optuna.trial import TrialState

    waiting = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if t.user_attrs.get("retry_of") == trial.number
    ]
    return waiting[-1].number if waiting else None


def _make_sampler(settings: TuneSettings, index: int, done: int = 0) -> Any:
    """TPE seeded by --seed, the worker's index and the trials the study already has (`done`): a resumed study
    draws new points instead of replaying the seed's first ones."""
    with quiet_optuna() as optuna:
        return optuna.samplers.TPESampler(
            seed=settings.seed + index + 100_003 * done,
            n_startup_trials=settings.startup_trials,
            multivariate=True,
            constant_liar=True,  # parallel workers avoid drawing what another worker is running
        )


def _make_pruner(settings: TuneSettings) -> Any:
    with quiet_optuna() as optuna:
        if settings.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=settings.prune_after)
        if settings.pruner == "hyperband":
            epochs = settings.trial_recipe().epochs
            return optuna.pruners.HyperbandPruner(
                min_resource=min(settings.prune_after, epochs), max_resource=epochs, reduction_factor=3
            )
        return optuna.pruners.NopPruner()


def open_study(settings: TuneSettings, index: int = 0, pruner: Any = None, create: bool = True) -> Any:
    """Create the study (or load it: same name, same storage) and check a loaded one is the same study."""
    with quiet_optuna() as optuna:
        storage = open_storage(settings.storage_url)
        sampler = _make_sampler(settings, index)
        pruner = pruner if pruner is not None else _make_pruner(settings)
        if create:
            study = optuna.create_study(
                study_name=settings.study_name,
                storage=storage,
                direction=settings.direction,
                sampler=sampler,
                pruner=pruner,
                load_if_exists=True,
            )
        else:
            study = optuna.load_study(study_name=settings.study_name, storage=storage, sampler=sampler, pruner=pruner)
        done = len(study.get_trials(deepcopy=False))
        if done:  # resumed (or joined late): reseeded past the points the seed has already drawn
            study.sampler = _make_sampler(settings, index, done)
    want = settings.identity()
    have = study.user_attrs.get("cifarlab")
    if have is None:
        study.set_user_attr("cifarlab", want)
        study.set_user_attr("created", time.strftime("%Y-%m-%dT%H:%M:%S"))
    elif have != want:
        diff = [k for k in want if have.get(k) != want[k]]
        detail = {
            "metric": "metric",
            "trial_recipe": "recipe (--recipe/--config/--set/--trial-set)",
            "params": "search space",
        }
        raise ConfigError(
            f"study {settings.study_name!r} in {redact(settings.storage_url)} was started with another "
            f"{' and '.join(detail.get(k, k) for k in diff)} ({_differences(have, want, diff)}); resume it with "
            "the same settings or pick a new --study name"
        )
    return study


def _differences(have: Mapping[str, Any], want: Mapping[str, Any], keys: Sequence[str], most: int = 4) -> str:
    """What changed between a study's identity and this command's, as `key: was -> now` (recipe keys one by
    one), so the user knows which flag to put back."""
    out: list[str] = []
    for k in keys:
        a, b = have.get(k), want.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += [f"{f}: {a.get(f)!r} -> {b.get(f)!r}" for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
        else:
            out.append(f"{k}: {a!r} -> {b!r}")
    shown = "; ".join(out[:most]) + (f"; and {len(out) - most} more" if len(out) > most else "")
    return f"was -> now: {shown}"


def _states() -> Any:
    from optuna.trial import TrialState

    return TrialState


def counts(study: Any) -> dict[str, int]:
    """Trials by state: complete, pruned, failed, running, waiting."""
    out = {"complete": 0, "pruned": 0, "failed": 0, "running": 0, "waiting": 0}
    for t in study.get_trials(deepcopy=False):
        out[
            {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}[
                t.state.name
            ]
        ] += 1
    return out


def _live(study: Any) -> list[Any]:
    s = _states()
    return list(study.get_trials(deepcopy=False, states=(s.COMPLETE, s.PRUNED, s.RUNNING, s.WAITING)))


def _more_to_run(study: Any, n_trials: int) -> bool:
    """Whether a worker should start another trial: the budget is not yet complete and either a slot is free or
    a queued trial waits for a worker."""
    c = counts(study)
    live = c["complete"] + c["pruned"] + c["running"] + c["waiting"]
    return c["complete"] + c["pruned"] < n_trials and (live < n_trials or c["waiting"] > 0)


# -- worker processes: who runs a trial, and whether it is still alive ----------------------------------------------


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of process `pid` from /proc, or None when it does not exist."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text.rsplit(")", 1)[1].split()
    return rest[0], int(rest[19])  # fields 3 (state) and 22 (starttime)


def worker_identity(index: int = 0) -> dict[str, Any]:
    """Who runs a trial: host, PID, the PID's start time and the boot ID (a recycled PID is not the worker)."""
    pid = os.getpid()
    stat = _proc_stat(pid)
    return {
        "host": socket.gethostname(),
        "pid": pid,
        "start": stat[1] if stat else None,
        "boot": _boot_id(),
        "index": index,
    }


def worker_alive(w: Mapping[str, Any]) -> bool:
    """Whether the worker process `w` (from `worker_identity`, on this host) still runs."""
    if w.get("boot") and _boot_id() and w["boot"] != _boot_id():
        return False  # the machine rebooted since
    try:
        pid = int(w["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    if Path("/proc").is_dir():
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return False
        return w.get("start") is None or stat[1] == w["start"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _resolve_run_dir(settings: TuneSettings, rel: Any) -> Path | None:
    if not isinstance(rel, str):
        return None
    p = Path(rel)
    return p if p.is_absolute() else settings.out_dir / p


def recover_killed_trials(study: Any, settings: TuneSettings, say: Log) -> list[tuple[int, int | None]]:
    """Mark FAILED (and re-queue) the RUNNING trials whose worker on this machine is gone: killed, or crashed
    without telling the storage. Trials of workers on other machines are left to Optuna's heartbeat. Returns
    (failed trial, its re-queued trial or None) pairs."""
    from optuna.exceptions import UpdateFinishedTrialError

    s = _states()
    host = socket.gethostname()
    out: list[tuple[int, int | None]] = []
    for t in study.get_trials(deepcopy=False, states=(s.RUNNING,)):
        w = t.user_attrs.get("worker")
        if not isinstance(w, Mapping) or w.get("host") != host or worker_alive(w):
            continue
        reason = f"killed: its worker (process {w.get('pid')} on {host}) ended while the trial ran"
        try:
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            if not study._storage.set_trial_state_values(t._trial_id, state=s.FAIL):
                continue
        except UpdateFinishedTrialError:  # another process recovered it first
            continue
        retry = requeue(study, t, reason)
        run_dir = _resolve_run_dir(settings, t.user_attrs.get("run_dir"))
        if run_dir is not None and (run_dir / "status.json").exists():
            _write_run_status(run_dir, "killed", f"trial {t.number}: {reason}; marked FAILED in the study")
        again = (
            f"re-queued as trial {retry}"
            if retry is not None
            else f"not re-queued (retried {MAX_RETRIES} times already)"
        )
        say(f"trial {t.number} was RUNNING when its worker died: marked FAILED, {again}")
        out.append((t.number, retry))
    return out


def _write_run_status(run_dir: Path, status: str, message: str) -> None:
    """status.json of a trial's run folder (written without the PID of this process when it is not the trainer)."""
    write_json(
        run_dir / "status.json", {"status": status, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "message": message}
    )


# -- the trial ------------------------------------------------------------------------------------------------


class TrialPruning(Callback):
    """Reports the epoch's validation metric to the Optuna trial and asks the pruner. To prune, it marks the epoch
    (`pruned` event), sets `trainer.stop_training` so the loop ends cleanly after it, and remembers the epoch;
    the objective raises `optuna.TrialPruned` once the loop has returned. Order 85: after the NaN guard (a
    diverged loss stops the run first), before the history row (which then shows the `pruned` event)."""

    order = 85
    state_required = False

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.pruned_at: int | None = None
        self.last: float | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return
        self.last = float(value)
        self.trial.report(self.last, step=epoch + 1)
        if self.trial.should_prune():
            self.pruned_at = epoch + 1
            if logs is not None:
                logs.setdefault("events", []).append("pruned")
            self.trainer.stop_training = True


class _TrialFailed(Exception):
    """A trial that failed for a reason the study survives (diverged, an impossible combination, out of memory)."""


class _Surplus(_TrialFailed):
    """Other workers have already started the whole budget."""


def _best(values: Sequence[float], direction: str) -> tuple[float, int]:
    pick = max if direction == "maximize" else min
    best = pick(values)
    return best, values.index(best) + 1


class _Objective:
    def __init__(self, settings: TuneSettings, dataset: Any, index: int, say: Log) -> None:
        self.s = settings
        self.dataset = dataset
        self.index = index
        self.say = say
        self.trial_recipe = settings.trial_recipe()
        self.failures = 0
        self.prefix = f"[worker {index}] " if settings.workers > 1 else ""

    def __call__(self, trial: Any) -> float:
        trial.set_user_attr("worker", worker_identity(self.index))
        try:
            return self._run(trial)
        except KeyboardInterrupt:
            retry = requeue(trial.study, trial, "interrupted (Ctrl-C)")
            trial.set_user_attr("fail_reason", f"interrupted (Ctrl-C); re-queued as trial {retry}")
            raise

    def _fail(self, trial: Any, reason: str, surplus: bool = False) -> _TrialFailed:
        trial.set_user_attr("fail_reason", reason)
        if not surplus:
            self.failures += 1
            self.say(f"{self.prefix}trial {trial.number}: failed: {reason}")
        return (_Surplus if surplus else _TrialFailed)(reason)

    def _run(self, trial: Any) -> float:
        from cifarlab.experiment import open_run, prepare, train
        from cifarlab.runs import METRICS, write_history, write_status
        from cifarlab.train import EpochLog

        optuna = require_optuna()
        study = trial.study
        ahead = sum(1 for t in _live(study) if t.number < trial.number)
        if ahead >= self.s.n_trials:
            raise self._fail(trial, f"surplus: the {self.s.n_trials} trials of the budget had started", surplus=True)
        values = self.s.space.suggest(trial)
        try:
            recipe = self.s.space.apply(self.trial_recipe, values).replace(
                name=f"{self.s.base_name}-trial{trial.number}"
            )
            plan = prepare(recipe, dataset=self.dataset, device=self.s.device)
        except UserError as e:  # a combination the recipe checks refuse (batch larger than the data, ...)
            raise self._fail(trial, f"invalid combination: {e}") from None
        t0 = time.perf_counter()
        run_dir = open_run(
            plan,
            self.s.out_dir / TRIALS_DIR,
            command=f"cifarlab tune: study {self.s.study_name}, trial {trial.number}",
            report=False,  # a trial writes no report
        )
        try:
            trial.set_user_attr(
                "run_dir",
                str(run_dir.relative_to(self.s.out_dir)) if run_dir.is_relative_to(self.s.out_dir) else str(run_dir),
            )
            pruning = TrialPruning(trial, self.s.metric)
            cbs: list[Callback] = [pruning]
            if self.s.verbose:
                cbs.append(EpochLog(lambda line: self.say(f"{self.prefix}trial {trial.number}: {line}")))
            try:
                fit, _ = train(plan, cbs)
            except BaseException as e:
                if isinstance(e, _oom_errors()):
                    write_status(run_dir, "crashed", message=f"out of memory: {e}")
                    raise self._fail(trial, f"out of memory ({type(e).__name__})") from None
                write_status(run_dir, "crashed", message=f"{type(e).__name__}: {e}")
                raise
            write_history(run_dir, fit.history)
            seconds = time.perf_counter() - t0
            trial.set_user_attr("seconds", seconds)  # the time printed below: trials.md shows the same
            trial.set_user_attr("epochs", len(fit.history))
            trial.set_user_attr("train_seconds", round(fit.train_seconds, 3))
            if fit.status == "stopped":
                write_status(run_dir, "stopped", message=f"trial {trial.number} interrupted")
                raise KeyboardInterrupt
            if fit.status != "finished":
                write_status(run_dir, "diverged", message=fit.message)
                raise self._fail(trial, f"diverged: {fit.message}")
            scores = [float(r[self.s.metric]) for r in fit.history if r.get(self.s.metric) is not None]
            if not scores or not all(math.isfinite(v) for v in scores):
                write_status(run_dir, "crashed", message=f"no finite {self.s.metric} to report")
                raise self._fail(trial, f"no finite {self.s.metric} (is there a validation split?)")
            value, best_epoch = _best(scores, self.s.direction)
            trial.set_user_attr("best_epoch", best_epoch)
            state = PRUNED if pruning.pruned_at else COMPLETE
            metrics = {
                "status": state,
                "study": self.s.study_name,
                "trial": trial.number,
                "metric": self.s.metric,
                "value": value,
                "best_epoch": best_epoch,
                "epochs_run": len(fit.history),
                "pruned_at_epoch": pruning.pruned_at,
                "params": values,
                "test_accuracy": None,  # trials never look at the test set
                "timings": {"train_seconds": fit.train_seconds, "total_seconds": seconds},
            }
            write_json(run_dir / METRICS, metrics)
            self.failures = 0
            summary = f"{self.s.metric} {value:.4f} (best epoch {best_epoch} of {len(fit.history)}), {seconds:.1f} s"
            if pruning.pruned_at:
                message = f"pruned by Optuna after epoch {pruning.pruned_at} ({self.s.metric} {pruning.last:.4f})"
                write_status(run_dir, "pruned", message=message)
                self.say(f"{self.prefix}trial {trial.number}: pruned after epoch {pruning.pruned_at}: {summary}")
                raise optuna.TrialPruned(message)
            write_status(run_dir, COMPLETE, message=f"trial {trial.number}: validation only (no test evaluation)")
            self.say(f"{self.prefix}trial {trial.number}: complete: {summary}  {_fmt_params(values)}")
            return value
        finally:
            if plan.lock is not None:
                plan.lock.release()


def _oom_errors() -> tuple[type[BaseException], ...]:
    import torch

    return (torch.cuda.OutOfMemoryError,) if hasattr(torch.cuda, "OutOfMemoryError") else ()


def _fmt_params(values: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def run_worker(
    settings: TuneSettings,
    index: int = 0,
    *,
    dataset: Any = None,
    pruner: Any = None,
    say: Log | None = None,
    parent_pid: int | None = None,
) -> None:
    """One worker: load the data once, then run trials of the study until its budget is complete (or the
    timeout passes, or the parent launcher is gone)."""
    from cifarlab.data import load_dataset

    say = say or _printer(settings.quiet)
    with quiet_optuna():
        study = open_study(settings, index, pruner=pruner, create=False)
        if not _more_to_run(study, settings.n_trials):
            return
        ds = dataset if dataset is not None else load_dataset(settings.recipe.dataset, settings.data_dir)
        objective = _Objective(settings, ds, index, say)

        def stop_when_done(study: Any, trial: Any) -> None:
            gone = parent_pid is not None and os.getppid() != parent_pid
            if gone or not _more_to_run(study, settings.n_trials):
                study.stop()
            elif objective.failures >= MAX_CONSECUTIVE_FAILURES:
                say(f"{objective.prefix}stopping: the last {objective.failures} trials failed")
                study.stop()

        study.optimize(
            objective,
            timeout=settings.timeout,
            catch=(_TrialFailed,),
            callbacks=[stop_when_done],
            gc_after_trial=True,
        )


def _printer(quiet: bool) -> Log:
    if quiet:
        return lambda s: None
    return lambda s: print(s, flush=True)


def worker_main(argv: Sequence[str]) -> int:
    """Entry of a worker process started by `tune(workers=N)`: `<spec.json> <index> <parent pid>`."""
    from cifarlab.cli.common import print_error
    from cifarlab.plugins import load_plugins

    spec_path, index, parent = argv[0], int(argv[1]), int(argv[2])
    try:
        spec = read_json(spec_path)
        load_plugins(spec.get("plugins") or [])
        settings = TuneSettings.from_dict(spec)
        _pin_cores(index, settings.workers)
        run_worker(settings, index, parent_pid=parent)
    except KeyboardInterrupt:
        return 130
    except UserError as e:
        print_error(f"worker {index}: {e}")
        return 2
    return 0


def _pin_cores(index: int, workers: int) -> None:
    """Give each local worker its own slice of this process's cores (threads of N workers would fight)."""
    if workers < 2 or not hasattr(os, "sched_getaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        return
    per = len(cores) // workers
    os.sched_setaffinity(0, set(cores[index * per : (index + 1) * per]))


# -- the study end to end -----------------------------------------------------------------------------------


@dataclass
class TuneResult:
    out_dir: Path
    counts: dict[str, int]
    best_number: int | None
    best_value: float | None
    best_params: dict[str, Any]
    best_config: Path | None
    final_runs: list[dict[str, Any]]
    summary: dict[str, Any]


def start_workers(settings: TuneSettings) -> list[subprocess.Popen[bytes]]:
    """Start settings.workers local worker processes on the study's storage (the study must exist); each runs
    `worker_main` with the settings written to <out_dir>/tune-worker.json."""
    spec = settings.out_dir / WORKER_SPEC
    write_json(spec, settings.to_dict())
    code = "import sys; from cifarlab.tune import worker_main; sys.exit(worker_main(sys.argv[1:]))"
    return [
        subprocess.Popen([sys.executable, "-c", code, str(spec), str(i), str(os.getpid())])
        for i in range(settings.workers)
    ]


def run_workers(settings: TuneSettings, say: Log) -> int:
    """Start the local workers, wait for them (`wait_workers`), then delete tune-worker.json: each worker reads it
    once, as it starts, and nothing else does (study.json records the study). Returns how many ended with an
    error."""
    procs = start_workers(settings)
    try:
        say(f"started {len(procs)} worker processes: {', '.join(str(p.pid) for p in procs)}")
        return wait_workers(procs, say)
    finally:
        # Only once every worker is gone (a Ctrl-C waits for them too): none still has to read it.
        if all(p.poll() is not None for p in procs):
            (settings.out_dir / WORKER_SPEC).unlink(missing_ok=True)


def wait_workers(procs: Sequence[subprocess.Popen[bytes]], say: Log) -> int:
    """Wait for the worker processes; returns how many ended with an error. On Ctrl-C (which they got too) they
    get 30 s to mark their trials before they are killed."""
    try:
        rcs = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    bad = [(p.pid, rc) for p, rc in zip(procs, rcs) if rc != 0]
    for pid, rc in bad:
        say(f"worker process {pid} ended with exit status {rc}")
    return len(bad)


def tune(
    settings: TuneSettings,
    *,
    dataset: Any = None,
    pruner: Any = None,
    say: Log | None = None,
    command: str | None = None,
) -> TuneResult:
    """Run (or resume) the study, write its outputs, then train the best trial's full run `final_seeds` times.

    `dataset` (a `cifarlab.data.Dataset`) and `pruner` (an Optuna pruner object) are for the Python API and tests;
    both need `workers=1`. Writes into `settings.out_dir`: study.db (default storage), trials/ (a run folder per
    trial), trials.csv / trials.md, best.yaml, report.html / report.md / plots/, study.json, final/ (full runs).
    """
    from cifarlab import tune_report
    from cifarlab.device import check_precision, resolve_device

    say = say or _printer(settings.quiet)
    if settings.workers > 1 and (dataset is not None or pruner is not None):
        raise UserError("tune: a dataset or pruner object works in one process only (workers=1)")
    require_optuna()
    trial_recipe = settings.trial_recipe()  # checks the trial-only keys
    if trial_recipe.val_fraction <= 0:
        raise ConfigError(
            f"tuning reads the validation metric, but the trials of recipe {settings.recipe.name!r} have no "
            "validation split (val_fraction=0): add `trial: {val_fraction: 0.1}` to the space or --trial-set "
            "val_fraction=0.1 (the final run keeps the recipe's own split)"
        )
    check_precision(trial_recipe.precision, resolve_device(settings.device))
    t0 = time.perf_counter()
    # The data once, here: a bad path fails before any trial, and the workers find the decoded cache filled.
    if dataset is None:
        from cifarlab.data import load_dataset

        dataset = load_dataset(settings.recipe.dataset, settings.data_dir)
    # A split that holds out every image of a class fails every trial alike: refused once, before the study.
    from cifarlab.data import recipe_split

    _, val_idx = recipe_split(trial_recipe, dataset.y_train, dataset.classes, needs_validation=True)
    if len(val_idx) == 0:  # val_fraction > 0 of a few images can round to none: every trial would fail alike
        raise ConfigError(
            f"the trials' val_fraction={trial_recipe.val_fraction:g} of {len(dataset.y_train)} training images is an "
            "empty validation split; raise val_fraction (--trial-set val_fraction=..., or trial: in the space)"
        )
    recipe_split(settings.recipe, dataset.y_train, dataset.classes)  # the final runs' own split
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        study = open_study(settings, 0, pruner=pruner, create=True)
    except BaseException:
        _remove_if_empty(settings.out_dir)  # a storage that cannot be opened leaves no empty study folder
        raise
    say(f"study {settings.study_name!r}: {redact(settings.storage_url)}; folder {settings.out_dir}")
    recover_killed_trials(study, settings, say)
    c = counts(study)
    done = c["complete"] + c["pruned"]
    if sum(c.values()):
        # A trial Ctrl-C or SIGTERM cut short is marked failed for Optuna and queued again: not a failure to alarm
        cut = sum(
            1
            for t in study.get_trials(deepcopy=False)
            if t.state.name == "FAIL" and str(t.user_attrs.get("fail_reason", "")).startswith("interrupted")
        )
        failed = f"{c['failed'] - cut} failed" + (f", {cut} interrupted (queued again)" if cut else "")
        say(
            f"resuming: {c['complete']} complete, {c['pruned']} pruned, {failed}, {c['running']} running "
            f"elsewhere, {c['waiting']} queued; {max(0, settings.n_trials - done)} of {settings.n_trials} to go"
        )
        if done > settings.n_trials:
            say(
                f"the study already holds {done} complete or pruned trials, more than --n-trials {settings.n_trials}: "
                "no trial runs; give a larger --n-trials to run more"
            )
    say(
        f"optimizing {settings.metric} ({settings.direction}) over {len(settings.space.params)} parameters with TPE, "
        f"pruner {settings.pruner if pruner is None else type(pruner).__name__}, {settings.workers} worker(s), "
        f"trial epochs {trial_recipe.epochs}"
    )
    interrupted = False
    try:
        if settings.workers == 1:
            run_worker(settings, 0, dataset=dataset, pruner=pruner, say=say)
        else:
            run_workers(settings, say)
    except KeyboardInterrupt:
        interrupted = True
    recover_killed_trials(study, settings, say)
    study_seconds = time.perf_counter() - t0
    if interrupted:
        tune_report.write_outputs(study, settings, invocation_seconds=study_seconds, report=False)
        say(f"interrupted; run the same command again to resume study {settings.study_name!r}")
        raise Interrupted if not settings.quiet else KeyboardInterrupt
    final_due = settings.final_seeds > 0
    previous = _earlier_final_runs(settings)
    # Tables, best.yaml and study.json first (quick); the report once, after the final runs it shows.
    summary = tune_report.write_outputs(
        study, settings, invocation_seconds=study_seconds, report=settings.report and not final_due
    )
    c = summary["counts"]
    left = settings.n_trials - c["complete"] - c["pruned"]
    if left > 0:
        say(
            f"{plural(left, 'trial')} of the budget {'is' if left == 1 else 'are'} still to run (timeout, failures or "
            "other workers): run the command again"
        )
    best = summary.get("best")
    final: list[dict[str, Any]] = []
    if final_due:
        if best is not None:
            final = _final_runs(settings, best, dataset, say, command, previous)
        summary = tune_report.write_outputs(study, settings, invocation_seconds=study_seconds, final_runs=final)
        if any(r.get("status") == "stopped" for r in final):  # Ctrl-C in a final run: as in a trial, exit 130
            # The final run has said how to go on (this command again, `resume_with`)
            raise Interrupted if not settings.quiet else KeyboardInterrupt
    report = f"; report: {settings.out_dir / tune_report.REPORT_HTML}" if settings.report else ""
    say(f"trials: {settings.out_dir / tune_report.TRIALS_MD}{report}")
    if best is not None:
        best_yaml = settings.out_dir / tune_report.BEST_CONFIG
        say(f"best: trial {best['number']}, {settings.metric} {best['value']:.4f}; cifarlab train --config {best_yaml}")
    return TuneResult(
        out_dir=settings.out_dir,
        counts=dict(c),
        best_number=best["number"] if best else None,
        best_value=best["value"] if best else None,
        best_params=dict(best["params"]) if best else {},
        best_config=settings.out_dir / tune_report.BEST_CONFIG if best else None,
        final_runs=final,
        summary=summary,
    )


def _remove_if_empty(folder: Path) -> None:
    """`folder` and the parents this study created for it (up to the runs folder), where nothing is in them."""
    for p in (folder, folder.parent):
        try:
            p.rmdir()  # only an empty folder: anything inside stays
        except OSError:
            return


def _earlier_final_runs(settings: TuneSettings) -> list[dict[str, Any]]:
    """The final runs study.json lists from an earlier invocation."""
    from cifarlab import tune_report

    path = settings.out_dir / tune_report.STUDY_JSON
    if not path.exists():
        return []
    try:
        prev = read_json(path)
    except UserError:
        return []
    runs = prev.get("final_runs") if isinstance(prev, dict) else None
    return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


def _unfinished_final_run(final_dir: Path, recipe: Any) -> Path | None:
    """A final run of exactly `recipe` (trial and seed) in `final_dir` that has a checkpoint and did not finish: the
    process that trained it was killed before the study recorded it, so only the folder tells."""
    from cifarlab.runs import CHECKPOINT, CONFIG, run_status

    if not final_dir.is_dir():
        return None
    want = json.loads(json.dumps(recipe.to_dict()))
    for folder in sorted(final_dir.iterdir(), reverse=True):  # the newest first
        if not (folder / CHECKPOINT).is_file():
            continue
        try:
            config = read_json(folder / CONFIG)
        except UserError:
            continue
        if not isinstance(config, dict) or json.loads(json.dumps(config.get("recipe"))) != want:
            continue
        status, _ = run_status(types.SimpleNamespace(path=folder))  # status.json (and its process) decide
        if status in ("stopped", "crashed"):  # "crashed": a status of "running" whose process is gone
            return folder
    return None


def _final_runs(
    settings: TuneSettings,
    best: Mapping[str, Any],
    dataset: Any,
    say: Log,
    command: str | None,
    previous: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """The best trial's full run (test set evaluated, weights, report), once per seed; `previous` runs of the same
    best trial and seed that finished (the command run again on a finished study) are reused."""
    from cifarlab.experiment import run_experiment

    def of_best(r: Mapping[str, Any], status: str) -> bool:
        return r.get("trial") == best["number"] and r.get("status") == status and Path(str(r.get("run_dir"))).is_dir()

    earlier = {r.get("seed"): dict(r) for r in previous if of_best(r, "finished")}
    # A final run stopped by Ctrl-C (its checkpoint kept) is continued, not started again beside it.
    stopped = {
        r.get("seed"): Path(str(r["run_dir"]))
        for r in previous
        if of_best(r, "stopped") and (Path(str(r["run_dir"])) / "checkpoint.pt").is_file()
    }
    recipe = settings.final_recipe(best["params"])
    for i in range(settings.final_seeds):  # one killed (SIGKILL, OOM) before study.json recorded it: found by recipe
        seed = settings.recipe.seed + i
        if seed not in earlier and seed not in stopped:
            found = _unfinished_final_run(settings.out_dir / FINAL_DIR, recipe.replace(seed=seed))
            if found is not None:
                stopped[seed] = found
    # A stopped final run is continued by the tune command itself (which may have more final runs to do)
    again = f"the same `cifarlab tune` command (study {settings.study_name!r} goes on with its final run)"
    out = []
    for i in range(settings.final_seeds):
        seed = settings.recipe.seed + i
        if seed in earlier:
            say(f"final run, seed {seed}: already done: {earlier[seed]['run_dir']}")
            out.append(earlier[seed])
            continue
        shared: dict[str, Any] = dict(
            dataset=dataset, data_dir=settings.data_dir, device=settings.device, report=settings.report,
            quiet=settings.quiet, progress=False, resume_with=again, log=say,
        )  # fmt: skip
        if seed in stopped:
            say(f"final run of trial {best['number']}, seed {seed}: resuming {stopped[seed]}")
            result = run_experiment(resume=stopped[seed], **shared)
        else:
            say(f"final run of trial {best['number']}, seed {seed}: the full recipe, evaluated on the test set")
            result = run_experiment(
                recipe.replace(seed=seed), runs_root=settings.out_dir / FINAL_DIR, command=command, **shared
            )
        out.append(
            {
                "trial": best["number"],
                "seed": seed,
                "run_dir": str(result.run_dir),
                "status": result.status,
                "test_accuracy": result.metrics.get("test_accuracy"),
                "epochs_run": result.metrics.get("epochs_run"),
                "train_seconds": (result.metrics.get("timings") or {}).get("train_seconds"),
            }
        )
        if result.status != "finished":
            break
    return out
