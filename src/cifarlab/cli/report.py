"""`cifarlab report`: evaluate a saved run again and rewrite its report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from cifarlab.cli.common import data_dir_arg, fmt, printable, warn

# The one-line help `cifarlab --help` lists (read without building this command's parser).
HELP = "rebuild a run's report (report.html, report.md, plots/, metrics.json)"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help=HELP,
        **fmt(
            "Evaluate a run again and rewrite its report: report.html (self-contained, opens in any browser),\n"
            "report.md with plots/*.png, and the evaluation merged into metrics.json (training's keys are kept).",
            "cifarlab report runs/20261125-120000-reference --data-dir ../shared/data",
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder written by cifarlab train")
    p.add_argument("--split", choices=("test", "val"), default="test", help="split to evaluate (default test)")
    data_dir_arg(p)
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """Evaluate, warn first when the data is not the run's, then write the report.

    A file that cannot be written (full disk, read-only folder) is a `ReportWriteError`: one error line
    naming the file, exit status 2, and the old file left as it was."""
    from cifarlab.evaluate import dataset_warning, evaluate_run
    from cifarlab.inference import set_threads
    from cifarlab.report import report_paths, write_report

    set_threads()
    _set_aside_damaged(args.run_dir)
    t0 = time.perf_counter()
    ev, preds = evaluate_run(args.run_dir, split=args.split, data_dir=args.data_dir)
    warning = dataset_warning(ev)
    if warning:
        warn(warning)
    write_report(ev, preds, evaluate_seconds=time.perf_counter() - t0)
    top_k = f", top-{ev.top_k} {ev.top5:.2%}" if ev.top_k_informative else ""  # not 100% by construction
    print(f"{args.split} accuracy {ev.accuracy:.2%}{top_k}, ECE {ev.calibration.ece:.2%}")
    for path in report_paths(args.run_dir):
        print(printable(path))
    return 0


def _set_aside_damaged(run_dir: Path) -> None:
    """A damaged metrics.json or history.json would stop the report that rebuilds metrics.json: keep it as
    FILE.damaged (nothing is deleted) and report without it."""
    from cifarlab.errors import UserError
    from cifarlab.runs import load_run

    run = load_run(run_dir)  # a property that fails to read caches nothing: each is read once here
    for name, what in (("metrics", "training's timings and summary"), ("history", "training curves")):
        try:
            getattr(run, name)
        except UserError as e:
            damaged = Path(run_dir) / f"{name}.json"
            kept = damaged.with_name(damaged.name + ".damaged")
            damaged.replace(kept)
            warn(f"{e}: kept as {kept.name}; the report goes on without the {what}")
