"""The Python API: train a recipe on CIFAR-10 or your own data, with your own model and callbacks, and get a
run back to evaluate, predict with, report on and export. `docs/API.md` shows it in use.

    import cifarlab
    run = cifarlab.fit("fast", data_dir="../shared/data")
    run = cifarlab.fit("reference", data=(x_train, y_train, x_test, y_test), model=MyNet(), epochs=5)
    run.test_accuracy, run.predict(images), run.evaluate(), run.report(), run.export("onnx")
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from cifarlab.errors import ConfigError, UserError
from cifarlab.evaluate import EvalResult, evaluate_run, load_run_dataset
from cifarlab.experiment import run_experiment
from cifarlab.export import export as export_run
from cifarlab.files import read_json
from cifarlab.inference import predict_proba, recipe_options
from cifarlab.predict import predict_paths
from cifarlab.recipes import Recipe, get_recipe, validate
from cifarlab.registry import MODELS
from cifarlab.report import build_report
from cifarlab.runs import STATUS, WEIGHTS, Run, load_run, load_weights
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


def _register_user_model(model: nn.Module) -> str:
    """A model instance gets a registry entry for this process, so the run it trains can be loaded again.

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

    _USER_MODELS[name] = shapes
    MODELS.register(name, description=f"user model {type(model).__qualname__}", replace=True)(build)
    return name


def _check_callbacks(callbacks: Any) -> list[Callback]:
    """`callbacks` as a list of Callback instances, else one line saying what to pass (before any work)."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback) or not isinstance(callbacks, (list, tuple)):
        raise UserError(f"callbacks: pass a list of cifarlab.Callback instances, not a {type(callbacks).__name__}")
    for cb in callbacks:
        if not isinstance(cb, Callback):
            hint = " (a class: call it, MyCallback())" if isinstance(cb, type) else ""
            raise UserError(f"callbacks: {cb!r} is not a cifarlab.Callback instance{hint}")
        order = getattr(cb, "order", 0)
        if not isinstance(order, (int, float)) or isinstance(order, bool) or order != order:
            raise UserError(
                f"callbacks: {type(cb).__name__}.order must be a number (callbacks run by it), not {order!r}"
            )
    return list(callbacks)


def fit(
    recipe: str | Recipe = "fast",
    data: Any = None,
    *,
    classes: Sequence[str] | None = None,
    model: str | nn.Module | None = None,
    callbacks: Sequence[Callback] = (),
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
    (N, C, H, W) and returns logits). `data`: see `as_dataset`; None trains on the recipe's dataset, found in
    `data_dir` (default $CIFARLAB_DATA, else ~/.cache/cifarlab, downloading CIFAR-10 when online). `init`: a run
    folder, a .safetensors file or a PyTorch state-dict file to fine-tune from (see `cifarlab.finetune`). `budget`:
    seconds or a duration ("90s", "2m") from this call to the test accuracy, as `cifarlab train --budget`. A recipe
    named by a string with a `cpu_fp32_variant` trains that variant where it would run in fp32 on a CPU (no
    built-in recipe names one: `fast` serves both kinds of CPU), unless a budget or your own nn.Module is given;
    pass `cpu_fp32_variant=""` to keep it."""
    clock = Clock.from_now("the fit() call")  # before any work: the budget covers data loading and the probe
    callbacks = _check_callbacks(callbacks)
    seconds = parse_duration(budget, "budget=") if budget is not None else None
    base = get_recipe(recipe) if isinstance(recipe, str) else recipe
    if isinstance(data, (str, Path)):
        overrides = {"dataset": str(data), **overrides}
    if isinstance(model, str):
        overrides = {"model": model, **overrides}
    r = apply_overrides(base, list(overrides.items()), source="fit()")
    own_model = isinstance(model, nn.Module)
    variant = machine_variant(r, device) if isinstance(recipe, str) and seconds is None and not own_model else None
    if variant is not None:  # as `cifarlab train`: fast on a CPU without bf16 trains its fp32 variant
        r = apply_overrides(get_recipe(variant), list(overrides.items()), source="fit()")
    module = None
    if isinstance(model, nn.Module):
        module = model
        r = r.replace(model=_register_user_model(model))
    elif model is not None and not isinstance(model, str):
        raise ConfigError(f"model: pass a registered model name or an nn.Module, not a {type(model).__name__}")
    if classes is not None and (data is None or isinstance(data, (str, Path, Dataset))):
        # A named dataset, an image folder or a Dataset already has its class names: `classes` would be ignored.
        raise UserError("classes= names the classes of arrays or torch datasets; this data already has its own")
    ds = as_dataset(data, classes)
    if ds is not None and r.dataset in NAMED_DATASETS:
        r = r.replace(dataset=ds.name if ds.name not in NAMED_DATASETS else r.dataset)
    r = validate(r, check_paths=ds is None)
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
                callbacks=callbacks,
                command="cifarlab.fit(...)",
                mlflow=mlflow,
                init=Path(init) if init is not None else None,
                budget=seconds,
                budget_clock=clock,
            )
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.backends.cudnn.benchmark = was_benchmark
    if result.status != "finished":
        raise UserError(f"training did not finish ({result.status}): {result.metrics.get('message', '')}")
    return TrainedRun(load_run(result.run_dir), dataset=ds, model=module)


def load(run_dir: str | Path) -> TrainedRun:
    """A saved run folder as a `TrainedRun` (its model must be registered in this process)."""
    return TrainedRun(load_run(run_dir))


@dataclass
class TrainedRun:
    """A finished run: its folder, recipe, history and metrics, and the trained model (loaded on first use)."""

    run: Run
    dataset: Dataset | None = None
    model: nn.Module | None = None

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

    def get_model(self) -> nn.Module:
        """The trained model in eval mode, from `model.safetensors`."""
        if self.model is None:
            self.model = self.run.build_model()
        else:
            load_weights(self.model, self.run.path / WEIGHTS)
        return self.model.eval()

    def predict(self, images: Any, *, device: str | None = None) -> torch.Tensor | list[dict[str, Any]]:
        """Class probabilities. `images`: uint8 (or [0, 1] float) arrays/tensors, NCHW or NHWC, of the run's
        input size -> an (N, classes) tensor; or file/folder paths -> one dict per file (top-5 classes)."""
        if isinstance(images, Iterable) and not isinstance(images, (str, Path, np.ndarray, torch.Tensor)):
            images = list(images)  # a generator can be looked at only once
        if isinstance(images, (str, Path)) or (
            isinstance(images, list) and images and all(isinstance(p, (str, Path)) for p in images)
        ):
            paths = [images] if isinstance(images, (str, Path)) else images
            return predict_paths(self.path, paths, top_k=min(5, len(self.classes)), device=device)
        single = getattr(images, "ndim", None) == 3  # (C, H, W) or (H, W, C): read as a batch of 2-D images
        x = as_images(images)
        if tuple(x.shape[1:]) != self.run.input_shape:
            one = " (one image? add a batch dimension: images[None])" if single else ""
            raise UserError(f"images are {tuple(x.shape[1:])} (C, H, W); this model takes {self.run.input_shape}{one}")
        if len(x) == 0:
            return torch.zeros(0, len(self.classes))
        model = self.get_model()
        mean, std = self.run.normalization
        dev = resolve_device(device) if device else None
        opts = recipe_options(self.recipe)
        return predict_proba(model, x, mean=mean, std=std, device=dev, temperature=self.temperature, **opts)

    def evaluate(self, split: str = "test", data: Any = None, data_dir: str | Path | None = None) -> EvalResult:
        ds = as_dataset(data) if data is not None else self.dataset
        if ds is None:
            ds = load_run_dataset(self.run, Path(data_dir) if data_dir else None)
        ev, _ = evaluate_run(self.path, split=split, dataset=ds)
        return ev

    def calibrate(self, data_dir: str | Path | None = None, off: bool = False) -> float:
        """Fit (again) the run's softmax temperature on its own images (`cifarlab calibrate`), or with `off`
        remove it; returns the temperature `predict` now applies."""
        calibrate_run(self.path, dataset=self.dataset, data_dir=Path(data_dir) if data_dir else None, off=off)
        self.run = load_run(self.path)  # Run caches what it read: the temperature, metrics.json
        return self.temperature

    def report(self, data_dir: str | Path | None = None) -> Path:
        """(Re)write report.html / report.md; returns the HTML path."""
        build_report(self.path, data_dir=Path(data_dir) if data_dir else None, dataset=self.dataset)
        return self.path / "report.html"

    def export(self, fmt: str = "onnx", out: str | Path | None = None) -> Path:
        return export_run(self.path, fmt, out)
