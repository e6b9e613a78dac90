"""One training run end to end, as a few named steps that the CLI and the Python API both call:

    plan = prepare(recipe, ...)            device, data, split, checks, model: everything that can fail early
    open_run(plan, ...)                    the run folder (new or resumed), its lock and config.json
    fit, clock = train(plan, callbacks)    the loop, with the run's callbacks (checkpoint, history, progress, ...)
    result = finish(plan, fit, clock, say) test evaluation, model.safetensors, metrics.json, Table 1
    write_report(plan, result, say)        report.html / report.md (a failure here never un-finishes the run)

`run_experiment` runs them in order. No run file is written before `prepare` has passed (it may fill the data
cache): a bad value, a device that cannot run the precision, a batch larger than the training set or a model
too large for memory is an error before any run folder exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch
import torch.nn.functional as F
from torch import nn

from cifarlab import __version__
from cifarlab.augment import make_augment
from cifarlab.budget import PROCESS_START, BudgetPlan, Clock, TimeBudget, plan_budget, process_age, usable_seconds
from cifarlab.calibrate import at_bound, fit_on_split
from cifarlab.data import BatchLoader, Dataset, channel_stats, default_data_dir, load_dataset, recipe_split
from cifarlab.device import check_precision, precision_reason, resolve_device, set_threads, without_cudnn_timing
from cifarlab.distributed import Distributed, peer_ended, peer_lost, said_in_one_line, threads_per_process
from cifarlab.errors import RunError, UserError
from cifarlab.files import remove_leftover_temps
from cifarlab.finetune import (
    InitResult,
    apply_freeze,
    apply_init,
    check_init_args,
    check_needs_init,
    read_init_source,
)
from cifarlab.inference import predict_logits, recipe_options, to_float
from cifarlab.models import build_model
from cifarlab.recipes import Recipe
from cifarlab.runs import (
    CHECKPOINT,
    CONFIG,
    HISTORY_CSV,
    HISTORY_JSON,
    METRICS,
    STATUS,
    TEMPERATURE,
    WEIGHTS,
    RunLock,
    check_plugins_loaded,
    load_checkpoint,
    load_run,
    machine_info,
    new_run_dir,
    read_json,
    recorded_plugins,
    resume_command,
    save_weights,
    start_again,
    write_history,
    write_json,
    write_status,
)
from cifarlab.text import plural, stages_frozen
from cifarlab.train import (
    Callback,
    Checkpoint,
    EpochLog,
    FitResult,
    MLflowLogger,
    ProgressBar,
    StepLog,
    TensorBoardLogger,
    Trainer,
    format_history_table,
    recipe_callbacks,
)
from cifarlab.train.optim import build_optimizer, mark_pretrained

__all__ = ["Plan", "RunResult", "finish", "open_run", "prepare", "run_experiment", "train", "write_report"]

Log = Callable[[str], None]


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    status: str
    logits: torch.Tensor | None = None  # test logits, kept for the report


@dataclass
class Plan:
    """Everything a run needs, resolved and checked before anything is written."""

    recipe: Recipe
    dataset: Dataset
    device: torch.device
    threads: int
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    model: nn.Module
    data_dir: Path | None
    deterministic: bool
    resume_state: dict[str, Any] | None = None
    init: InitResult | None = None  # what --init loaded (None without it, and on resume)
    run_dir: Path | None = None
    lock: RunLock | None = None
    config: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    t_start: float = field(default_factory=time.perf_counter)
    budget: BudgetPlan | None = None  # what --budget chose (widths, epochs, TTA) and its deadline
    dist: Distributed | None = None  # under torchrun with more than one process (`cifarlab.distributed`)
    # The recipe's augmentation and callbacks, built once by `check_pieces` before the run folder exists (a
    # registered factory is called once per run, as a user writing one expects); None: built where used.
    augment: Any = None
    recipe_callbacks: list[Callback] | None = None
    # How to continue this run when it stops, if not `cifarlab train --resume` (a tune study's final run: the tune
    # command, which resumes the study and the run)
    resume_with: str | None = None
    # The plugins the command loaded (`plugins.command_plugins`), recorded in config.json for the resume command
    plugins: list[str] = field(default_factory=list)
    # A finished run resumed to write its lost or damaged model.safetensors again: the softmax temperature block
    # its metrics.json recorded (None: the plain softmax, kept), when `keep_calibration`; when the earlier one
    # cannot be read, `calibration_lost` (the recipe's own choice applies, and a warning says so).
    keep_calibration: bool = False
    kept_calibration: dict[str, Any] | None = None
    calibration_lost: bool = False
    # Set by `finish` once metrics.json says "finished": training, calibration and the test are done, so a Ctrl-C
    # from then on (in the report, say) leaves the run finished, not stopped.
    trained: bool = False

    @property
    def has_val(self) -> bool:
        return len(self.val_idx) > 0

    def resume_line(self) -> str:
        """ "resume with: ..." for a stopped run: the command that continues it."""
        assert self.run_dir is not None
        config = self.config or {}
        how = self.resume_with or resume_command(self.run_dir, config.get("distributed"), recorded_plugins(config))
        return f"resume with: {how}"


def versions() -> dict[str, str]:
    return {
        "cifarlab": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def split_digest(train_idx: torch.Tensor, val_idx: torch.Tensor) -> str:
    """A short fingerprint of the split, so a resume can tell it trains on the same images."""
    h = hashlib.md5(train_idx.numpy().astype("int64").tobytes())
    h.update(val_idx.numpy().astype("int64").tobytes())
    return h.hexdigest()[:16]


def _available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits_memory(
    recipe: Recipe, num_classes: int, input_shape: tuple[int, int, int], device: torch.device
) -> None:
    """Count the model's parameters without allocating them; refuse one whose weights, gradients and optimizer
    state alone exceed the memory available."""
    try:
        with torch.device("meta"):
            meta = build_model(recipe, num_classes, input_shape)
    except Exception:  # a model that cannot be built on the meta device is checked when it is really built
        return
    n = sum(p.numel() for p in meta.parameters())
    need = n * 4 * 4  # fp32 weights, gradients and two optimizer moments
    have = _available_memory(device)
    if have is not None and need > have:
        raise UserError(
            f"the model has {n:,} parameters: training it needs at least {need / 2**30:.1f} GiB for weights, "
            f"gradients and optimizer state, but {device} has {have / 2**30:.1f} GiB free; use smaller widths"
        )


def _check_fits_data(recipe: Recipe, n_train: int, input_shape: tuple[int, int, int], world: int = 1) -> None:
    if recipe.batch_size % world:
        counts = [k for k in range(2, min(recipe.batch_size, 64) + 1) if recipe.batch_size % k == 0][:6]
        fits = f"; or start {', '.join(map(str, counts))} processes" if counts else ""
        raise UserError(
            f"batch_size={recipe.batch_size} is not a multiple of the {world} processes: each process takes an "
            f"equal slice of every global batch; use a batch_size divisible by {world} (--set batch_size=..., "
            f"not with --resume, which keeps the run's){fits}"
        )
    steps = n_train // recipe.batch_size if recipe.drop_last else -(-n_train // recipe.batch_size)
    if steps == 0:
        raise UserError(
            f"batch_size={recipe.batch_size} is larger than the {n_train:,} training images and drop_last is on: "
            "not one training step would run; lower batch_size"
        )
    _, h, w = input_shape
    if recipe.augment == "flip_translate" and recipe.translate_pad > min(h, w) - 1:
        raise UserError(f"translate_pad={recipe.translate_pad} must be smaller than the {h}x{w} images")


def _check_same_recipe(run_dir: Path, trained: Any, recipe: Recipe) -> None:
    """Refuse to resume when config.json's recipe is not the one the checkpoint's epochs trained with (an edited
    file): the run would go on under another schedule or callbacks, its saved state partly dropped, and no
    longer be what config.json says. A checkpoint of an older cifarlab records no recipe: nothing to compare."""
    if not isinstance(trained, dict):
        return
    now = json.loads(json.dumps(recipe.to_dict()))
    was = json.loads(json.dumps(trained))
    changed = [
        f"{k} ({was.get(k)!r} -> {now.get(k)!r})" for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)
    ]
    if changed:
        raise UserError(
            f"{run_dir}/{CONFIG}'s recipe is not the one its checkpoint trained with: {'; '.join(changed[:5])}"
            f"{' ...' if len(changed) > 5 else ''}. Put config.json back to resume, or start a new run with the new "
            "settings"
        )


def _unfit_checkpoint(run_dir: Path, e: Exception) -> UserError:
    # torch's message spans lines (one per mismatched tensor): joined, and cut, to stay one line
    why = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    why = why if len(why) <= 400 else why[:400] + " ..."
    return UserError(
        f"{run_dir}/{CHECKPOINT} does not fit this run ({why}); it cannot be resumed (was config.json edited?)"
    )


def _probe(net: nn.Module, c: int, h: int, w: int) -> Any:
    """The model's output for two black c x h x w images, in eval mode (no BatchNorm statistics change, no
    dropout draws) and without gradients; the model's mode is restored. On a GPU without cuDNN's timing: these
    2-image shapes never come back, and timing them cost each run's start-up a round of autotuning."""
    was_training = net.training
    device = next(net.parameters()).device
    net.eval()
    try:
        with torch.no_grad(), without_cudnn_timing(device):
            return net(torch.zeros(2, c, h, w, device=device))
    finally:
        net.train(was_training)


def _check_model(net: nn.Module, recipe: Recipe, ds: Dataset, n_train: int, world: int) -> None:
    """Before anything is written: one forward of two images in eval mode (no statistics change) must give
    (2, classes) logits, so a model of the wrong shape (your own nn.Module, say) fails here in one line, not after
    a folder exists or, silently, with logits for another number of classes. A BatchNorm1d cannot train on a last
    batch of one image: the batch size is refused then."""
    k = len(ds.classes)
    c, h, w = ds.input_shape
    if not any(p.requires_grad for p in net.parameters()):
        raise UserError(f"model {recipe.model!r} has no trainable parameters")
    try:
        out = _probe(net, c, h, w)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"model {recipe.model!r} cannot take {c}x{h}x{w} images: {why}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, k) or not out.is_floating_point():
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise UserError(
            f"model {recipe.model!r} returns {got} for 2 images; it must return float logits of shape (N, {k}), one "
            f"per class ({k} classes)"
        )
    if not any(isinstance(m, nn.BatchNorm1d) for m in net.modules()):
        return
    if recipe.batch_size // world <= 1:  # every batch holds one image (per process)
        raise UserError(
            f"batch_size={recipe.batch_size}"
            + (f" over {world} processes" if world > 1 else "")
            + " trains on one image at a time; the model's BatchNorm1d cannot train on one image. "
            "Use a batch_size of at least 2" + (f" per process ({2 * world})" if world > 1 else "")
        )
    last = n_train % recipe.batch_size if not recipe.drop_last else 0
    smallest = (last // world if last >= world else 1) if last else 0
    if smallest == 1:
        raise UserError(
            f"batch_size={recipe.batch_size} leaves a last batch of {last} of the {n_train:,} training images"
            + (f" ({world} processes: 1 image for one of them)" if world > 1 else "")
            + "; the model's BatchNorm1d cannot train on one image. Use another batch_size, or drop_last=true"
        )


def _check_takes_train_scales(net: nn.Module, recipe: Recipe, input_shape: tuple[int, int, int]) -> None:
    """With progressive resizing, the model must take the smallest training images: one forward, in eval mode
    (no BatchNorm statistics change), before anything is written."""
    if not recipe.train_scales or min(recipe.train_scales) == 1:
        return
    c, h, w = input_shape
    s = min(recipe.train_scales)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    try:
        _probe(net, c, *size)
    except RuntimeError as e:
        raise UserError(
            f"model {recipe.model!r} cannot train on {size[0]}x{size[1]} images "
            f"(train_scales={list(recipe.train_scales)} of {h}x{w}): {str(e).splitlines()[0]}. Use larger scales, "
            "a model with global pooling (airnet, preact_resnet18, wrn, efficientnet_b0), or full size throughout: "
            "--set train_scales= (cifarlab.fit: train_scales=())"
        ) from None


def prepare(
    recipe: Recipe | None = None,
    *,
    dataset: Dataset | None = None,
    data_dir: Path | str | None = None,
    device: str | None = None,
    deterministic: bool = False,
    resume: Path | str | None = None,
    model: nn.Module | None = None,
    init: Path | str | None = None,
    dist: Distributed | None = None,
) -> Plan:
    """Resolve and check everything, load the data and build the model. Writes nothing.

    `init`: a run folder or weights file to start from (`cifarlab.finetune`); read before the data, so a bad
    source fails fast. `dist`: this process's place under torchrun (every rank prepares the same plan; the device
    is its `cuda:LOCAL_RANK` or the CPU)."""
    t0 = time.perf_counter()
    check_init_args(init, resume)
    if init is None and resume is None and model is None and recipe is not None:
        check_needs_init(recipe)  # nothing pretrained to freeze or scale (a model of your own may be)
    init_source = read_init_source(init) if init is not None else None
    resume_state = None
    saved: dict[str, Any] = {}
    if resume is not None:
        check_plugins_loaded(resume)  # before load_run, whose error for unregistered pieces names no command
        run = load_run(resume)
        saved, recipe = run.config, run.recipe
        resume_state = load_checkpoint(Path(resume) / CHECKPOINT)
        _check_same_recipe(Path(resume), resume_state.get("recipe"), recipe)
        if data_dir is None and saved.get("data_dir"):
            data_dir = saved["data_dir"]
        deterministic = deterministic or bool(saved.get("deterministic"))
        if dist is not None and (saved.get("distributed") or {}).get("sync_bn"):
            dist.sync_bn = True  # the run trained with SyncBatchNorm: it goes on with it
    if recipe is None:
        raise ValueError("prepare needs a recipe or a run folder to resume")
    dev = resolve_device(device) if dist is None else dist.device
    check_precision(recipe.precision, dev)
    if dist is None:
        threads = set_threads() if dev.type == "cpu" else torch.get_num_threads()
    else:  # the processes on this machine share its cores
        threads = set_threads(threads_per_process(dist.local_world)) if dev.type == "cpu" else torch.get_num_threads()
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if dev.type == "cuda":
        # cuDNN times the algorithms for each new convolution shape once and keeps the fastest (a run's shapes are
        # fixed, as airbench relies on); a deterministic run keeps one fixed choice instead. The timing costs
        # ~0.8 s per set of shapes on an H200 (RESULTS.md): `cudnn_benchmark=false` uses cuDNN's heuristics.
        torch.backends.cudnn.benchmark = recipe.cudnn_benchmark and not deterministic

    if dataset is not None:
        ds = dataset
    else:
        # Under torchrun process 0 downloads, decodes and caches the data first and the others then read its cache:
        # not every process downloading into one folder at once, and a data error said once, by process 0.
        with dist.main_first() if dist is not None else contextlib.nullcontext():
            ds = load_dataset(recipe.dataset, data_dir)
    tr_idx, va_idx = recipe_split(recipe, ds.y_train, ds.classes)  # a class left untrained is an error
    mean = std = None
    if recipe.scaling == "standardize":
        mean, std = channel_stats(ds.x_train[tr_idx])
    if resume is not None:
        _check_same_data(Path(resume), saved, ds, tr_idx, va_idx)
    _check_fits_data(recipe, len(tr_idx), ds.input_shape, dist.world if dist is not None else 1)
    if model is None:
        check_fits_memory(recipe, len(ds.classes), ds.input_shape, dev)
    data_seconds = time.perf_counter() - t0

    t_start, t0 = t0, time.perf_counter()
    net = ready_model(recipe, ds, dev, model=model, data_init=(tr_idx, mean, std) if resume_state is None else None)
    # After the data-dependent init, so loaded layers (the airnet's whitening) keep their pretrained weights and
    # only the layers left fresh get the data's.
    init_result = None
    if init_source is not None:
        init_result = apply_init(
            net, init_source, classes=ds.classes, input_shape=ds.input_shape, recipe=recipe if model is None else None
        )
    elif resume is not None and isinstance(saved.get("init"), dict):
        mark_pretrained(net, saved["init"].get("pretrained") or [])  # the same optimizer param groups as before
    apply_freeze(net, recipe.freeze_stages, recipe.model)
    if resume_state is not None:  # before anything is written: a refused resume leaves the run's status as it was
        try:
            net.load_state_dict(resume_state["model"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise _unfit_checkpoint(Path(str(resume)), e) from None
    _check_model(net, recipe, ds, len(tr_idx), dist.world if dist is not None else 1)
    _check_takes_train_scales(net, recipe, ds.input_shape)
    if dist is not None and dist.sync_bn:
        net = dist.convert_sync_bn(net)
    return Plan(
        recipe=recipe,
        dataset=ds,
        device=dev,
        threads=threads,
        train_idx=tr_idx,
        val_idx=va_idx,
        mean=mean,
        std=std,
        model=net,
        data_dir=Path(data_dir) if data_dir is not None else None,
        deterministic=deterministic,
        resume_state=resume_state,
        init=init_result,
        run_dir=Path(resume) if resume is not None else None,
        timings={"data_seconds": data_seconds, "setup_seconds": time.perf_counter() - t0},
        dist=dist,
        t_start=t_start,  # the command's total counts the data loading and setup above, as the report lists them
    )


def _check_same_data(run_dir: Path, saved: dict[str, Any], ds: Dataset, tr: torch.Tensor, va: torch.Tensor) -> None:
    """A resume must train on the images the run started with: same dataset checksum, classes and split."""
    want = saved.get("dataset") or {}
    diffs = []
    # An empty stored checksum is unknown (image-folder runs from before folder checksums): the split still counts.
    if want.get("checksum") and want["checksum"] != ds.checksum:
        diffs.append(f"dataset checksum {ds.checksum or '(none)'} here, {want.get('checksum') or '(none)'} in the run")
    if list(want.get("classes") or []) != list(ds.classes):
        diffs.append("different classes")
    if (want.get("n_train"), want.get("n_val")) != (len(tr), len(va)):
        diffs.append(f"split {len(tr)}/{len(va)} here, {want.get('n_train')}/{want.get('n_val')} in the run")
    elif want.get("split_digest") and want["split_digest"] != split_digest(tr, va):
        diffs.append("a different train/validation split")
    if diffs:
        raise UserError(
            f"cannot resume {run_dir} on this data: " + "; ".join(diffs) + f". It was trained on {want.get('source')}; "
            "pass that with --data-dir"
        )


def _config(plan: Plan, command: str | None, model_given: bool) -> dict[str, Any]:
    ds, r = plan.dataset, plan.recipe
    return {
        "recipe": r.to_dict(),
        "seed": r.seed,
        "dataset": {
            "name": ds.name,
            "classes": list(ds.classes),
            "source": str(ds.source),
            "checksum": ds.checksum,
            "input_shape": list(ds.input_shape),
            "n_train": len(plan.train_idx),
            "n_val": len(plan.val_idx),
            "n_test": len(ds.y_test),
            "split": {"val_fraction": r.val_fraction, "seed": r.seed, "stratified": r.stratified_split},
            "split_digest": split_digest(plan.train_idx, plan.val_idx),
        },
        "normalization": {
            "mean": list(plan.mean) if plan.mean else None,
            "std": list(plan.std) if plan.std else None,
        },
        "model_class": f"{type(plan.model).__module__}.{type(plan.model).__qualname__}" if model_given else None,
        "machine": machine_info(plan.device),
        "precision": precision_reason(r.precision, plan.device),
        "versions": versions(),
        "command": command or " ".join(sys.argv),
        "plugins": list(plan.plugins),
        "data_dir": str((plan.data_dir or default_data_dir()).resolve()),
        "deterministic": plan.deterministic,
        "budget": plan.budget.to_dict() if plan.budget is not None else None,
        "init": plan.init.to_dict() if plan.init is not None else None,
        "distributed": plan.dist.describe() if plan.dist is not None else None,
    }


def open_run(
    plan: Plan,
    runs_root: Path | str = "runs",
    *,
    command: str | None = None,
    model_given: bool = False,
    report: bool = True,
) -> Path:
    """Create the run folder (or take the resumed one), lock it against a second trainer, write config.json.

    Under torchrun rank 0 alone does this and sends the folder's path to the other ranks, which write nothing.
    First every rank waits until all have prepared: a rank that failed alone in `prepare` (its data, a plugin's
    model) leaves no run folder (a resumed one keeps its status), and the others end with one line saying that
    another process ended, not gloo's traceback."""
    if plan.dist is not None:
        with said_in_one_line("before the run started"):
            plan.dist.barrier()
        if not plan.dist.is_main:
            with said_in_one_line("before the run started"):
                plan.run_dir = Path(plan.dist.broadcast_object(None))
            return plan.run_dir
    if plan.run_dir is None:
        plan.run_dir = new_run_dir(runs_root, plan.recipe.name)
        plan.lock = RunLock(plan.run_dir).acquire()
        # `report`: whether the run ends with one (--no-report), kept so that --resume keeps the choice too
        plan.config = {**_config(plan, command, model_given), "report": report}
        write_json(plan.run_dir / CONFIG, plan.config)
    else:
        plan.lock = RunLock(plan.run_dir).acquire()
        plan.config = read_json(plan.run_dir / CONFIG)
        _remove_killed_writes(plan.run_dir)
    write_status(plan.run_dir, "running")
    if plan.dist is not None:
        try:
            plan.dist.broadcast_object(str(plan.run_dir))
        except Exception as e:
            # Another process ended between the agreement above and here (killed): the folder is marked crashed,
            # as a run that failed later is, and its lock let go; `cifarlab runs` lists it so.
            lost = peer_lost(e)
            why = peer_ended(e, "as the run started") if lost else f"{type(e).__name__}: {e}"
            _status_if_possible(plan.run_dir, "crashed", message=why)
            plan.lock.release()
            if not lost:
                raise
            if (plan.run_dir / CHECKPOINT).exists():
                why += f"; the run's last checkpoint stands: {plan.resume_line()}"
            raise RunError(why) from None
    return plan.run_dir


# Files only the training process writes, each epoch: a temp file of one (`files.atomic_write`) left in the folder
# is from a process killed mid-write, since the resuming process holds the run's lock.
_TRAINING_FILES = (CHECKPOINT, HISTORY_JSON, HISTORY_CSV, "steps.csv")


def _remove_killed_writes(run_dir: Path) -> None:
    """Delete the temp files a SIGKILL during a checkpoint write left behind (one checkpoint's size each)."""
    for name in _TRAINING_FILES:
        remove_leftover_temps(run_dir / name)


class SessionClock(Callback):
    """Wall seconds of each training session (a resumed run has several), checkpointed with the run."""

    order = 99
    state_required = False

    def __init__(self) -> None:
        self.earlier: list[float] = []
        self.t0 = time.perf_counter()

    def seconds(self) -> list[float]:
        return [*self.earlier, time.perf_counter() - self.t0]

    def state_dict(self) -> dict[str, Any]:
        return {"sessions": self.seconds()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.earlier = [float(s) for s in state.get("sessions", [])]


def check_pieces(plan: Plan) -> None:
    """Build the recipe's augmentation, optimizer and callbacks before the run folder exists: a registered factory
    that returns the wrong thing (a plugin's) is then one error and no crashed folder. The augmentation and the
    callbacks are kept for the run; the trainer builds the optimizer it steps (building one has no effect on the
    model)."""
    plan.augment = make_augment(plan.recipe)
    build_optimizer(plan.model, plan.recipe)  # (the trainer builds the one it steps)
    plan.recipe_callbacks = recipe_callbacks(plan.recipe, plan.has_val)


def loaders(plan: Plan) -> tuple[BatchLoader, BatchLoader | None]:
    r, ds = plan.recipe, plan.dataset
    common: dict[str, Any] = dict(mean=plan.mean, std=plan.std, channels_last=r.channels_last, device=plan.device)
    x_tr, y_tr = ds.x_train[plan.train_idx], ds.y_train[plan.train_idx]
    # Under torchrun each rank takes its slice of every global batch (the same batches one process would draw).
    rank, world = (plan.dist.rank, plan.dist.world) if plan.dist is not None else (0, 1)
    train_loader = BatchLoader(
        x_tr,
        y_tr,
        r.batch_size,
        shuffle=True,
        drop_last=r.drop_last,
        seed=r.seed,
        transform=plan.augment if plan.augment is not None else make_augment(r),
        rank=rank,
        world=world,
        scales=r.train_scales,
        **common,
    )
    val_loader = None
    if plan.has_val:
        x_va, y_va = ds.x_train[plan.val_idx], ds.y_train[plan.val_idx]
        val_loader = BatchLoader(x_va, y_va, r.eval_batch_size, **common)
    return train_loader, val_loader


def ready_model(
    recipe: Recipe,
    ds: Dataset,
    device: torch.device,
    *,
    model: nn.Module | None = None,
    data_init: tuple[torch.Tensor, Any, Any] | None = None,
) -> nn.Module:
    """The recipe's model (or the given one) seeded, on `device` in the recipe's memory format; with
    `data_init=(train_idx, mean, std)` also its data-dependent init (the airnet's patch whitening)."""
    torch.manual_seed(recipe.seed)
    net = model if model is not None else build_model(recipe, len(ds.classes), ds.input_shape)
    fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
    net = net.to(device).to(memory_format=fmt)  # type: ignore[call-overload]  # missing in torch's stubs
    init_from_data = getattr(net, "init_from_data", None)
    if data_init is not None and recipe.whiten_init and callable(init_from_data):
        tr_idx, mean, std = data_init
        g = torch.Generator().manual_seed(recipe.seed)
        pick = tr_idx[torch.randperm(len(tr_idx), generator=g)[:5000]]
        init_from_data(to_float(ds.x_train[pick], mean, std, device))
    return net


def fit_budget(plan: Plan, seconds: float, model_given: bool = False, clock: Clock = PROCESS_START) -> BudgetPlan:
    """`--budget`: probe this machine, then change the plan's recipe (widths, epochs, TTA) and model so the run
    ends, test accuracy included, `seconds` after the clock's origin (the process's start; `cifarlab.budget`)."""
    if plan.resume_state is not None:
        raise UserError("--budget cannot be combined with --resume: the resumed run keeps its own schedule")
    if plan.dist is not None:
        raise UserError(
            "--budget cannot run under torchrun: each process would time its own probe and stop at its own moment; "
            "set epochs instead"
        )
    if model_given or plan.init is not None:
        raise UserError(
            "--budget chooses the model's width, so it cannot be combined with a given model or --init; "
            "set epochs instead"
        )

    def build(r: Recipe) -> nn.Module:  # for the probe: timing needs no data-dependent init
        return ready_model(r, plan.dataset, plan.device)

    def train_loader(r: Recipe) -> BatchLoader:
        return loaders(dataclasses.replace(plan, recipe=r))[0]

    spe = len(train_loader(plan.recipe))
    recipe, budget = plan_budget(
        plan.recipe,
        seconds,
        build=build,
        loader=train_loader,
        # one whole evaluation batch: a smaller one stays in the CPU's cache and under-predicts evaluation
        x_eval=plan.dataset.x_test[: min(len(plan.dataset.x_test), plan.recipe.eval_batch_size)],
        n_test=len(plan.dataset.y_test),
        n_val=len(plan.val_idx),
        steps_per_epoch=spe,
        device=plan.device,
        clock=clock,
    )
    plan.recipe = recipe
    plan.model = ready_model(recipe, plan.dataset, plan.device, data_init=(plan.train_idx, plan.mean, plan.std))
    plan.budget = budget
    return budget


def run_callbacks(
    plan: Plan,
    *,
    log: Log | None,
    progress: bool,
    tensorboard: bool = False,
    mlflow: bool | str = False,
    quiet: bool = False,
) -> list[Callback]:
    """The run's own machinery as callbacks: checkpoint + history files, progress, trackers (`quiet`: their own
    informational lines too are not shown)."""
    assert plan.run_dir is not None
    cbs: list[Callback] = [Checkpoint(plan.run_dir), StepLog(plan.run_dir)]
    if log is not None:
        cbs.append(ProgressBar() if progress else EpochLog(log, every_seconds=10.0))
        if progress:
            cbs.append(EpochLog(log))
    if tensorboard:
        cbs.append(TensorBoardLogger(plan.run_dir / "tensorboard"))
    if mlflow:
        cbs.append(MLflowLogger(plan.run_dir, tracking_uri=mlflow if isinstance(mlflow, str) else None, quiet=quiet))
    return cbs


def train(plan: Plan, callbacks: Sequence[Callback] = ()) -> tuple[FitResult, SessionClock]:
    """Run the loop with the recipe's callbacks, the given ones, and a session clock."""
    train_loader, val_loader = loaders(plan)
    clock = SessionClock()
    own = plan.recipe_callbacks
    cbs = [*(own if own is not None else recipe_callbacks(plan.recipe, val_loader is not None)), *callbacks, clock]
    if plan.budget is not None:  # training ends when the time left is what the test evaluation needs
        b = plan.budget
        deadline = usable_seconds(b.budget_seconds) - b.predicted_eval_seconds
        cbs.append(TimeBudget(deadline, plan.device, clock=b.clock, epoch_costs=b.epoch_costs))
    elif plan.resume_state is not None and isinstance(saved_budget := (plan.config or {}).get("budget"), dict):
        # A --budget run resumed: the deadline and the schedule's length come from its checkpoint (TimeBudget's
        # state); without them (a checkpoint of an older cifarlab) the run trains the epochs it planned.
        costs = [float(c) for c in saved_budget.get("epoch_costs") or []]
        cbs.append(TimeBudget(math.inf, plan.device, epoch_costs=costs))
    trainer = Trainer(
        plan.model,
        plan.recipe,
        train_loader,
        val_loader,
        callbacks=cbs,
        device=plan.device,
        run_dir=plan.run_dir,
        dist=plan.dist,
    )
    if plan.resume_state is not None:
        try:
            trainer.load_state_dict(plan.resume_state)
        except (KeyError, ValueError, RuntimeError) as e:
            raise _unfit_checkpoint(Path(str(plan.run_dir)), e) from None
    return trainer.fit(), clock


def _status_if_possible(run_dir: Path, status: str, **extra: Any) -> None:
    """status.json on the way out of a failed run; when even that cannot be written (the disk that failed the run
    is full), the run's own error is the one to report, not this one."""
    try:
        write_status(run_dir, status, **extra)
    except OSError:
        pass


def finish(plan: Plan, fit: FitResult, clock: SessionClock, say: Log) -> RunResult:
    """Evaluate on the test set, save the weights and metrics.json, print Table 1. Under torchrun, on rank 0 only
    (the other ranks return the fit's status and write nothing)."""
    assert plan.run_dir is not None
    if plan.dist is not None and not plan.dist.is_main:
        return RunResult(plan.run_dir, {"status": fit.status, "message": fit.message}, fit.status)
    run_dir, r, ds = plan.run_dir, plan.recipe, plan.dataset
    write_history(run_dir, fit.history)
    sessions = clock.seconds()
    if fit.status != "finished":
        status = "stopped" if fit.status == "stopped" else "crashed"
        write_status(run_dir, status, message=fit.message)
        say(fit.message)
        if fit.status == "stopped" and (run_dir / CHECKPOINT).exists():
            say(plan.resume_line())
            # A stopped run's weights are the last whole epoch's, as its checkpoint holds them (the model in memory
            # may be mid-epoch; finite: the NaN guard checks before every checkpoint).
            plan.model.load_state_dict(load_checkpoint(run_dir / CHECKPOINT)["model"])
            save_weights(plan.model, run_dir / WEIGHTS)
        elif fit.status == "stopped":
            say(f"no epoch had finished, so there is nothing to resume: {start_again(run_dir)}")
        # A diverged run keeps whatever model file it had.
        return RunResult(run_dir, {"status": fit.status, "message": fit.message}, fit.status)

    if plan.keep_calibration:  # the temperature the run had (`cifarlab calibrate`'s, or none after --off)
        calibration = dict(plan.kept_calibration) if plan.kept_calibration is not None else None
    else:
        calibration = calibrate(plan) if r.calibrate else None  # before the test: a --budget counts it
    t0 = time.perf_counter()
    logits = predict_logits(
        plan.model, ds.x_test, mean=plan.mean, std=plan.std, device=plan.device, **recipe_options(r)
    )
    test_acc = int((logits.argmax(1) == ds.y_test).sum()) / len(ds.y_test)  # exact, not a float32 mean
    test_loss = F.cross_entropy(logits, ds.y_test).item()
    eval_seconds = time.perf_counter() - t0
    process_seconds = process_age()  # from the process's start (interpreter, imports, CUDA included) to here
    meta = {"recipe": r.name}
    if calibration is not None:
        meta[TEMPERATURE] = repr(calibration["temperature"])
        calibration["test_loss"] = F.cross_entropy(logits / calibration["temperature"], ds.y_test).item()
    save_weights(plan.model, run_dir / WEIGHTS, metadata=meta)
    # a kept temperature was fitted by an earlier process: none of this one's time
    fit_seconds = calibration.get("seconds", 0.0) if calibration is not None and not plan.keep_calibration else 0.0
    last = fit.history[-1] if fit.history else {}
    best_row = fit.history[fit.best_epoch - 1] if fit.best_epoch else last
    metrics = {
        "status": "finished",
        "recipe": r.name,
        "test_accuracy": test_acc,
        # at the softmax temperature, as predict, serve and the report give the probabilities; the plain one apart
        "test_loss": calibration["test_loss"] if calibration is not None else test_loss,
        "test_loss_uncalibrated": test_loss if calibration is not None else None,
        "tta": r.tta,
        "epochs_run": len(fit.history),
        "best_epoch": fit.best_epoch,
        "stopped_epoch": fit.stopped_epoch,
        "restored_epoch": fit.restored_epoch,
        "lr_drops_after_epochs": [row["epoch"] for row in fit.history if "lr_reduced" in row["events"]],
        "train_accuracy": last.get("accuracy"),
        "best_val_accuracy": best_row.get("val_accuracy"),
        "best_val_loss": best_row.get("val_loss"),
        "calibration": calibration,
        "training_step": fit.step_mode,
        "timings": {
            **plan.timings,
            "train_seconds": fit.train_seconds,
            "eval_seconds": eval_seconds,
            "calibration_seconds": fit_seconds,
            "total_seconds": time.perf_counter() - plan.t_start,
            "process_seconds": process_seconds,
            "seconds_per_epoch": fit.train_seconds / max(1, len(fit.history)),
            "session_seconds": sessions,
            "sessions_total_seconds": sum(sessions),
        },
    }
    if plan.budget is not None:  # the budget against the time taken: clock origin to the test result
        plan.budget.taken_seconds = plan.budget.clock.elapsed()
        metrics["budget"] = plan.budget.to_dict()
    elif isinstance((plan.config or {}).get("budget"), dict):
        # A --budget run stopped and resumed: its plan stands (widths, epochs), but the time across sessions is
        # not the budget's to compare (the first session's process planned it), so no time is recorded as taken.
        metrics["budget"] = {**plan.config["budget"], "taken_seconds": None, "resumed": True}
    write_json(run_dir / METRICS, metrics)
    plan.trained = True
    say("")
    say(format_history_table(fit.history, fit.train_seconds))
    if len(sessions) > 1:
        parts = " + ".join(f"{s:.1f}" for s in sessions)
        say(f"wall time over {len(sessions)} sessions (resumed): {parts} = {sum(sessions):.1f} s")
    if fit.restored_epoch and fit.history and fit.restored_epoch == fit.history[-1].get("epoch"):
        say(f"the last epoch ({fit.restored_epoch}) was also the best: its weights are kept, nothing to restore")
    elif fit.restored_epoch:
        say(f"best weights restored from epoch {fit.restored_epoch}")
    if plan.device.type == "cuda":
        say(f"training step: {fit.step_mode}")
    # The loss metrics.json, the report and evaluate give: at the softmax temperature when the run has one
    loss = metrics["test_loss"]
    say(f"test accuracy {test_acc:.2%}  (loss {loss:.4f}, TTA {r.tta}, evaluated in {eval_seconds:.1f} s)")
    if calibration is not None:
        kept = " kept from metrics.json," if plan.keep_calibration else ","
        say(
            f"softmax temperature {calibration['temperature']:.3f}{kept} fitted on {calibration.get('fitted_on', '?')} "
            f"(test loss {test_loss:.4f} -> {calibration['test_loss']:.4f}; predict, serve and export apply it)"
        )
        bound = at_bound(calibration["temperature"])
        if bound is not None:
            logging.getLogger(__name__).warning(
                "the softmax temperature %.3g is at the %s bound of the fit's range: a degenerate fit, not to be "
                "trusted (the report's reading says why and what to do)",
                calibration["temperature"],
                bound,
            )
    if plan.calibration_lost:
        now = "the temperature fitted now" if calibration is not None else "no temperature (the plain softmax)"
        logging.getLogger(__name__).warning(
            "%s was written again with %s: the softmax temperature the run had cannot be recovered (%s is missing "
            "or damaged); if `cifarlab calibrate` had fitted it, fit it again: cifarlab calibrate %s",
            run_dir / WEIGHTS,
            now,
            run_dir / METRICS,
            run_dir,
        )
    return RunResult(run_dir, metrics, "finished", logits)


def calibrate(plan: Plan) -> dict[str, Any]:
    """Fit the softmax temperature of the trained model (`cifarlab.calibrate`) on held-out images where the run
    has a validation split, else on training images, through the same inference path as the test."""
    r, ds = plan.recipe, plan.dataset
    return fit_on_split(
        plan.model, ds.x_train, ds.y_train, plan.train_idx, plan.val_idx, r.seed,
        mean=plan.mean, std=plan.std, device=plan.device, options=recipe_options(r),
    )  # fmt: skip


def write_report(plan: Plan, result: RunResult, say: Log) -> str | None:
    """report.html/report.md. A failure (a full disk, say) is reported and returned; the run stays finished."""
    from cifarlab.report import build_report  # scikit-learn and matplotlib: imported only when a report is built

    t0 = time.perf_counter()
    try:
        metrics = build_report(result.run_dir, dataset=plan.dataset, logits=result.logits)
        metrics.setdefault("timings", {})["report_seconds"] = time.perf_counter() - t0
        write_json(result.run_dir / METRICS, metrics)
    except (OSError, UserError) as e:
        say(
            f"the report could not be written ({e}); the trained model is saved: run `cifarlab report {result.run_dir}`"
        )
        return str(e)
    result.metrics = metrics
    say(f"report: {result.run_dir / 'report.html'}")
    return None


def _finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    """metrics.json of a finished run folder; None when the run has not finished (or says nothing readable), or
    when its weights file is missing or unreadable: resuming then evaluates again and writes it anew."""
    from safetensors import safe_open

    try:
        if read_json(run_dir / STATUS).get("status") != "finished":
            return None
        metrics = read_json(run_dir / METRICS)
        with safe_open(str(run_dir / WEIGHTS), framework="pt") as f:
            f.keys()
    except Exception:  # noqa: BLE001 (a damaged file of any kind: safetensors has its own error types)
        return None  # resuming reports what is wrong with the folder, or repairs it
    return metrics if isinstance(metrics, dict) else None


def _earlier_calibration(run_dir: Path) -> tuple[bool, dict[str, Any] | None, bool]:
    """(keep, calibration, lost) for a resumed run: a finished run comes here only to write its lost or damaged
    model.safetensors again, and the temperature that file held (the training's, or `cifarlab calibrate`'s since)
    is in metrics.json's "calibration" block too, so it is kept. `lost`: a finished run whose metrics.json cannot
    say. A run that has not finished has no temperature yet: (False, None, False)."""
    try:
        finished = read_json(run_dir / STATUS).get("status") == "finished"
    except Exception:  # noqa: BLE001 - a damaged status file: metrics.json below may still say
        finished = False
    try:
        metrics = read_json(run_dir / METRICS)
    except Exception:  # noqa: BLE001
        metrics = None
    metrics = metrics if isinstance(metrics, dict) else None
    finished = finished or (metrics is not None and metrics.get("status") == "finished")
    if not finished:
        return False, None, False
    block = metrics.get("calibration", ...) if metrics is not None else ...
    if block is None:
        return True, None, False
    if isinstance(block, dict):
        t = block.get("temperature")
        if isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0:
            return True, {**block, "temperature": float(t)}, False
    return False, None, True


def run_experiment(
    recipe: Recipe | None = None,
    *,
    data_dir: Path | str | None = None,
    runs_root: Path | str = "runs",
    device: str | None = None,
    resume: Path | str | None = None,
    deterministic: bool = False,
    quiet: bool = False,
    progress: bool | None = None,
    report: bool = True,
    dataset: Dataset | None = None,
    model: nn.Module | None = None,
    callbacks: Sequence[Callback] = (),
    command: str | None = None,
    log: Log | None = None,
    tensorboard: bool = False,
    mlflow: bool | str = False,
    init: Path | str | None = None,
    budget: float | None = None,
    budget_clock: Clock = PROCESS_START,
    dist: Distributed | None = None,
    resume_with: str | None = None,
    plugins: Sequence[str] = (),
) -> RunResult:
    """Train `recipe` (or resume the run in `resume`) and write everything into its run folder; `init` starts
    from a run folder's or a weights file's weights (`cifarlab.finetune`). `dist` (`cifarlab.distributed.setup`):
    one of several processes under torchrun; rank 0 alone prints and writes. `resume_with`: the command a stopped
    run names to continue it, when not `cifarlab train --resume RUN`. `plugins`: the plugins the command loaded
    (`plugins.command_plugins`), recorded in config.json so that the resume command names them."""
    main = dist is None or dist.is_main
    say: Log = (lambda s: None) if quiet or not main else (log or (lambda s: print(s, flush=True)))
    if resume is not None and (done := _finished_metrics(Path(resume))) is not None:
        # Nothing to continue: touching nothing keeps a re-run job (say, a requeued batch job) harmless.
        acc = done.get("test_accuracy")
        said = f" (test accuracy {acc:.2%})" if isinstance(acc, float) else ""
        say(f"{resume} already finished{said}; nothing to do")
        return RunResult(Path(resume), done, "finished")
    plan = prepare(
        recipe,
        dataset=dataset,
        data_dir=data_dir,
        device=device,
        deterministic=deterministic,
        resume=resume,
        model=model,
        init=init,
        dist=dist,
    )
    plan.resume_with = resume_with
    plan.plugins = list(plugins)
    if resume is not None:
        plan.keep_calibration, plan.kept_calibration, plan.calibration_lost = _earlier_calibration(Path(resume))
    if budget is not None:
        fit_budget(plan, budget, model_given=model is not None, clock=budget_clock)
    check_pieces(plan)
    run_dir = open_run(plan, runs_root, command=command, model_given=model is not None, report=report)
    try:
        r = plan.recipe
        if plan.resume_state is not None:
            say(f"resuming {run_dir} after epoch {plan.resume_state['epoch']}")
            if report and plan.config.get("report") is False:
                report = False
                say(
                    f"no report at the end: the run was started with --no-report (`cifarlab report {run_dir}` "
                    "writes one)"
                )
        say(f"run folder: {run_dir}")
        budgeted = plan.budget is not None or isinstance((plan.config or {}).get("budget"), dict)
        # Under a budget the deadline ends training: the recipe's epoch count is the plan's guess, not a cap
        epochs = "epochs until the budget's deadline" if budgeted else f"{plural(r.epochs, 'epoch')} max"
        say(
            f"recipe {r.name}: {len(plan.train_idx):,} train / {len(plan.val_idx):,} val / "
            f"{len(plan.dataset.y_test):,} test images, {epochs}, batch {r.batch_size}, "
            f"device {plan.device}, {plural(plan.threads, 'thread')}"
        )
        say(f"precision: {precision_reason(r.precision, plan.device)}")
        if dist is not None:
            say(
                f"torchrun: {dist.world} processes ({dist.nodes} node(s) x {dist.local_world}), {dist.backend}, "
                f"global batch {r.batch_size} = {r.batch_size // dist.world} per process"
                + (", SyncBatchNorm" if dist.sync_bn else "")
            )
        if plan.budget is not None:
            say(plan.budget.describe())
        for line in plan.init.lines() if plan.init is not None else []:
            say(line)
        if r.freeze_stages or (plan.init is not None and r.pretrained_lr_scale != 1.0):
            say(f"finetune: {stages_frozen(r.freeze_stages)}, pretrained weights at {r.pretrained_lr_scale:g}x the LR")
        show_progress = (sys.stderr.isatty() and not quiet) if progress is None else progress
        machinery = (
            run_callbacks(
                plan,
                log=None if quiet else say,
                progress=show_progress,
                tensorboard=tensorboard,
                mlflow=mlflow,
                quiet=quiet,
            )
            if main
            else []  # the other ranks write nothing
        )
        try:
            fit, clock = train(plan, [*callbacks, *machinery])
            result = finish(plan, fit, clock, say)
            if result.status != "finished" or not main:
                return result
            b = plan.budget
            if b is None and isinstance(result.metrics.get("budget"), dict):
                total = result.metrics["budget"].get("budget_seconds")
                say(f"budget {total:g} s: this run was resumed, so its time is not compared with the budget")
            if b is not None and (taken := b.taken_seconds) is not None:
                over = taken / b.budget_seconds - 1
                say(
                    f"budget {b.budget_seconds:g} s, taken {taken:.1f} s ({over:+.1%}) from {b.clock.origin} to the "
                    "result"
                )
            report_error = write_report(plan, result, say) if report else None
            write_status(run_dir, "finished", **({"report_error": report_error} if report_error else {}))
            return result
        except KeyboardInterrupt:
            # Ctrl-C outside the epochs (which the trainer turns into a stopped run): before the loop, in its
            # end-of-training callbacks, the test evaluation or the report. The last checkpoint stands.
            if main and plan.trained:
                # Training, calibration and the test had finished (metrics.json says so): the report is an extra,
                # so the run stays finished; an interrupted report is missing (or the previous one stands).
                _status_if_possible(run_dir, "finished", report_error="interrupted")
                say(
                    "interrupted after training finished: the run is finished and its model saved"
                    + (f"; the report was not written: `cifarlab report {run_dir}` writes it" if report else "")
                )
            elif main:
                resumable = (run_dir / CHECKPOINT).exists()
                _status_if_possible(run_dir, "stopped", message="interrupted outside the training epochs")
                say(plan.resume_line() if resumable else "nothing to resume yet")
            raise
        except BaseException as e:
            if plan.dist is not None and peer_lost(e):
                # One line, not gloo's traceback: the process that died has its own messages, torchrun names it.
                why = peer_ended(e, "during the run")
                if main:
                    _status_if_possible(run_dir, "crashed", message=why)
                if (run_dir / CHECKPOINT).exists():
                    why += f"; the run's last checkpoint stands: {plan.resume_line()}"
                raise RunError(why) from None
            if main:
                _status_if_possible(run_dir, "crashed", message=f"{type(e).__name__}: {e}")
            raise
    finally:
        if plan.lock is not None:
            plan.lock.release()
