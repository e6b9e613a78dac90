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
DEFAULT_ROOT = Path("runs")  # where `cifarlab train` puts run folders by default
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
            'Unreadable files show as damaged (--json: null, the file listed under "damaged"); other\n'
            "folders are skipped.",
            "cifarlab runs --root runs",
        ),
    )
    p.add_argument(
        "--root",
        "--runs-dir",  # the name `cifarlab train` gives the same folder
        dest="root",
        type=folder_path,
        default=None,  # None: runs, which need not exist yet (no training so far)
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


def _status_time(since: Any) -> float | None:
    """status.json's `time` (local, as `write_status` writes it) as a Unix time; None when it does not parse."""
    if not isinstance(since, str):
        return None
    try:
        return time.mktime(time.strptime(since, "%Y-%m-%dT%H:%M:%S"))
    except (ValueError, OverflowError):
        return None


def pid_alive(pid: Any, since: str | None = None) -> bool:
    """Whether process `pid` exists and (where /proc tells) started before `since` (the status time): a
    recycled PID that now belongs to another process does not keep a dead run 'running'. A `since` that does not
    parse (a hand-edited file) cannot vouch for the process: not alive."""
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
    if since is not None:
        t = _status_time(since)
        if t is None:
            return False
        started = _proc_start_time(pid)
        if started is not None and started > t + 2:
            return False
    return True


# The statuses `cifarlab runs` shows (its --help and the README list them); anything else a status file holds is
# shown as damaged, not verbatim.
STATUSES = ("running", "finished", "stopped", "crashed", DAMAGED, "pruned", "complete")
# What `cifarlab tune` writes for a trial whose training diverged or whose worker died: crashed runs, by the
# meaning `cifarlab train` gives the word (its own diverged runs are marked crashed).
_CRASHED_ALIASES = ("diverged", "killed")


def _status(status: Any, metrics: Any) -> str:
    """The row's status; DAMAGED for a status file that is unreadable, not an object, missing its status (and
    metrics.json has none), or holding a value outside STATUSES."""
    if isinstance(status, dict):
        s = status.get("status")
        if s == "running":
            if _status_time(status.get("time")) is None:  # cannot tell a live run from a recycled PID
                return DAMAGED
            if not pid_alive(status.get("pid"), status.get("time")):
                return "crashed"
    elif status is None and isinstance(metrics, dict):
        s = metrics.get("status")  # a folder without status.json (an earlier version's run)
    else:
        return DAMAGED
    if s in _CRASHED_ALIASES:
        return "crashed"
    return s if isinstance(s, str) and s in STATUSES else DAMAGED


def _number(v: Any) -> TypeGuard[float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # (bool is an int)


def _object(value: Any) -> dict[str, Any] | None:
    """A JSON file's content when it is an object; None otherwise (missing, unparsable, or another type)."""
    return value if isinstance(value, dict) else None


def run_info(path: Path) -> dict[str, Any] | None:
    """One row of `cifarlab runs`; None when `path` is not a run folder (no config.json nor status.json).

    Each field keeps its type (a string, a number or null); `damaged` lists the files that are present but
    unreadable, not a JSON object, or hold a value of the wrong type, so a script can sort and compute on the rest.
    """
    if not path.is_dir() or not ((path / "config.json").exists() or (path / "status.json").exists()):
        return None
    raw = {n: _read(path / n) for n in ("config.json", "status.json", "metrics.json", "history.json")}
    damaged: list[str] = [
        # present but not what it should be: a parse failure, or JSON of another type
        n
        for n, v in raw.items()
        if v is not None and not isinstance(v, list if n == "history.json" else dict)
    ]

    def mark(name: str) -> None:
        if name not in damaged:
            damaged.append(name)

    config, metrics = _object(raw["config.json"]), _object(raw["metrics.json"])
    h = raw["history.json"] if isinstance(raw["history.json"], list) else []
    recipe: str | None = None
    dataset: str | None = None  # the data it trained on: runs of several image folders are told apart by it
    if config is not None:
        r = config.get("recipe")
        recipe = r.get("name") if isinstance(r, dict) else None
        if not isinstance(recipe, str):
            recipe = None
            mark("config.json")
        if "dataset" in config:
            d = config["dataset"]
            name = d.get("name") if isinstance(d, dict) else None
            if isinstance(name, str):
                dataset = name
            elif not (isinstance(d, dict) and name is None):  # a section without a name is an older run's
                mark("config.json")
    m = metrics or {}
    # A value of the wrong type (a hand-edited or foreign file) is null and its file listed, not a crash.
    accuracy: float | None = m.get("test_accuracy")
    if accuracy is not None and not _number(accuracy):
        accuracy = None
        mark("metrics.json")
    epochs: int | None = m.get("epochs_run", len(h) if h else None)
    if epochs is not None and not (isinstance(epochs, int) and not isinstance(epochs, bool)):
        epochs = None
        mark("metrics.json")
    timings: dict[str, Any] = m["timings"] if isinstance(m.get("timings"), dict) else {}
    # A resumed run's total_seconds is its last process only; its sessions' sum covers every process.
    given = [timings.get("total_seconds"), timings.get("sessions_total_seconds")]
    if ("timings" in m and not isinstance(m["timings"], dict)) or any(t is not None and not _number(t) for t in given):
        mark("metrics.json")
    walls = [float(t) for t in given if _number(t)]
    wall: float | None = max(walls) if walls else None
    if wall is None and h:  # unfinished run: the epochs' own time is the best we know
        wall = sum(float(r["epoch_seconds"]) for r in h if isinstance(r, dict) and _number(r.get("epoch_seconds")))
    state = _status(raw["status.json"], metrics)
    if state == DAMAGED:
        mark("status.json")
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
        "damaged": sorted(damaged),
    }


def list_runs(root: Path | str) -> list[dict[str, Any]]:
    """Rows for every run folder directly under `root`, newest first."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"no such folder: {root}; pass --root with the folder holding your runs")
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


# The files each column's value comes from: a missing value is shown as damaged when one of them is.
_FILES_OF = {
    "recipe": ("config.json",),
    "dataset": ("config.json",),
    "test_accuracy": ("metrics.json",),
    "epochs": ("metrics.json", "history.json"),
    "wall_seconds": ("metrics.json", "history.json"),
}


def format_runs(rows: list[dict[str, Any]]) -> str:
    """The `cifarlab runs` table; names are shown with control characters escaped."""

    def cell(r: dict[str, Any], key: str, shown: str) -> str:
        """`shown`; for a missing value, `damaged` where the file it comes from is damaged, else '-'."""
        if r[key] is not None:
            return shown
        return DAMAGED if any(f in r.get("damaged", ()) for f in _FILES_OF[key]) else "-"

    table = [("run", "recipe", "data", "status", "test acc", "epochs", "wall time")]
    for r in rows:
        acc = r["test_accuracy"]
        table.append(
            (
                printable(r["name"]),  # folder names and recipe names are data: no escape sequences
                printable(cell(r, "recipe", str(r["recipe"]))),
                printable(cell(r, "dataset", str(r.get("dataset")))),
                printable(r["status"] + (" (no epoch)" if _unresumable(r) else "")),
                cell(r, "test_accuracy", f"{100 * acc:.2f}%" if _number(acc) else "-"),
                cell(r, "epochs", str(r["epochs"])),
                cell(r, "wall_seconds", _fmt_seconds(r["wall_seconds"])),
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
    if args.root is None:
        args.root = DEFAULT_ROOT
        if not args.root.exists() and not args.root.is_symlink():  # a fresh checkout: nothing trained yet
            print("[]" if args.json else f"no runs yet ({args.root}/ does not exist)")
            return 0
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
