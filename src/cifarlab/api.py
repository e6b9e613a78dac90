"""The Python API: train a recipe on CIFAR-10 or your own data, with your own model and callbacks, and get a
run back to evaluate, predict with, report on and export. `docs/API.md` shows it in use.

    import cifarlab
    run = cifarlab.fit("fast", data_dir="../shared/data")
    run = cifarlab.fit("reference", data=(x_train, y_train, x_test, y_test), model=MyNet(), epochs=5)
    run.test_accuracy, run.predict(images), run.evaluate(), run.report(), run.export("onnx")
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn
from torch.nn.parameter import is_lazy

from cifarlab.budget import Clock, parse_duration
from cifarlab.calibrate import calibrate_run
from cifarlab.config import apply_overrides, machine_variant
from cifarlab.data import Dataset, as_images, from_arrays, from_torch_dataset
from cifarlab.data.dataset import NAMED_DATASETS
from cifarlab.device import resolve_device
from cifarlab.errors import ConfigError, DataError, UserError
from cifarlab.evaluate import EvalResult, evaluate_run, load_run_dataset
from cifarlab.experiment import run_experiment
from cifarlab.export import export as export_run
from cifarlab.files import read_json
from cifarlab.inference import predict_proba, recipe_options
from cifarlab.predict import predict_paths
from cifarlab.recipes import RECIPES, Recipe, get_recipe, validate
from cifarlab.registry import CALLBACKS, MODELS
from cifarlab.report import build_report
from cifarlab.runs import (
    CONFIG,
    STATUS,
    WEIGHTS,
    Run,
    check_runs_root,
    load_run,
    load_weights,
    unregistered_model_message,
)
from cifarlab.train import Callback

__all__ = ["TrainedRun", "as_dataset", "fit", "load"]


def as_dataset(data: Any, classes: Sequence[str] | None = None) -> Dataset | None:
    """Turn what a user has into a `Dataset`: None (the recipe's dataset), a `Dataset`, a name or path
    (cifar10, cifar100, an image folder), `(x_train, y_train, x_test, y_test)` arrays or tensors, a mapping with
    those keys, or `(train, test)` map-style torch Datasets of (image, label) pairs."""
    if data is None or isinstance(data, Dataset):
        return data
    if isinstance(data, (str, Path)):
        return None  # resolved by the recipe's `dataset` key (see fit)
    if isinstance(data, dict):
        # x_test/y_test may be left out when test_fraction says how much of the training set to hold out.
        need = ("x_train", "y_train") + (() if data.get("test_fraction") is not None else ("x_test", "y_test"))
        missing = [k for k in need if k not in data]
        if missing:
            raise UserError(
                f"data: a mapping needs the keys {', '.join(need)} (missing {', '.join(missing)}); or x_train, "
                "y_train and test_fraction (e.g. 0.1) to hold out a test set"
            )
        unknown = sorted(set(data) - {"x_train", "y_train", "x_test", "y_test", "classes", "test_fraction", "seed"})
        if unknown:
            raise UserError(f"data: unknown keys {unknown} in the mapping")
        if classes is not None and data.get("classes") is not None and list(classes) != list(data["classes"]):
            raise UserError("classes= and the mapping's 'classes' name different classes; give one of them")
        return from_arrays(
            data["x_train"],
            data["y_train"],
            data.get("x_test"),
            data.get("y_test"),
            classes=data.get("classes", classes),
            test_fraction=data.get("test_fraction"),
            seed=data.get("seed", 0),
        )
    if isinstance(data, (tuple, list)):
        if len(data) == 4:
            return from_arrays(*data, classes=classes)
        if len(data) == 2 and all(isinstance(d, torch.utils.data.Dataset) for d in data):
            return from_torch_dataset(data[0], data[1], classes=classes)
        if len(data) == 2:
            raise UserError(
                "data: (images, labels) has no test set; pass {'x_train': images, 'y_train': labels, "
                "'test_fraction': 0.1} to hold one out, or (x_train, y_train, x_test, y_test)"
            )
    raise UserError(
        f"data: cannot use a {type(data).__name__}; pass (x_train, y_train, x_test, y_test) arrays, "
        "(train, test) torch Datasets, a cifarlab Dataset, or a dataset name / image-folder path"
    )


_USER_MODELS: dict[str, tuple[tuple[str, tuple[int, ...]], ...]] = {}  # name -> its template's tensor shapes


def _register_user_model(model: nn.Module) -> tuple[str, bool]:
    """A model instance gets a registry entry for this process, so the run it trains can be loaded again:
    (its name, whether the name is new).

    The entry builds a copy of the instance as it was given (before training), so loading one run never hands
    out the object another run trained (whose weights `get_model` would then overwrite). Another architecture
    of the same class gets its own name (`user.Net.2`), so the first run still loads."""
    base = f"user.{type(model).__qualname__}"
    # (A lazy module's parameters have no shape until its first forward.)
    shapes = tuple((k, (-1,) if is_lazy(v) else tuple(v.shape)) for k, v in model.state_dict().items())
    name, k = base, 2
    while name in MODELS and _USER_MODELS.get(name, shapes) != shapes:
        name, k = f"{base}.{k}", k + 1
    try:
        template = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 (a module that cannot be copied: share the instance, as before)
        template = None

    def build(recipe: Any, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
        return copy.deepcopy(template) if template is not None else model

    new = name not in MODELS
    _USER_MODELS[name] = shapes
    MODELS.register(name, description=f"user model {type(model).__qualname__}", replace=True)(build)
    return name, new


@contextlib.contextmanager
def _forget_if_unused(name: str | None, runs_dir: str | Path, before: set[Path]) -> Iterator[None]:
    """A fit that fails before any run folder records the model's new name (refused by the probe, say) takes
    that name out of the registry again: nothing can load it, and a later fit of a fixed class reuses it."""
    try:
        yield
    except BaseException:
        if name is not None and _left_folder(runs_dir, before) is None:
            MODELS.unregister(name)
            _USER_MODELS.pop(name, None)
        raise


def _check_callbacks(callbacks: Any) -> tuple[list[Callback], list[str]]:
    """`callbacks` as (Callback instances, registered callback names), else one line saying what to pass (before
    any work)."""
    if callbacks is None:
        return [], []
    if isinstance(callbacks, (Callback, str)) or not isinstance(callbacks, (list, tuple)):
        raise UserError(
            f"callbacks: pass a list of cifarlab.Callback instances, not a {type(callbacks).__name__}; the list may "
            "also hold names of registered callbacks (strings)"
        )
    instances, names = [], []
    for cb in callbacks:
        if isinstance(cb, str):
            if cb not in CALLBACKS:
                known = ", ".join(CALLBACKS.names()) or "none"
                raise UserError(
                    f"callbacks: {cb!r} is not a registered callback name (registered: {known}); pass a "
                    "cifarlab.Callback instance, or register a factory under that name first"
                )
            names.append(cb)
            continue
        if not isinstance(cb, Callback):
            hint = " (a class: call it, MyCallback())" if isinstance(cb, type) else ""
            raise UserError(
                f"callbacks: {cb!r} is not a cifarlab.Callback instance{hint} nor a registered callback name (a string)"
            )
        order = getattr(cb, "order", 0)
        if not isinstance(order, (int, float)) or isinstance(order, bool) or order != order:
            raise UserError(
                f"callbacks: {type(cb).__name__}.order must be a number (callbacks run by it), not {order!r}"
            )
        instances.append(cb)
    return instances, names


# -- CLI wording for Python callers ---------------------------------------------------------------------------

# The command's options whose Python counterparts are fit()'s / TrainedRun's arguments. Errors raised deep inside
# (device resolution, --init, the run folder) name the flag; a Python caller reads the argument's name instead.
_FLAG_RE = re.compile(
    r"--(device|init|runs-dir|data-dir|budget|mlflow|target)(?![\w-])"
    r"(?: ('[^']*'|\"[^\"]*\")| (\S+?)(?=[:;,)]?(?:\s|$)))?"
)
_FLAGS_WITH_VALUES = {"device", "init", "runs-dir", "mlflow"}  # "--budget cannot ...": the next word is prose


def _flag_to_argument(m: re.Match[str]) -> str:
    flag, quoted, bare = m.group(1), m.group(2), m.group(3)
    arg = flag.replace("-", "_")
    if quoted is not None:
        return f"{arg}={quoted}"
    if bare is not None and flag in _FLAGS_WITH_VALUES and not bare.startswith("("):
        return f"{arg}={bare!r}"
    return f"{arg}=" + (f" {bare}" if bare is not None else "")


def python_wording(message: str, *, data_arg: bool = False, method: str | None = None) -> str:
    """A message written for the command line, reworded for a Python caller: `--device 'tpu'` -> `device='tpu'`,
    `--set lr=...` -> `lr=...`, `(--data-dir)` -> `(data_dir=)` (`(data= or data_dir=)` where the method takes
    `data=`). `method`: the TrainedRun method called, named in place of the `evaluate` the advice shows. Commands
    quoted in backticks are left as they are (they are for a shell)."""
    parts = message.split("`")
    for i in range(0, len(parts), 2):  # outside backticks only
        text = parts[i]
        if data_arg:
            text = text.replace("(--data-dir)", "(data= or data_dir=)")
        text = re.sub(r"--set (\w+=)", r"\1", text)
        text = _FLAG_RE.sub(_flag_to_argument, text)
        # Where the message gave the Python form beside the option, keep that one: "(data_dir=; data_dir= in
        # Python)", "timm_name=resnet18 (timm_name='resnet18' in Python)", "train_scales= (cifarlab.fit: ...)".
        text = re.sub(r"(\w+)=; \1= in Python", r"\1=", text)
        text = re.sub(r"(\w+)=\S* \((?:cifarlab\.fit: )?(\1=\S*?)(?: in Python)?\)(?=[\s;,.]|$)", r"\2", text)
        if method is not None:
            text = text.replace("cifarlab.load(run).evaluate(", f"cifarlab.load(run).{method}(")
        parts[i] = text
    return "`".join(parts)


@contextlib.contextmanager
def _python_errors(*, data_arg: bool = False, method: str | None = None) -> Iterator[None]:
    """UserErrors raised inside, reworded for Python (`python_wording`); the same exception, its type kept."""
    try:
        yield
    except UserError as e:
        if e.args and isinstance(e.args[0], str):
            e.args = (python_wording(e.args[0], data_arg=data_arg, method=method), *e.args[1:])
        raise


_F = TypeVar("_F", bound=Callable[..., Any])


def _for_python(fn: _F) -> _F:
    """`fit` and `load`: their UserErrors in Python's words (`python_wording`)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _python_errors():
            return fn(*args, **kwargs)

    return cast(_F, wrapper)


def _run_folders(runs_dir: str | Path) -> set[Path]:
    root = Path(runs_dir)
    try:
        return {p for p in root.iterdir() if p.is_dir()} if root.is_dir() else set()
    except OSError:
        return set()


def _recorded_status(run_dir: Path) -> dict[str, Any]:
    try:
        st = read_json(run_dir / STATUS) if (run_dir / STATUS).exists() else {}
    except UserError:  # damaged: the caller says what it knows without it
        st = {}
    return st if isinstance(st, dict) else {}


def _left_folder(runs_dir: str | Path, before: set[Path]) -> Path | None:
    """The run folder this process created under `runs_dir` since `before` was listed (None: none, or unclear)."""
    mine = [p for p in _run_folders(runs_dir) - before if _recorded_status(p).get("pid") == os.getpid()]
    return mine[0] if len(mine) == 1 else None


def _name_left_folder(e: Exception, runs_dir: str | Path, before: set[Path]) -> None:
    """An exception out of training after this process created its run folder: name the folder it left (and
    the status that folder records), so the caller need not search `runs_dir` for it."""
    folder = _left_folder(runs_dir, before)
    if folder is None:
        return
    status = _recorded_status(folder).get("status", "unknown")
    where = f"Run folder: {folder} (status {status!r})"
    if isinstance(e, UserError) and e.args and isinstance(e.args[0], str):
        e.args = (f"{e.args[0].rstrip('.')}. {where}", *e.args[1:])
    elif hasattr(e, "add_note"):  # Python 3.11+: shown under the traceback
        e.add_note(f"cifarlab.fit: {where}")


def _unfinished(run_dir: Path, status: str, message: str) -> str:
    """A run that ended without finishing, in the words of its status.json (`crashed` for a diverged run, with
    the reason beside it), and where its folder is."""
    recorded = _recorded_status(run_dir).get("status")
    shown = recorded if isinstance(recorded, str) and recorded else status
    why = f" (training {status})" if status != shown else ""
    said = (message or "no reason recorded").rstrip(".")
    return f"training did not finish: {shown}{why}: {said}. Run folder: {run_dir}"


@_for_python
def fit(
    recipe: str | Recipe = "fast",
    data: Any = None,
    *,
    classes: Sequence[str] | None = None,
    model: str | nn.Module | None = None,
    callbacks: Sequence[Callback | str] = (),
    data_dir: str | Path | None = None,
    runs_dir: str | Path = "runs",
    device: str = "auto",
    deterministic: bool = False,
    report: bool = True,
    quiet: bool = True,
    mlflow: bool | str = False,
    init: str | Path | None = None,
    budget: str | float | None = None,
    **overrides: Any,
) -> TrainedRun:
    """Train and return the run. `recipe`: a name or a `Recipe`; `overrides`: recipe keys (`epochs=5`, ...),
    checked like `--set`. `model`: a registered model name or your own `nn.Module` (it gets float images
    (N, C, H, W) and returns logits). `callbacks`: Callback instances and registered callback names (added to the
    recipe's `callbacks` key, after its own). `data`: see `as_dataset`; None trains on the recipe's dataset, found in
    `data_dir` (default $CIFARLAB_DATA, else ~/.cache/cifarlab, downloading CIFAR-10 when online). `init`: a run
    folder, a .safetensors file or a PyTorch state-dict file to fine-tune from (see `cifarlab.finetune`). `budget`:
    seconds or a duration ("90s", "2m") from this call to the test accuracy, as `cifarlab train --budget`. A recipe
    named by a string with a `cpu_fp32_variant` trains that variant where it would run in fp32 on a CPU (no
    built-in recipe names one: `fast` serves both kinds of CPU), unless a budget or your own nn.Module is given;
    pass `cpu_fp32_variant=""` to keep it."""
    clock = Clock.from_now("the fit() call")  # before any work: the budget covers data loading and the probe
    instances, callback_names = _check_callbacks(callbacks)
    seconds = parse_duration(budget, "budget=") if budget is not None else None
    base = get_recipe(recipe) if isinstance(recipe, str) else recipe
    # What the size keys a model ignores must keep (`validate`): the named recipe's values, or those of the
    # registered recipe a Recipe object was derived from (same name), else the defaults.
    origin = base if isinstance(recipe, str) else RECIPES.get(recipe.name)
    if isinstance(data, (str, Path)):
        overrides = {"dataset": str(data), **overrides}
    if isinstance(model, str):
        overrides = {"model": model, **overrides}
    r = apply_overrides(base, list(overrides.items()), source="fit()")
    own_model = isinstance(model, nn.Module)
    variant = machine_variant(r, device) if isinstance(recipe, str) and seconds is None and not own_model else None
    if variant is not None:  # as `cifarlab train`: fast on a CPU without bf16 trains its fp32 variant
        origin = get_recipe(variant)
        r = apply_overrides(origin, list(overrides.items()), source="fit()")
    if callback_names:  # by name, as `--set callbacks=...`: the run records them and builds them on --resume
        r = r.replace(callbacks=(*r.callbacks, *callback_names))
    check_runs_root(runs_dir)  # a runs folder that cannot take the run fails now, not after loading data
    module, new_name = None, None
    before = _run_folders(runs_dir)
    if isinstance(model, nn.Module):
        module = model
        name, new = _register_user_model(model)
        r, new_name = r.replace(model=name), name if new else None
    elif model is not None and not isinstance(model, str):
        raise ConfigError(f"model: pass a registered model name or an nn.Module, not a {type(model).__name__}")
    with _forget_if_unused(new_name, runs_dir, before):
        if classes is not None and (data is None or isinstance(data, (str, Path, Dataset))):
            # A named dataset, an image folder or a Dataset already has its class names: `classes` would be ignored.
            raise UserError("classes= names the classes of arrays or torch datasets; this data already has its own")
        ds = as_dataset(data, classes)
        if ds is not None and r.dataset in NAMED_DATASETS:
            r = r.replace(dataset=ds.name if ds.name not in NAMED_DATASETS else r.dataset)
        r = validate(r, check_paths=ds is None, base=origin)
        # `deterministic=True` switches torch's deterministic algorithms on for the run, and the run seeds torch's
        # random generators with the recipe's seed; the caller's session gets its own settings and random state back
        # afterwards (the CLI's process simply ends).
        was_deterministic, was_benchmark = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
        gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        try:
            with torch.random.fork_rng(devices=gpus):
                result = run_experiment(
                    r,
                    dataset=ds,
                    data_dir=Path(data_dir) if data_dir is not None else None,
                    runs_root=runs_dir,
                    device=device,
                    deterministic=deterministic,
                    report=report,
                    quiet=quiet,
                    model=module,
                    callbacks=instances,
                    command="cifarlab.fit(...)",
                    mlflow=mlflow,
                    init=Path(init) if init is not None else None,
                    budget=seconds,
                    budget_clock=clock,
                )
        except Exception as e:
            _name_left_folder(e, runs_dir, before)
            raise
        finally:
            torch.use_deterministic_algorithms(was_deterministic)
            torch.backends.cudnn.benchmark = was_benchmark
        if result.status != "finished":
            raise UserError(_unfinished(Path(result.run_dir), result.status, str(result.metrics.get("message") or "")))
        return TrainedRun(load_run(result.run_dir), dataset=ds, model=module)


def _check_given_model(model: Any, path: Path, config: dict[str, Any]) -> None:
    """`load(model=...)`: an nn.Module of the class the run trained (where the run recorded one) whose tensors have
    the names and shapes of the run's weights; else one line saying what differs."""
    if not isinstance(model, nn.Module):
        hint = f" (a class: create one, {model.__name__}(...))" if isinstance(model, type) else ""
        raise UserError(f"model: pass an nn.Module instance, not a {type(model).__name__}{hint}")
    given = f"{type(model).__module__}.{type(model).__qualname__}"
    recorded = config.get("model_class")
    if isinstance(recorded, str) and recorded != given and not recorded.endswith("." + type(model).__qualname__):
        raise UserError(f"model: {path} was trained with a {recorded}; model= is a {given}")
    from safetensors import safe_open

    try:
        with safe_open(str(path / WEIGHTS), framework="pt") as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a mapping)
    except Exception:  # noqa: BLE001 (missing or damaged: loading the weights says which, in its words)
        return
    # (A lazy module's parameters have no shape until its first forward: their names are still checked.)
    own = {k: None if is_lazy(v) else tuple(v.shape) for k, v in model.state_dict().items()}
    lacks, extra = sorted(set(saved) - set(own)), sorted(set(own) - set(saved))
    wrong = [k for k, shape in own.items() if k in saved and shape is not None and shape != saved[k]]
    if lacks or extra or wrong:
        detail = "; ".join(
            part
            for part in (
                f"the run has {lacks[:5]}, which model= lacks" if lacks else "",
                f"model= has {extra[:5]}, which the run lacks" if extra else "",
                ", ".join(f"{k} is {own[k]} in model=, {saved[k]} in the run" for k in wrong[:5]),
            )
            if part
        )
        raise UserError(
            f"model= ({type(model).__qualname__}) does not match the weights of {path} ({detail}); build it as the "
            "trained model was built (the same arguments)"
        )


def _model_registered(name: str, template: nn.Module) -> contextlib.AbstractContextManager[None]:
    """`name` builds copies of `template` inside, for this thread only (`Registry.overlay`).

    A run loaded with `load(run, model=...)` needs its model's name to build whenever cifarlab loads the run
    folder again (evaluate, calibrate, report, export, explain); another run's model of the same recorded name
    (another process's `user.MyNet` of other shapes), or another thread's, keeps its own."""

    def build(recipe: Any, num_classes: int, input_shape: tuple[int, int, int]) -> nn.Module:
        return copy.deepcopy(template)

    return MODELS.overlay(name, build, description=f"user model {type(template).__qualname__}")


@_for_python
def load(run_dir: str | Path, *, model: nn.Module | None = None) -> TrainedRun:
    """A saved run folder as a `TrainedRun`. Its model must be registered in this process, or given: `model`, an
    instance of your own nn.Module built as the trained one was (a run of `fit(model=MyNet())` in another
    process); its class and tensor shapes are checked against the run, and the run's weights are loaded into
    it."""
    path = Path(run_dir)
    if model is None:
        try:
            return TrainedRun(load_run(path))
        except UserError:
            try:
                config = read_json(path / CONFIG)
            except UserError:
                config = None
            better = unregistered_model_message(path, config)
            if better is None:
                raise
            raise UserError(better) from None
    config = read_json(path / CONFIG) if path.is_dir() else None
    recipe = config.get("recipe") if isinstance(config, dict) else None
    name = recipe.get("model") if isinstance(recipe, dict) else None
    if not isinstance(name, str) or not isinstance(config, dict):
        load_run(path)  # not a run folder, or a damaged one: its own error
        raise UserError(f"{path / CONFIG} names no model; the file is damaged")
    _check_given_model(model, path, config)
    try:
        template = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 (a module that cannot be copied: share the instance)
        template = model
    with _model_registered(name, template):
        run = load_run(path)
    return TrainedRun(run, model=model, template=template)


_ACCEPTED = (
    "uint8 (0..255) or float (0..1) arrays or tensors (N, C, H, W), (N, H, W, C) or (N, H, W); a PIL image or a "
    "list of them; or image file / folder paths"
)


def _is_pil(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.") and hasattr(x, "getbands")  # without importing PIL for the check


def _nan_images(images: Any) -> list[int]:
    """Which images hold NaN pixels (for the error), [] when that cannot be told."""
    try:
        a = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        return np.flatnonzero(np.isnan(a.reshape(len(a), -1).astype(np.float64)).any(axis=1)).tolist()
    except Exception:  # noqa: BLE001 (only for the message)
        return []


def _method(*, data_arg: bool = False) -> Callable[[_F], _F]:
    """A TrainedRun method: its errors in Python's words, and the run's own model registered while it runs (a run
    loaded with `load(run, model=...)`; see `_model_registered`)."""

    def deco(fn: _F) -> _F:
        @functools.wraps(fn)
        def wrapper(self: TrainedRun, *args: Any, **kwargs: Any) -> Any:
            # One method at a time per run: they share one model instance, which get_model reloads and explain
            # hooks (two threads' Grad-CAM hooks caught each other's activations)
            with self._lock, self._own_model(), _python_errors(data_arg=data_arg, method=fn.__name__):
                return fn(self, *args, **kwargs)

        return cast(_F, wrapper)

    return deco


@dataclass
class TrainedRun:
    """A finished run: its folder, recipe, history and metrics, and the trained model (loaded on first use).

    `template`: for a run loaded with `load(run, model=...)`, a copy of the module given, which builds the model
    wherever cifarlab reads the run folder again."""

    run: Run
    dataset: Dataset | None = None
    model: nn.Module | None = None
    template: nn.Module | None = field(default=None, repr=False, compare=False)
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False, init=False)

    def _own_model(self) -> contextlib.AbstractContextManager[None]:
        if self.template is None:
            return contextlib.nullcontext()
        return _model_registered(self.recipe.model, self.template)

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def recipe(self) -> Recipe:
        return self.run.recipe

    @property
    def classes(self) -> list[str]:
        return self.run.classes

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.run.history

    @property
    def metrics(self) -> dict[str, Any]:
        return self.run.metrics

    @property
    def temperature(self) -> float:
        """The softmax temperature `predict` applies (fitted after training; 1.0 when the run has none)."""
        return self.run.temperature

    @property
    def test_accuracy(self) -> float:
        acc = self.run.metrics.get("test_accuracy")
        if acc is None:  # a stopped, crashed or diverged run has no test result
            status = read_json(self.path / STATUS).get("status") if (self.path / STATUS).exists() else "unknown"
            if status == "finished":  # finished, but its metrics.json is gone or was cut
                raise UserError(
                    f"{self.path} finished, but its metrics.json holds no test accuracy (missing or damaged): "
                    f"`cifarlab report {self.path}` evaluates it again"
                )
            raise UserError(f"{self.path} has no test accuracy: the run's status is {status!r}, not 'finished'")
        return float(acc)

    @_method()
    def get_model(self) -> nn.Module:
        """The trained model in eval mode, from `model.safetensors`."""
        if self.model is None:
            self.model = self.run.build_model()
        else:
            load_weights(self.model, self.run.path / WEIGHTS)
        return self.model.eval()

    def _images(self, images: Any) -> torch.Tensor:
        """Images as given to `predict` / `explain` -> uint8 (N, C, H, W) of the run's input shape, else one line
        saying what is accepted."""
        if _is_pil(images):
            images = [images]  # one image, as a list of one (np.asarray would read its rows as images)
        if not isinstance(images, (np.ndarray, torch.Tensor, list, tuple)):
            what = "None" if images is None else f"a value of type {type(images).__name__}"
            raise UserError(f"images: cannot use {what}; pass {_ACCEPTED}")
        if isinstance(images, (list, tuple)) and any(isinstance(p, (str, Path)) for p in images):
            raise UserError("images: a list holds image file paths or images, not both; pass them in two calls")
        c, h, w = self.run.input_shape
        if isinstance(images, (list, tuple)) and not images:
            return torch.zeros((0, c, h, w), dtype=torch.uint8)
        single = getattr(images, "ndim", None) == 3  # (C, H, W) or (H, W, C): read as a batch of 2-D images
        try:
            x = as_images(images)
        except DataError as e:
            if "NaN" not in str(e):
                raise
            bad = _nan_images(images)
            which = f" (images {', '.join(map(str, bad[:5]))}{', ...' if len(bad) > 5 else ''})" if bad else ""
            raise DataError(
                f"{e}{which}: a NaN pixel has no colour to classify; replace NaNs first (e.g. "
                "np.nan_to_num(images, nan=0.0), black) or leave those images out"
            ) from None
        if tuple(x.shape[1:]) != self.run.input_shape:
            one = " (one image? add a batch dimension: images[None])" if single else ""
            raise UserError(f"images are {tuple(x.shape[1:])} (C, H, W); this model takes {self.run.input_shape}{one}")
        return x

    @staticmethod
    def _as_list(images: Any) -> Any:
        if isinstance(images, Iterable) and not isinstance(images, (str, Path, bytes, dict, np.ndarray, torch.Tensor)):
            return list(images)  # a generator can be looked at only once
        return images

    @staticmethod
    def _paths(images: Any) -> list[Any] | None:
        if isinstance(images, (str, Path)):
            return [images]
        if isinstance(images, list) and images and all(isinstance(p, (str, Path)) for p in images):
            return images
        return None

    @_method()
    def predict(self, images: Any, *, device: str | None = None) -> torch.Tensor | list[dict[str, Any]]:
        """Class probabilities. `images`: uint8 (or [0, 1] float) arrays/tensors, NCHW or NHWC, of the run's
        input size, or PIL images -> an (N, classes) tensor (no images: (0, classes)); or file/folder paths -> one
        dict per file (top-5 classes)."""
        images = self._as_list(images)
        paths = self._paths(images)
        if paths is not None:
            return predict_paths(self.path, paths, top_k=min(5, len(self.classes)), device=device)
        x = self._images(images)
        if len(x) == 0:
            return torch.zeros(0, len(self.classes))
        model = self.get_model()
        mean, std = self.run.normalization
        dev = resolve_device(device) if device else None
        opts = recipe_options(self.recipe)
        return predict_proba(model, x, mean=mean, std=std, device=dev, temperature=self.temperature, **opts)

    @_method()
    def explain(
        self,
        images: Any,
        out_dir: str | Path | None = None,
        *,
        method: str = "gradcam",
        target: int | str | None = None,
        steps: int = 32,
        device: str | None = None,
    ) -> torch.Tensor | list[dict[str, Any]]:
        """Saliency maps (`cifarlab explain`; needs the extra: pip install 'cifarlab[explain]'). `method`:
        "gradcam" or "integrated_gradients" ("both" for files); `target`: a class name or index to explain instead
        of each image's predicted class; `steps`: integrated-gradients steps.

        Image files / folders -> the command's rows ({"path", "method", "class", "probability", "written"}, or
        "error"), with `<stem>.<method>.png` written into `out_dir` (default RUN/explain). Arrays, tensors or PIL
        images (as `predict` takes them) -> the maps, a float (N, H, W) tensor in [0, 1]; with `out_dir`, also
        `<index>.<method>.png` per image there (the image beside its map)."""
        from cifarlab.explain import METHODS, explain_paths, saliency, side_by_side_png
        from cifarlab.explain import _target_index as target_index

        both = method == "both"
        if not both and method not in METHODS:
            raise UserError(f"method: {method!r} is not one of {', '.join(METHODS)} (or 'both', for files)")
        images = self._as_list(images)
        paths = self._paths(images)
        if paths is not None:
            methods = METHODS if both else (method,)
            return explain_paths(
                self.path, paths, methods=methods, out_dir=out_dir, target=target, steps=steps, device=device
            )
        if both:
            raise UserError("method='both' is for image files; for arrays call explain once per method")
        x = self._images(images)
        tgt = target_index(target, self.classes)
        model = self.get_model()
        mean, std = self.run.normalization
        maps = saliency(model, x, method=method, target=tgt, mean=mean, std=std, device=device, steps=steps)
        if out_dir is not None and len(x):
            from cifarlab.files import atomic_write_bytes
            from cifarlab.inference import model_device, to_float

            dev = model_device(model)
            with torch.no_grad():  # the title's class and probability: as `cifarlab explain` (no TTA)
                logits = model(to_float(x, mean, std, dev)).float().cpu()
            probs = torch.softmax(logits / self.temperature, dim=1)
            cls = torch.full((len(x),), tgt) if tgt is not None else probs.argmax(dim=1)
            for i in range(len(x)):
                c = int(cls[i])
                title = f"{self.classes[c]} {float(probs[i, c]):.1%}  ({method.replace('_', ' ')})"
                atomic_write_bytes(Path(out_dir) / f"{i}.{method}.png", side_by_side_png(x[i], maps[i], title))
        return maps

    def _dataset(self, data: Any, data_dir: str | Path | None) -> Dataset | None:
        """The data a method was given (arrays, torch datasets, a Dataset, or a dataset name / folder path), else
        the data the run was trained on in this session; None: the run's own data, found by `data_dir`."""
        if isinstance(data, (str, Path)):
            from cifarlab.data import load_dataset

            return load_dataset(str(data), Path(data_dir) if data_dir else None)
        return as_dataset(data) if data is not None else self.dataset

    @_method(data_arg=True)
    def evaluate(self, split: str = "test", data: Any = None, data_dir: str | Path | None = None) -> EvalResult:
        """Evaluate on the run's test split (or `split="val"`, its reproduced validation split). `data`: the data
        the run was trained on (needed for a run trained on in-memory data in another session), else it is found
        by `data_dir` as `cifarlab evaluate` finds it."""
        ds = self._dataset(data, data_dir)
        if ds is None:
            ds = load_run_dataset(self.run, Path(data_dir) if data_dir else None)
        ev, _ = evaluate_run(self.path, split=split, dataset=ds)
        return ev

    @_method(data_arg=True)
    def calibrate(self, data_dir: str | Path | None = None, off: bool = False, *, data: Any = None) -> float:
        """Fit (again) the run's softmax temperature on its own images (`cifarlab calibrate`), or with `off`
        remove it; returns the temperature `predict` now applies. `data`: the data the run was trained on, as
        `evaluate` takes it."""
        ds = self._dataset(data, data_dir) if not off else None
        calibrate_run(self.path, dataset=ds, data_dir=Path(data_dir) if data_dir else None, off=off)
        self.run = load_run(self.path)  # Run caches what it read: the temperature, metrics.json
        return self.temperature

    @_method(data_arg=True)
    def report(self, data_dir: str | Path | None = None, *, data: Any = None) -> Path:
        """(Re)write report.html / report.md; returns the HTML path. `data`: as `evaluate` takes it."""
        ds = self._dataset(data, data_dir)
        build_report(self.path, data_dir=Path(data_dir) if data_dir else None, dataset=ds)
        return self.path / "report.html"

    @_method()
    def export(self, fmt: str = "onnx", out: str | Path | None = None, tta: str = "recipe") -> Path:
        """The model as ONNX or TorchScript, preprocessing and the recipe's TTA inside (`tta="none"`: bare)."""
        return export_run(self.path, fmt, out, tta=tta)
