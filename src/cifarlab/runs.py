"""Run folders: atomic file writes, weights (safetensors), resumable checkpoints, loading a saved run.

Nothing here unpickles arbitrary objects: weights are safetensors, checkpoints are read with
`torch.load(weights_only=True)`, configs and histories are JSON.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cifarlab.errors import UserError
from cifarlab.files import atomic_write_bytes, read_json, write_json
from cifarlab.recipes import Recipe

CONFIG = "config.json"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
METRICS = "metrics.json"
WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoint.pt"
STATUS = "status.json"
HISTORY_COLUMNS = ["epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds", "events"]


def new_run_dir(root: Path | str, recipe_name: str) -> Path:
    root = Path(root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(100):
        path = root / (f"{stamp}-{recipe_name}" + (f"-{i}" if i else ""))
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise UserError(f"could not create a new run folder under {root}")


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device) if device is not None else "cpu",
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def write_history(run_dir: Path, history: list[dict[str, Any]]) -> None:
    write_json(run_dir / HISTORY_JSON, history)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({**row, "events": ";".join(row.get("events", []))})
    atomic_write_bytes(run_dir / HISTORY_CSV, buf.getvalue().encode())


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_weights(model: nn.Module, path: Path) -> None:
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the run has no saved weights (did training finish?)") from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path} is not a valid safetensors file ({e}); the run folder is damaged") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{path} does not match the recipe's model (missing {missing}, unexpected {unexpected})"
        )


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        # weights_only: tensors and plain containers only; a tampered pickle cannot run code.
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: nothing to resume from") from None
    except Exception as e:
        raise UserError(f"{path} cannot be loaded safely ({type(e).__name__}: {e})") from None


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    recipe: Recipe
    history: list[dict[str, Any]]
    metrics: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.config["dataset"]["classes"])

    @property
    def normalization(self) -> tuple[list[float] | None, list[float] | None]:
        n = self.config.get("normalization") or {}
        return n.get("mean"), n.get("std")

    def build_model(self, weights: bool = True) -> nn.Module:
        from cifarlab.models import build_model

        model = build_model(self.recipe, num_classes=len(self.classes))
        if weights:
            load_weights(model, self.path / WEIGHTS)
        model.eval()
        return model


def load_run(run_dir: Path | str) -> Run:
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; pass a run folder such as runs/20261125-120000-fast")
    config = read_json(path / CONFIG)
    recipe = Recipe.from_dict(config["recipe"])
    history = read_json(path / HISTORY_JSON) if (path / HISTORY_JSON).exists() else []
    metrics = read_json(path / METRICS) if (path / METRICS).exists() else {}
    return Run(path=path, config=config, recipe=recipe, history=history, metrics=metrics)
