"""`cifarlab evaluate` and `cifarlab report`: evaluate a saved run again, rebuild its report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction, fmt, data_dir_arg) -> None:
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

    p = sub.add_parser(
        "report",
        help="rebuild a run's report (report.html, report.md, plots/, metrics.json)",
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cifarlab.evaluate import evaluate_run, format_summary
    from cifarlab.inference import set_threads
    from cifarlab.runs import write_json

    set_threads()
    ev, _ = evaluate_run(args.run_dir, split=args.split, data_dir=args.data_dir)
    out = Path(args.run_dir) / f"eval_{args.split}.json"
    write_json(out, ev)
    if args.json:
        print(json.dumps(ev, indent=2))
    else:
        print(format_summary(ev))
        print(f"\nwritten: {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cifarlab.inference import set_threads
    from cifarlab.report import build_report, report_paths

    set_threads()
    metrics = build_report(args.run_dir, data_dir=args.data_dir, split=args.split)
    ev = metrics["evaluation"]
    print(
        f"{args.split} accuracy {ev['accuracy']:.2%}, top-{ev['top_k']} {ev['top5_accuracy']:.2%}, "
        f"ECE {ev['calibration']['ece']:.2%}"
    )
    for path in report_paths(args.run_dir):
        print(path)
    return 0
