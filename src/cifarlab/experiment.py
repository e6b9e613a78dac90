"""One training run end to end: data, split, model, loop, test evaluation, run folder, report."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cifarlab import __version__
from cifarlab.augment import make_augment
from cifarlab.recipes import Recipe


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    status: str


def make_callbacks(recipe: Recipe, has_val: bool) -> list:
    """Keras' order from the reference: EarlyStopping first, then ReduceLROnPlateau."""
    from cifarlab.callbacks import EarlyStopping, ReduceLROnPlateau

    needs_val = recipe.monitor.startswith("val_")
    if needs_val and not has_val:
        return []
    cbs: list = []
    if recipe.early_stopping_patience > 0:
        cbs.append(
            EarlyStopping(
                monitor=recipe.monitor,
                min_delta=recipe.early_stopping_min_delta,
                patience=recipe.early_stopping_patience,
                restore_best_weights=recipe.restore_best_weights,
            )
        )
    if recipe.schedule == "plateau":
        cbs.append(
            ReduceLROnPlateau(
                monitor=recipe.monitor,
                factor=recipe.plateau_factor,
                patience=recipe.plateau_patience,
                min_delta=recipe.plateau_min_delta,
                cooldown=recipe.plateau_cooldown,
                min_lr=recipe.plateau_min_lr,
            )
        )
    return cbs


def versions() -> dict[str, str]:
    import numpy

    return {
        "cifarlab": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def _status(run_dir: Path, status: str, **extra: Any) -> None:
    from cifarlab.runs import STATUS, write_json

    write_json(
        run_dir / STATUS,
        {"status": status, "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra},
    )


def run_experiment(
    recipe: Recipe | None = None,
    *,
    data_dir: Path | None = None,
    runs_root: Path | str = "runs",
    device: str | None = None,
    resume: Path | None = None,
    deterministic: bool = False,
    quiet: bool = False,
    progress: bool | None = None,
    report: bool = True,
    dataset: Any = None,
    command: str | None = None,
    log: Callable[[str], None] | None = None,
    tensorboard: bool = False,
) -> RunResult:
    """Train `recipe` (or resume the run in `resume`) and write everything into its run folder."""
    from cifarlab.data import BatchLoader, channel_stats, load_dataset, split_indices
    from cifarlab.inference import predict_logits, recipe_options, resolve_device, set_threads, to_float
    from cifarlab.models import build_model, init_whitening
    from cifarlab.runs import (
        CHECKPOINT,
        CONFIG,
        METRICS,
        WEIGHTS,
        load_checkpoint,
        machine_info,
        new_run_dir,
        read_json,
        save_weights,
        write_history,
        write_json,
    )
    from cifarlab.train import Trainer, format_history_table

    t_start = time.perf_counter()
    say = (lambda s: None) if quiet else (log or (lambda s: print(s, flush=True)))
    dev = resolve_device(device)
    threads = set_threads() if dev.type == "cpu" else torch.get_num_threads()
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    checkpoint = None
    if resume is not None:
        run_dir = Path(resume)
        config = read_json(run_dir / CONFIG)
        recipe = Recipe.from_dict(config["recipe"])
        checkpoint = load_checkpoint(run_dir / CHECKPOINT)
        say(f"resuming {run_dir} after epoch {checkpoint['epoch']}")
    else:
        if recipe is None:
            raise ValueError("run_experiment needs a recipe or a run folder to resume")
        run_dir = new_run_dir(runs_root, recipe.name)
    _status(run_dir, "running")
    torch.manual_seed(recipe.seed)

    # -- data --------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    ds = dataset if dataset is not None else load_dataset(recipe.dataset, data_dir)
    n = len(ds.y_train)
    labels = ds.y_train if recipe.stratified_split else None
    tr_idx, va_idx = split_indices(n, recipe.val_fraction, recipe.seed, labels=labels)
    x_tr, y_tr = ds.x_train[tr_idx], ds.y_train[tr_idx]
    x_va, y_va = ds.x_train[va_idx], ds.y_train[va_idx]
    mean = std = None
    if recipe.scaling == "standardize":
        mean, std = channel_stats(x_tr)
    data_seconds = time.perf_counter() - t0

    # -- model ---------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    model = build_model(recipe, num_classes=len(ds.classes)).to(dev)
    fmt = torch.channels_last if recipe.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if recipe.whiten_init and checkpoint is None:
        g = torch.Generator().manual_seed(recipe.seed)
        pick = torch.randperm(len(x_tr), generator=g)[:5000]
        init_whitening(model.whiten, to_float(x_tr[pick], mean, std, dev))
    common = dict(mean=mean, std=std, channels_last=recipe.channels_last, device=dev)
    train_loader = BatchLoader(
        x_tr,
        y_tr,
        recipe.batch_size,
        shuffle=True,
        drop_last=recipe.drop_last,
        seed=recipe.seed,
        transform=make_augment(recipe),
        **common,
    )
    val_loader = BatchLoader(x_va, y_va, recipe.eval_batch_size, **common) if len(va_idx) else None
    setup_seconds = time.perf_counter() - t0

    if checkpoint is None:
        config = {
            "recipe": recipe.to_dict(),
            "seed": recipe.seed,
            "dataset": {
                "name": ds.name,
                "classes": list(ds.classes),
                "source": str(ds.source),
                "checksum": ds.checksum,
                "n_train": len(tr_idx),
                "n_val": len(va_idx),
                "n_test": len(ds.y_test),
                "split": {
                    "val_fraction": recipe.val_fraction,
                    "seed": recipe.seed,
                    "stratified": recipe.stratified_split,
                },
            },
            "normalization": {"mean": list(mean) if mean else None, "std": list(std) if std else None},
            "machine": machine_info(dev),
            "versions": versions(),
            "command": command or " ".join(sys.argv),
            "deterministic": deterministic,
        }
        write_json(run_dir / CONFIG, config)
    say(f"run folder: {run_dir}")
    say(
        f"recipe {recipe.name}: {len(tr_idx):,} train / {len(va_idx):,} val / {len(ds.y_test):,} test images, "
        f"{recipe.epochs} epochs max, batch {recipe.batch_size}, device {dev}, {threads} threads, "
        f"precision {recipe.precision}"
    )

    writer = None
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))

    def on_epoch_end(row: dict[str, Any]) -> None:
        write_history(run_dir, trainer.history)
        if writer is not None:
            for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds"):
                if row.get(key) is not None:
                    writer.add_scalar(key, row[key], row["epoch"])
            writer.flush()

    trainer = Trainer(
        model,
        recipe,
        train_loader,
        val_loader,
        callbacks=make_callbacks(recipe, val_loader is not None),
        device=dev,
        checkpoint_path=run_dir / CHECKPOINT,
        on_epoch_end=on_epoch_end,
        progress=(sys.stderr.isatty() and not quiet) if progress is None else progress,
        log=say,
    )
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint)
    result = trainer.fit()
    write_history(run_dir, result.history)
    if result.status != "finished":
        _status(run_dir, "stopped" if result.status == "stopped" else "crashed", message=result.message)
        say(result.message)
        if result.status == "stopped":
            say(f"resume with: cifarlab train --resume {run_dir}")
        save_weights(model, run_dir / WEIGHTS)
        return RunResult(run_dir, {"status": result.status, "message": result.message}, result.status)

    # -- test evaluation -----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    logits = predict_logits(model, ds.x_test, mean=mean, std=std, device=dev, **recipe_options(recipe))
    test_acc = (logits.argmax(1) == ds.y_test).float().mean().item()
    test_loss = F.cross_entropy(logits, ds.y_test).item()
    eval_seconds = time.perf_counter() - t0
    total_seconds = time.perf_counter() - t_start

    save_weights(model, run_dir / WEIGHTS, metadata={"recipe": recipe.name})
    last = result.history[-1] if result.history else {}
    best_row = result.history[result.best_epoch - 1] if result.best_epoch else last
    metrics = {
        "status": "finished",
        "recipe": recipe.name,
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "tta": recipe.tta,
        "epochs_run": len(result.history),
        "best_epoch": result.best_epoch,
        "stopped_epoch": result.stopped_epoch,
        "restored_epoch": result.restored_epoch,
        "lr_drops_after_epochs": [r["epoch"] for r in result.history if "lr_reduced" in r["events"]],
        "train_accuracy": last.get("accuracy"),
        "best_val_accuracy": best_row.get("val_accuracy"),
        "best_val_loss": best_row.get("val_loss"),
        "timings": {
            "data_seconds": data_seconds,
            "setup_seconds": setup_seconds,
            "train_seconds": result.train_seconds,
            "eval_seconds": eval_seconds,
            "total_seconds": total_seconds,
            "seconds_per_epoch": result.train_seconds / max(1, len(result.history)),
        },
    }
    write_json(run_dir / METRICS, metrics)
    say("")
    say(format_history_table(result.history, result.train_seconds))
    if result.restored_epoch:
        say(f"best weights restored from epoch {result.restored_epoch}")
    say(f"test accuracy {test_acc:.2%}  (loss {test_loss:.4f}, TTA {recipe.tta}, evaluated in {eval_seconds:.1f} s)")

    if report:
        t0 = time.perf_counter()
        try:
            from cifarlab.report import build_report

            metrics = build_report(run_dir, dataset=ds, logits=logits)
            metrics.setdefault("timings", {})["report_seconds"] = time.perf_counter() - t0
            write_json(run_dir / METRICS, metrics)
            say(f"report: {run_dir / 'report.html'}")
        except ImportError:
            say("report module not available; skipped")
    _status(run_dir, "finished")
    return RunResult(run_dir, metrics, "finished")
