"""`cifarlab runs`, `cifarlab predict`, `cifarlab export`: the commands around a trained run."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cifarlab.errors import UserError

DAMAGED = "damaged"
_STAMP = re.compile(r"^\d{8}-\d{6}")


def add_commands(sub: argparse._SubParsersAction, fmt: Callable[..., dict], data_dir_arg: Callable) -> None:
    p = sub.add_parser(
        "runs",
        help="list run folders: recipe, status, test accuracy, epochs, wall time",
        **fmt(
            "List the run folders under --root, newest first: recipe, status (running, finished,\n"
            "stopped, crashed), test accuracy, epochs and wall time. A run whose status says running but\n"
            "whose process is gone shows as crashed; unreadable files show as damaged; other folders are\n"
            "skipped.",
            "cifarlab runs --root runs",
        ),
    )
    p.add_argument("--root", type=Path, default=Path("runs"), help="folder of run folders (default: runs)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser(
        "predict",
        help="classify image files and folders with a trained run",
        **fmt(
            "Classify images (PNG, JPEG, WebP, BMP, GIF, TIFF; any size; grayscale, RGBA, paletted) and\n"
            "folders of them (searched recursively) with a run's model, preprocessed exactly as its\n"
            "training data. Prints the top-k classes with probabilities; a file that cannot be read gets an\n"
            "error line and the others are still classified. Exit status 0 when at least one image was\n"
            "classified, else 1.",
            "cifarlab predict runs/20260101-120000-fast photos/cat.jpg photos/more/ --top-k 3",
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (runs/<time>-<recipe>)")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="image files and/or folders")
    p.add_argument("--top-k", type=int, default=3, help="how many classes to show per image (default: 3)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "export",
        help="export a run's model to ONNX or TorchScript",
        **fmt(
            "Export a run's model with its preprocessing inside: input NCHW 32x32 RGB images with values\n"
            "0..255 (ONNX: uint8; TorchScript: uint8 or float), dynamic batch size, output softmax\n"
            "probabilities. Class names, the input spec, normalization, recipe and version are stored in\n"
            "the file's metadata. Default output: RUN_DIR/model.onnx or RUN_DIR/model.torchscript.pt.",
            "cifarlab export runs/20260101-120000-fast --format onnx",
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (runs/<time>-<recipe>)")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="default: onnx")
    p.add_argument("--out", type=Path, default=None, metavar="PATH", help="output file (or folder)")
    p.set_defaults(func=cmd_export)

    from cifarlab import config

    p = sub.add_parser(
        "config",
        help="print a resolved recipe (--recipe, --config, --set) without training",
        **fmt(
            "Resolve and validate a recipe exactly as `cifarlab train` would (base recipe, then --config,\n"
            "then each --set) and print it as YAML, marking the keys that differ from the base recipe.\n"
            "The output is itself a valid --config file. Nothing is loaded or trained.",
            "cifarlab config --recipe reference --set lr=2e-3 --set widths=32,64,64",
        ),
    )
    config.add_recipe_args(p)
    data_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p.set_defaults(func=cmd_config)


# -- runs ----------------------------------------------------------------------------------------------------


def _read(path: Path) -> Any:
    """Parsed JSON, None when the file is missing, DAMAGED when it cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return DAMAGED


def _proc_start_time(pid: int) -> float | None:
    """Unix time a process started (Linux /proc), None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 overall: starttime in clock ticks since boot
        btime = next(
            int(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def pid_alive(pid: Any, since: str | None = None) -> bool:
    """Whether process `pid` exists and (where /proc tells) started before `since` (the status time): a
    recycled PID that now belongs to another process does not keep a dead run 'running'."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    except OSError:
        return False
    if since:
        try:
            t = time.mktime(time.strptime(since, "%Y-%m-%dT%H:%M:%S"))
        except (ValueError, OverflowError):
            return True
        started = _proc_start_time(pid)
        if started is not None and started > t + 2:
            return False
    return True


def _status(status: Any, metrics: Any) -> str:
    if status == DAMAGED or (status is not None and not isinstance(status, dict)):
        return DAMAGED
    if isinstance(status, dict):
        s = status.get("status")
        if s == "running" and not pid_alive(status.get("pid"), status.get("time")):
            return "crashed"
        return str(s) if s else DAMAGED
    if isinstance(metrics, dict) and metrics.get("status"):
        return str(metrics["status"])
    return "unknown"


def run_info(path: Path) -> dict[str, Any] | None:
    """One row of `cifarlab runs`; None when `path` is not a run folder (no config.json nor status.json)."""
    if not path.is_dir() or not ((path / "config.json").exists() or (path / "status.json").exists()):
        return None
    config, status, metrics = (_read(path / n) for n in ("config.json", "status.json", "metrics.json"))
    history = _read(path / "history.json")
    recipe: Any = None
    if config == DAMAGED:
        recipe = DAMAGED
    elif isinstance(config, dict):
        r = config.get("recipe")
        recipe = r.get("name") if isinstance(r, dict) else DAMAGED
    m = metrics if isinstance(metrics, dict) else {}
    h = history if isinstance(history, list) else []
    accuracy: Any = m.get("test_accuracy")
    if metrics == DAMAGED:
        accuracy = DAMAGED
    epochs = m.get("epochs_run", len(h) if h else None)
    timings = m.get("timings") if isinstance(m.get("timings"), dict) else {}
    wall = timings.get("total_seconds")
    if wall is None and h:  # unfinished run: the epochs' own time is the best we know
        wall = sum(float(r.get("epoch_seconds") or 0) for r in h if isinstance(r, dict))
    return {
        "name": path.name,
        "path": str(path),
        "recipe": recipe,
        "status": _status(status, metrics),
        "test_accuracy": accuracy,
        "epochs": epochs,
        "wall_seconds": wall,
    }


def list_runs(root: Path | str) -> list[dict[str, Any]]:
    """Rows for every run folder directly under `root`, newest first."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root} is not a folder; pass --root with the folder holding your runs")
    rows = []
    for p in root.iterdir():
        if p.name.startswith("."):
            continue
        info = run_info(p)
        if info is not None:
            # Names start with YYYYmmdd-HHMMSS; other names sort by modification time.
            mtime = time.localtime(p.stat().st_mtime)
            stamp = p.name if _STAMP.match(p.name) else time.strftime("%Y%m%d-%H%M%S", mtime)
            rows.append((stamp, p.name, info))
    rows.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [info for *_, info in rows]


def _fmt_seconds(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def format_runs(rows: list[dict[str, Any]]) -> str:
    def acc(v: Any) -> str:
        return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else (v or "-")

    table = [("run", "recipe", "status", "test acc", "epochs", "wall time")]
    for r in rows:
        table.append(
            (
                r["name"],
                str(r["recipe"] or "-"),
                r["status"],
                acc(r["test_accuracy"]),
                str(r["epochs"]) if r["epochs"] is not None else "-",
                _fmt_seconds(r["wall_seconds"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    right = {3, 4, 5}
    lines = []
    for row in table:
        pairs = enumerate(zip(row, widths, strict=True))
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in pairs]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def cmd_runs(args: argparse.Namespace) -> int:
    rows = list_runs(args.root)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no runs in {args.root}")
    else:
        print(format_runs(rows))
    return 0


# -- predict -------------------------------------------------------------------------------------------------


def cmd_predict(args: argparse.Namespace) -> int:
    from cifarlab.predict import format_table, predict_paths

    results = predict_paths(args.run_dir, args.paths, top_k=args.top_k, device=args.device)
    n_ok = sum("top_k" in r for r in results)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results))
        n_bad = len(results) - n_ok
        print(f"{n_ok} classified" + (f", {n_bad} failed" if n_bad else ""), file=sys.stderr)
    return 0 if n_ok else 1


# -- export --------------------------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    from cifarlab.export import export

    out = export(args.run_dir, args.format, args.out)
    dtype = "uint8" if args.format == "onnx" else "uint8 or float"
    print(
        f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {args.format}): input {dtype} NCHW 32x32 RGB "
        "0..255, dynamic batch; output softmax probabilities; class names and preprocessing in metadata"
    )
    return 0


# -- config -------------------------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from cifarlab import config
    from cifarlab.recipes import DEFAULT_RECIPE, get_recipe

    recipe = config.recipe_from_args(args)
    d = recipe.to_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    file_recipe = config.load_config_file(args.config).get("recipe") if args.config else None
    base_name = args.recipe or file_recipe or DEFAULT_RECIPE
    base = get_recipe(base_name).to_dict()
    print(f"recipe: {base_name}")
    for key, value in d.items():
        if key == "name" and value == base_name:
            continue
        # One flow-style line per key: the whole output is itself a valid --config file.
        line = yaml.safe_dump({key: value}, default_flow_style=True, width=10_000, sort_keys=False)
        line = line.strip()[1:-1]
        if base.get(key) != value:
            line += f"  # {base_name}: {json.dumps(base.get(key))}"
        print(line)
    return 0
