"""Run folders: their files, weights (safetensors), resumable checkpoints, the lock, loading a saved run.

Nothing here unpickles arbitrary objects: weights are safetensors, checkpoints are read with
`torch.load(weights_only=True)`, configs and histories are JSON. Every write goes through `cifarlab.files`
(atomic), and weights that are not finite are never written as a run's model nor loaded from one.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import math
import os
import platform
import re
import shlex
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load, save
from torch import nn

from cifarlab.device import cpu_has_bf16, cpu_isa_cap
from cifarlab.errors import UserError
from cifarlab.files import atomic_write_bytes, read_json, require_regular_file, write_json
from cifarlab.models import build_model
from cifarlab.recipes import Recipe, unregistered
from cifarlab.registry import MODELS
from cifarlab.train.checkpoint import save_checkpoint, write_history

__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "HISTORY_CSV",
    "HISTORY_JSON",
    "LOCK",
    "METRICS",
    "STATUS",
    "WEIGHTS",
    "Run",
    "RunLock",
    "atomic_write_bytes",
    "check_plugins_loaded",
    "check_runs_root",
    "load_checkpoint",
    "load_run",
    "load_weights",
    "machine_info",
    "new_run_dir",
    "read_json",
    "recorded_plugins",
    "resume_command",
    "unregistered_model_message",
    "stale_result",
    "weights_sha256",
    "save_checkpoint",
    "save_weights",
    "start_again",
    "write_history",
    "write_json",
    "write_status",
]

CONFIG = "config.json"
HISTORY_JSON = "history.json"
HISTORY_CSV = "history.csv"
METRICS = "metrics.json"
WEIGHTS = "model.safetensors"
TEMPERATURE = "temperature"  # model.safetensors metadata key: the softmax temperature (`cifarlab.calibrate`)
CHECKPOINT = "checkpoint.pt"
STATUS = "status.json"
LOCK = ".lock"


def check_runs_root(root: Path | str) -> Path:
    """Refuse a runs folder that cannot hold a new run folder (a file, below a file, read-only, on a read-only
    filesystem) without creating anything: `train` and `fit` call it before any data is loaded, and
    `new_run_dir` again when it creates the folder."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--runs-dir {root} is a file, not a folder")
    nearest = root.absolute()  # the folder mkdir(parents=True) would create the rest in
    while not nearest.exists() and nearest != nearest.parent:
        nearest = nearest.parent
    why = None
    if not nearest.is_dir():
        why = os.strerror(errno.ENOTDIR)
    elif not os.access(nearest, os.W_OK | os.X_OK):  # False on a read-only mount, for root too
        read_only = hasattr(os, "statvfs") and bool(os.statvfs(nearest).f_flag & os.ST_RDONLY)
        why = os.strerror(errno.EROFS if read_only else errno.EACCES)
    if why is not None:
        raise UserError(f"cannot create a run folder under {root} ({why}); pick --runs-dir")
    return root


def new_run_dir(root: Path | str, recipe_name: str) -> Path:
    root = check_runs_root(root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(100):
        path = root / (f"{stamp}-{recipe_name}" + (f"-{i}" if i else ""))
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
        except OSError as e:
            if e.errno == errno.ENAMETOOLONG:  # the recipe's name makes the folder's name
                raise UserError(
                    f"the run folder's name ({len(path.name)} characters, from the recipe's name) is too long for "
                    "this file system; give the recipe a shorter name (--set name=...)"
                ) from None
            raise UserError(f"cannot create a run folder under {root} ({e.strerror or e}); pick --runs-dir") from None
    raise UserError(f"could not create a new run folder under {root}")


def write_status(run_dir: Path, status: str, **extra: Any) -> None:
    """status.json: running / finished / stopped / crashed, with the PID so `cifarlab runs` can tell a dead run."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(run_dir / STATUS, {"status": status, "pid": os.getpid(), "time": stamp, **extra})


class RunLock:
    """An exclusive OS lock on `<run>/.lock` while a process trains in the folder. The kernel drops it when the
    process dies, however it dies, so a stale lock cannot outlive its process."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self._f: IO[str] | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks; status.json still tells
            return self
        try:
            f = open(self.path, "a+")  # noqa: SIM115 - held for the whole run
        except OSError as e:  # a read-only folder or disk, a folder of another user
            raise UserError(
                f"cannot lock {self.path.parent} ({e.strerror or e}): this command writes into the run folder, "
                "so it must be writable; copy the run somewhere writable and run the command on the copy"
            ) from None
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            status = {}
            try:
                status = read_json(self.path.parent / STATUS)
            except UserError:
                pass
            pid = status.get("pid", "?") if isinstance(status, dict) else "?"
            raise UserError(
                f"{self.path.parent} is in use: it is still training (process {pid}). Wait for it to finish or "
                "stop it (Ctrl-C), then resume"
            ) from None
        self._f = f
        return self

    def release(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def weights_sha256(run_dir: Path | str) -> str | None:
    """SHA-256 of the run's model.safetensors (its tensors and its metadata, the softmax temperature included),
    None without one: what a result computed from these weights records, to be told from a later run's."""
    path = Path(run_dir) / WEIGHTS
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def stale_result(run_dir: Path | str, data: Any, path: Path | str) -> bool:
    """Whether a result file of the run (`evaluate`'s eval_*.json, read as `data`) was computed from other weights
    than the run has now: resumed and trained further, or recalibrated since. By the digest it records; a file
    written before digests were recorded is stale when it is older than the weights."""
    now = weights_sha256(run_dir)
    if now is None:
        return False
    recorded = data.get("weights_sha256") if isinstance(data, dict) else None
    if recorded:
        return recorded != now
    try:
        return Path(path).stat().st_mtime < (Path(run_dir) / WEIGHTS).stat().st_mtime
    except OSError:
        return False


def recorded_plugins(config: Any) -> list[str]:
    """The plugins a run's command loaded (config.json's `plugins`: absolute .py paths or module names); [] for a
    run that named none, or that predates the record."""
    plugins = config.get("plugins") if isinstance(config, dict) else None
    return [p for p in plugins if isinstance(p, str) and p] if isinstance(plugins, list) else []


def _config_or_none(run_dir: Path | str) -> Any:
    try:
        return read_json(Path(run_dir) / CONFIG)
    except Exception:  # noqa: BLE001 - only advice: a damaged config.json has its own error elsewhere
        return None


def resume_command(run_dir: Path | str, distributed: Any = None, plugins: list[str] | None = None) -> str:
    """The command that continues a stopped run: with as many processes as it trained with (config.json's
    `distributed`), since one process would resume it too, but slower and without saying so; and with the
    `--plugin` arguments of the plugins it trained with (`plugins`; None: config.json's), which `--resume` does
    not load itself (a run folder from elsewhere must not run code the user did not name)."""
    d = distributed if isinstance(distributed, dict) else {}
    try:
        world, nodes = int(d.get("world_size") or 1), int(d.get("nodes") or 1)
    except (TypeError, ValueError):
        world, nodes = 1, 1
    if plugins is None:
        plugins = recorded_plugins(_config_or_none(run_dir))
    loads = "".join(f"--plugin {shlex.quote(p)} " for p in plugins)
    if world > 1 and nodes > 1:
        per_node = world // nodes
        return (
            f"torchrun --nnodes {nodes} --nproc-per-node {per_node} <the first run's rendezvous options> "
            f"-m cifarlab.cli {loads}train --resume {run_dir} (on each node)"
        )
    nproc = f"--nproc {world} " if world > 1 else ""
    return f"cifarlab {loads}train {nproc}--resume {run_dir}"


def check_plugins_loaded(run_dir: Path | str) -> None:
    """Refuse to resume a run whose plugins (config.json's `plugins`) this command did not load: naming them is
    the user's choice, since a plugin is code. The error gives the exact command, `--plugin` arguments included."""
    config = _config_or_none(run_dir)
    from cifarlab.plugins import is_loaded

    recorded = recorded_plugins(config)
    missing = [p for p in recorded if not is_loaded(p)]
    if not missing:
        return
    gone = [p for p in missing if p.endswith(".py") and not Path(p).is_file()]
    names = ", ".join(missing)
    raise UserError(
        f"{run_dir} was trained with plugin code this command did not load ({names}). --resume does not run code "
        "named in a run folder by itself: check the plugin, then add its --plugin argument: "
        f"{resume_command(run_dir, config.get('distributed'), recorded)}"
        + (
            f" ({', '.join(gone)} no longer exists: pass the plugin from where it is now, under the same file name)"
            if gone
            else ""
        )
    )


def run_status(run: Any) -> tuple[str, str]:
    """(status, message) of the run: status.json's finished / stopped / crashed / running (a "running" run whose
    process is gone is crashed; the training process's own report, written just before it marks the folder
    finished, is finished); metrics.json's status for a folder without status.json."""
    try:
        st = read_json(run.path / STATUS) if (run.path / STATUS).exists() else {}
    except Exception:  # noqa: BLE001 - a damaged status file: fall back to metrics.json
        st = {}
    st = st if isinstance(st, dict) else {}
    try:
        m_status = run.metrics.get("status")
    except Exception:  # noqa: BLE001
        m_status = None
    status = str(st.get("status") or m_status or "unknown")
    message = str(st.get("message") or "")
    if status == "running":
        from cifarlab.cli.runs import pid_alive

        own = st.get("pid") == os.getpid()
        alive = own or pid_alive(st.get("pid"), st.get("time"))
        if m_status == "finished" and (own or not alive):
            status = "finished"
        elif not alive:
            status, message = "crashed", "its process ended without recording why (killed, or the machine stopped)"
    return status, message


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
        "cpu_bf16": cpu_has_bf16(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device) if device is not None else "cpu",
    }
    cap = cpu_isa_cap()
    if cap is not None:  # the run used the kernels of a less capable CPU: say so beside the CPU's name
        info["cpu_isa_cap"] = cap
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def _non_finite(state: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> None:
    """model.safetensors, atomically; refuses NaN/inf weights so a diverged run never replaces a good model."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    bad = _non_finite(state)
    if bad:
        raise UserError(f"refusing to write {path}: weights {bad[:3]} are NaN/inf (training diverged)")
    atomic_write_bytes(path, save(state, metadata=metadata))


def read_temperature(path: Path) -> float:
    """The `temperature` entry of a weights file's metadata; 1.0 when the file has none (or is missing or damaged:
    loading the weights reports that)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            value = (f.metadata() or {}).get(TEMPERATURE)
    except Exception:  # noqa: BLE001 (safetensors has its own error types; load_weights words them)
        return 1.0
    if value is None:
        return 1.0
    try:
        t = float(value)
    except ValueError:
        t = math.nan
    if not (math.isfinite(t) and t > 0):
        raise UserError(f"{path}: temperature {value!r} is not a positive number; the file is damaged")
    return t


def write_temperature(path: Path, temperature: float | None) -> None:
    """Rewrite a weights file with the same tensors and its metadata's temperature set (None: removed),
    atomically: a failure leaves the old file whole."""
    from safetensors import safe_open

    try:
        require_regular_file(path, "weights file")
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except UserError:
        raise _no_weights(path) from None
    except Exception as e:  # noqa: BLE001 (safetensors has its own error types)
        raise UserError(f"{path} is not a valid safetensors file ({e}); the run folder is damaged") from None
    meta.pop(TEMPERATURE, None)
    if temperature is not None:
        meta[TEMPERATURE] = repr(float(temperature))
    atomic_write_bytes(path, save(state, metadata=meta or None))


def _no_weights(path: Path) -> UserError:
    """The error for a missing weights file: a run that is still training (status.json "running" with its
    process alive, as `cifarlab runs` decides) says so and what to do; anything else says the file is missing."""
    run_dir = Path(path).parent
    try:
        st = read_json(run_dir / STATUS) if (run_dir / STATUS).is_file() else {}
    except Exception:  # noqa: BLE001 - a damaged status file: the plain message
        st = {}
    if isinstance(st, dict) and st.get("status") == "running" and st.get("pid") != os.getpid():
        from cifarlab.cli.runs import pid_alive

        if pid_alive(st.get("pid"), st.get("time")):
            return UserError(
                f"{run_dir} is still training (process {st.get('pid')}): it has no saved weights yet. Run this "
                "again when training ends (`cifarlab runs` shows its status)."
            )
    return UserError(f"{path} is missing: the run has no saved weights (did training finish?)")


def load_weights(model: nn.Module, path: Path) -> None:
    """Load `path` into `model`; every way it can be wrong is a one-line error naming the file."""
    try:
        require_regular_file(path, "weights file")
        state = load(Path(path).read_bytes())
    except UserError:
        raise _no_weights(path) from None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{path} is not a valid safetensors file ({e}); the run folder is damaged") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    # Integer tensors where the model has floating-point ones (a foreign or hand-made file) would load, rounded.
    kinds = [k for k in expected if k in state and state[k].is_floating_point() != expected[k].is_floating_point()]
    if missing or unexpected or wrong or kinds:
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:5]}" if missing else "",
                f"unexpected {unexpected[:5]}" if unexpected else "",
                ", ".join(
                    f"{k} is {tuple(state[k].shape)}, the model needs {tuple(expected[k].shape)}" for k in wrong[:5]
                ),
                ", ".join(f"{k} is {state[k].dtype}, the model needs {expected[k].dtype}" for k in kinds[:5]),
            )
            if part
        )
        raise UserError(
            f"{path} does not match the run's model ({detail}); the run folder is damaged (the weights, or a "
            "config.json edited since training)"
        )
    bad = _non_finite(state)
    if bad:
        raise UserError(
            f"{path} holds NaN/inf weights ({', '.join(bad[:3])}): the run diverged; this model cannot be used"
        )
    model.load_state_dict(state)


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        require_regular_file(path, "checkpoint")
        # weights_only: tensors and plain containers only; a tampered pickle cannot run code. Its warnings (a
        # foreign file's pickle protocol, say) would only add lines of torch internals to the one-line refusal.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise UserError(
            f"{path} is missing: no epoch of this run finished (or the file was removed), so there is nothing to "
            f"resume; {start_again(path.parent)}"
        ) from None
    except Exception:
        # torch's own message suggests weights_only=False, which would run whatever the file holds: never say it.
        raise UserError(
            f"{path} is not a cifarlab checkpoint (damaged or tampered with); it cannot be resumed; "
            f"{start_again(path.parent)}"
        ) from None
    needed = ("epoch", "step", "model", "optimizer", "callbacks", "history", "torch_rng")
    if not isinstance(state, dict) or any(k not in state for k in needed):
        raise UserError(
            f"{path} is not a cifarlab checkpoint (fields are missing); it cannot be resumed; "
            f"{start_again(path.parent)}"
        )
    return state


def start_again(run_dir: Path | str) -> str:
    """What to do about a run that cannot be resumed: run the command that started it (config.json's) again."""
    config = _config_or_none(run_dir)
    command = config.get("command") if isinstance(config, dict) else None
    return f"start the run again: {command}" if isinstance(command, str) and command else "start the run again"


@dataclass
class Run:
    """A run folder as loaded: its config, recipe, history and metrics; `build_model()` gives the trained model."""

    path: Path
    config: dict[str, Any]
    recipe: Recipe

    # history.json and metrics.json are read when first asked for: predict, export and serve need neither, so a
    # damaged one does not block them (the report, which rebuilds metrics.json, sets a damaged one aside).
    @functools.cached_property
    def history(self) -> list[dict[str, Any]]:
        history = read_json(self.path / HISTORY_JSON) if (self.path / HISTORY_JSON).exists() else []
        if not isinstance(history, list):
            raise UserError(f"{self.path / HISTORY_JSON} is not a list of epochs; the file is damaged")
        return history

    @functools.cached_property
    def metrics(self) -> dict[str, Any]:
        metrics = read_json(self.path / METRICS) if (self.path / METRICS).exists() else {}
        if not isinstance(metrics, dict):
            raise UserError(f"{self.path / METRICS} is not a mapping; the file is damaged")
        return metrics

    @property
    def classes(self) -> list[str]:
        return list(self.config["dataset"]["classes"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        shape = self.config["dataset"].get("input_shape") or (3, 32, 32)
        return (int(shape[0]), int(shape[1]), int(shape[2]))

    @property
    def normalization(self) -> tuple[list[float] | None, list[float] | None]:
        n = self.config.get("normalization") or {}
        return n.get("mean"), n.get("std")

    @functools.cached_property
    def temperature(self) -> float:
        """The softmax temperature fitted after training (`cifarlab.calibrate`), from model.safetensors' metadata;
        1.0 for a run that fitted none (its recipe said calibrate=false, it stopped early, or it predates them)."""
        return read_temperature(self.path / WEIGHTS)

    def inference_model(self, device: torch.device) -> nn.Module:
        """The trained model on `device`, in the memory format training evaluated it in (evaluate, calibrate,
        corruptions)."""
        model = self.build_model().to(device)
        if self.recipe.channels_last:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return model

    def build_model(self, weights: bool = True) -> nn.Module:
        model = build_model(self.recipe, num_classes=len(self.classes), input_shape=self.input_shape)
        if weights:
            load_weights(model, self.path / WEIGHTS)
        model.eval()
        return model


def _check_config(path: Path, config: Any) -> None:
    """Tampered or foreign config.json files fail here with the file named, not later with a KeyError."""
    where = path / CONFIG
    if not isinstance(config, dict) or not isinstance(config.get("recipe"), dict):
        raise UserError(f"{where} has no recipe: it is not a cifarlab run config (or it was damaged)")
    ds = config.get("dataset")
    if not isinstance(ds, dict):
        raise UserError(f"{where} has no dataset section; the file is damaged")
    classes = ds.get("classes")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise UserError(f"{where} has no valid dataset.classes list (at least two class names); the file is damaged")
    shape = ds.get("input_shape")
    if shape is not None and (
        not isinstance(shape, list) or len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape)
    ):
        raise UserError(f"{where}: dataset.input_shape must be [channels, height, width]; the file is damaged")
    norm = config.get("normalization") or {}
    channels = shape[0] if isinstance(shape, list) else 3
    standardize = config["recipe"].get("scaling") == "standardize"
    for key in ("mean", "std"):
        v = norm.get(key) if isinstance(norm, dict) else None
        if v is None:
            if standardize:  # without them every image would go in unnormalized: wrong answers, no error
                raise UserError(
                    f"{where}: the recipe standardizes its inputs but normalization.{key} is missing; the file is "
                    "damaged"
                )
            continue
        if (
            not isinstance(v, list)
            or len(v) != channels
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
            or (key == "std" and not all(x > 0 for x in v))
        ):
            what = f"{channels} positive numbers" if key == "std" else f"a list of {channels} numbers"
            raise UserError(f"{where}: normalization.{key} must be {what}; the file is damaged")


def _user_class_name(model_name: str) -> str:
    """`user.MyNet` / `user.MyNet.2` (another architecture of that class) -> `MyNet`, as Python code writes it."""
    qualname = re.sub(r"\.\d+$", "", model_name.removeprefix("user."))
    return qualname.rsplit(".", 1)[-1] if "<" in qualname else qualname  # f.<locals>.MyNet: its own name


def unregistered_model_message(run_dir: Path, config: Any) -> str | None:
    """The error for a run trained on your own nn.Module (`fit(model=MyNet())`, recorded as model `user.MyNet`)
    loaded where nothing registers that name: both ways to load it. None for any other run."""
    recipe = config.get("recipe") if isinstance(config, dict) else None
    if not isinstance(recipe, dict):
        return None
    name = recipe.get("model")
    if not isinstance(name, str) or not name.startswith("user.") or name in MODELS:
        return None
    short = _user_class_name(name)
    cls = config.get("model_class") or short
    others = [piece for piece in unregistered(recipe) if piece != f"model {name!r}"]
    return (
        f"{run_dir} was trained with your own nn.Module {cls}, recorded as model {name!r}, which nothing registers "
        f"in this process. In Python, pass a {short} built as the trained one was (its weights are loaded from the "
        f"run): cifarlab.load({str(run_dir)!r}, model={short}(...)). For the cifarlab command, register it under "
        f"that name in a plugin file, `MODELS.register({name!r})(lambda recipe, num_classes, input_shape: "
        f"{short}(...))` (from cifarlab.registry import MODELS), and load it: "
        f"`cifarlab --plugin FILE predict {run_dir} IMAGE`"
        + (f"; the run also needs {', '.join(others)}: load the plugin that registers them" if others else "")
    )


def recipe_from_config(run_dir: Path, config: dict[str, Any]) -> Recipe:
    """The run's recipe; pieces its recipe names that no plugin registered here are one clear error."""
    missing = unregistered(config["recipe"])
    if missing:
        own = unregistered_model_message(run_dir, config)
        if own is not None:
            raise UserError(own)
        plugins = recorded_plugins(config)
        how = (
            "load the plugins it was trained with: cifarlab " + " ".join(f"--plugin {shlex.quote(p)}" for p in plugins)
            if plugins
            else "load the plugin that registers them: cifarlab --plugin FILE_OR_MODULE"
        )
        raise UserError(
            f"{run_dir} was trained with pieces not registered here ({', '.join(missing)}); {how} COMMAND ..."
        )
    try:
        return Recipe.from_dict(config["recipe"])
    except UserError as e:
        from cifarlab import __version__

        versions = config.get("versions")
        wrote = versions.get("cifarlab") if isinstance(versions, dict) else None
        hint = (
            f" (the run was written by cifarlab {wrote}, this is {__version__}: a newer version may know its keys)"
            if isinstance(wrote, str) and wrote != __version__
            else ""
        )
        raise UserError(f"{run_dir / CONFIG}: {e}{hint}") from None


def load_run(run_dir: Path | str) -> Run:
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path} is not a folder; pass a run folder such as runs/20261125-120000-fast")
    config = read_json(path / CONFIG)
    _check_config(path, config)
    recipe = recipe_from_config(path, config)
    return Run(path=path, config=config, recipe=recipe)
