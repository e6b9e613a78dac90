"""`cifarlab evaluate`: evaluate a saved run again and print (and save) every number."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from cifarlab.cli.common import data_dir_arg, fmt, print_error, warn


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a saved run: accuracy, top-5, loss, per-class metrics, confusions, calibration",
        **fmt(
            "Load a run's weights and config, predict its test split (or its reproduced validation split) in eval\n"
            "mode, and print accuracy, top-5 accuracy, loss, expected calibration error, the per-class table\n"
            "(precision, recall, F1, support) and each class's most frequent confusions. Writes\n"
            "RUN_DIR/eval_<split>.json with every number (confusion matrices, calibration bins, ...).",
            "cifarlab evaluate runs/20261125-120000-reference --split val --data-dir ../shared/data",
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder written by cifarlab train")
    p.add_argument(
        "--split",
        choices=("test", "val"),
        default="test",
        help="test (default) or val: the run's validation split, reproduced from its config",
    )
    data_dir_arg(p)
    p.add_argument("--json", action="store_true", help="print the evaluation as JSON instead of the summary")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate, warn first when the data is not the run's, print, then save eval_<split>.json.

    The results are printed before saving: a folder that cannot be written (read-only, full disk) costs the
    file, not the numbers; the reason is then one line and the exit status 1."""
    from cifarlab.evaluate import dataset_warning, evaluate_run, format_summary
    from cifarlab.files import write_json
    from cifarlab.inference import set_threads

    set_threads()
    ev, _ = evaluate_run(args.run_dir, split=args.split, data_dir=args.data_dir)
    warning = dataset_warning(ev)
    if warning:
        warn(warning)
    data = ev.to_dict()
    if args.json:
        print(json.dumps(data, indent=2), flush=True)
    else:
        print(format_summary(ev), flush=True)
    out = Path(args.run_dir) / f"eval_{args.split}.json"
    try:
        write_json(out, data)
    except OSError as exc:
        print_error(f"results not saved: cannot write {out}: {exc.strerror or exc}")
        return 1
    if not args.json:
        print(f"\nwritten: {out}")
    return 0
