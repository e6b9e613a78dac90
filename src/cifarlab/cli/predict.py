"""`cifarlab predict`: classify image files and folders with a trained run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cifarlab.cli.common import fmt

# The one-line help `cifarlab --help` lists (read without building this command's parser).
HELP = "classify image files and folders with a trained run"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "predict",
        help=HELP,
        **fmt(
            "Classify images (PNG, JPEG, WebP, BMP, GIF, TIFF, PPM/PGM; any size; grayscale, RGBA, paletted)\n"
            "and folders of them (searched recursively) with a run's model, preprocessed exactly as its\n"
            "training data. Prints the top-k classes with probabilities; a file that cannot be read gets an\n"
            "error line and the others are still classified. Exit status 0 when at least one image was\n"
            "classified, else 1; 2 when RUN_DIR is not a usable run folder.",
            "cifarlab predict runs/20260101-120000-fast photos/cat.jpg photos/more/ --top-k 3",
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (runs/<time>-<recipe>)")
    p.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="image files and/or folders")
    p.add_argument("--top-k", type=int, default=3, help="how many classes to show per image (default: 3)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default=None,
        help="what to compute in (default: the run's recipe's, as its test accuracy was measured; auto: bf16 where "
        "the CPU/GPU has it); fp32 gives the probabilities an export gives, to float rounding",
    )
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from cifarlab.predict import format_table, predict_paths

    results = predict_paths(args.run_dir, args.paths, top_k=args.top_k, device=args.device, precision=args.precision)
    n_ok = sum("top_k" in r for r in results)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(format_table(results), flush=True)  # file and class names are escaped by format_table
        n_bad = len(results) - n_ok
        print(f"{n_ok} classified" + (f", {n_bad} failed" if n_bad else ""), file=sys.stderr)
    return 0 if n_ok else 1
