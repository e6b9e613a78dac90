"""`cifarlab runs`: list run folders with recipe, status, test accuracy, epochs and wall time."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, TypeGuard

from cifarlab.cli.common import fmt, folder_path, printable
from cifarlab.errors import UserError

DAMAGED = "damaged"
_STAMP = re.compile(r"^\d{8}-\d{6}")


# The one-line help `cifarlab --help` lists (read without building this command's parser).
HELP = "list run folders: recipe, status, test accuracy, epochs, wall time"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "runs",
        help=HELP,
        **fmt(
            "List the run folders under --root, newest first: recipe, status (running, finished,\n"
            "stopped, crashed, damaged; pruned and complete for tune's trials), test accuracy, epochs and\n"
            "wall time. A run whose status says running but whose process is gone shows as crashed; one\n"
            "stopped or crashed before its first epoch ended is marked '(no epoch)': nothing to resume.\n"
            "Unreadable files show as damaged; other folders are skipped.",
            "cifarlab runs --root runs",
        ),
    )
    p.add_argument(
        "--root",
        "--runs-dir",  # the name `cifarlab train` gives the same folder
        dest="root",
        type=folder_path,
        default=Path("runs"),
        help="folder of run folders, as given to train --runs-dir (default: runs)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=cmd_runs)


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
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
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
    except (OSError, OverflowError):  # OverflowError: a pid beyond the C type (a hand-edited status.json)
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


def _number(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # (bool is an int)


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
    if recipe is not None and not isinstance(recipe, str):
        recipe = DAMAGED
    # The data it trained on: runs of several image folders (or datasets) are told apart by it.
    dataset: Any = None
    if config == DAMAGED:
        dataset = DAMAGED
    elif isinstance(config, dict) and "dataset" in config:
        d = config["dataset"]
        dataset = d.get("name") if isinstance(d, dict) else DAMAGED
        if dataset is not None and not isinstance(dataset, str):
            dataset = DAMAGED
    m = metrics if isinstance(metrics, dict) else {}
    h = history if isinstance(history, list) else []
    # A value of the wrong type (a hand-edited or foreign file) shows as damaged in its own cell, not a crash.
    accuracy: Any = m.get("test_accuracy")
    if metrics == DAMAGED or (accuracy is not None and not _number(accuracy)):
        accuracy = DAMAGED
    epochs = m.get("epochs_run", len(h) if h else None)
    if epochs is not None and not (isinstance(epochs, int) and not isinstance(epochs, bool)):
        epochs = DAMAGED
    timings: dict[str, Any] = m["timings"] if isinstance(m.get("timings"), dict) else {}
    # A resumed run's total_seconds is its last process only; its sessions' sum covers every process.
    walls = [float(t) for t in (timings.get("total_seconds"), timings.get("sessions_total_seconds")) if _number(t)]
    wall: float | None = max(walls) if walls else None
    if wall is None and h:  # unfinished run: the epochs' own time is the best we know
        wall = sum(float(r["epoch_seconds"]) for r in h if isinstance(r, dict) and _number(r.get("epoch_seconds")))
    state = _status(status, metrics)
    return {
        "name": path.name,
        "path": str(path),
        "recipe": recipe,
        "dataset": dataset,
        "status": state,
        # `cifarlab train --resume` continues it: stopped or crashed after its first checkpoint (an epoch)
        "resumable": state in ("stopped", "crashed") and (path / "checkpoint.pt").is_file(),
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


def _unresumable(r: dict[str, Any]) -> bool:
    """Stopped or crashed before its first epoch ended: nothing to resume (--resume refuses it). (A tune trial keeps
    no checkpoint either, but its epochs say it ran: an interrupted trial is re-queued, not resumed.)"""
    return r["status"] in ("stopped", "crashed") and not r.get("resumable", True) and not r.get("epochs")


def format_runs(rows: list[dict[str, Any]]) -> str:
    """The `cifarlab runs` table; names are shown with control characters escaped."""

    def acc(v: Any) -> str:
        return f"{100 * v:.2f}%" if isinstance(v, (int, float)) else (v or "-")

    table = [("run", "recipe", "data", "status", "test acc", "epochs", "wall time")]
    for r in rows:
        table.append(
            (
                printable(r["name"]),  # folder names and recipe names are data: no escape sequences
                printable(r["recipe"] or "-"),
                printable(r.get("dataset") or "-"),
                printable(r["status"] + (" (no epoch)" if _unresumable(r) else "")),
                acc(r["test_accuracy"]),
                str(r["epochs"]) if r["epochs"] is not None else "-",
                _fmt_seconds(r["wall_seconds"]),
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    right = {4, 5, 6}
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
    elif not rows and (Path(args.root) / "config.json").is_file():
        # The folder of one run, not the folder holding runs: list its parent, which holds it.
        print(f"{printable(args.root)} is a run folder; its runs folder is {printable(Path(args.root).parent)}:")
        print(format_runs(list_runs(Path(args.root).parent)))
    elif not rows:
        print(f"no runs in {printable(args.root)}")
    else:
        print(format_runs(rows))
    return 0
