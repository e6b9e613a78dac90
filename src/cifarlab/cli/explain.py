"""`cifarlab explain`: saliency maps (Grad-CAM, integrated gradients) of a run's decisions on image files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cifarlab.cli.common import fmt

# The one-line help `cifarlab --help` lists (read without building this command's parser).
HELP = "saliency maps (Grad-CAM, integrated gradients): which pixels a run's prediction rests on"


def _steps(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"must be from 1 to 1024, got {value}")
    return value


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "explain",
        help=HELP,
        **fmt(
            "Decode images exactly like `cifarlab predict` (files and folders), classify them in eval mode\n"
            "(float32, no TTA), and compute a saliency map per image and method with Captum: Grad-CAM on the\n"
            "last convolution, or integrated gradients from a black image. Writes <stem>.<method>.png per\n"
            "image and method into --out (default RUN_DIR/explain/): the image as the model sees it beside\n"
            "the map drawn over it, titled with the class explained and its probability. A file that cannot\n"
            "be read gets an error line and the others are still explained. Exit status 0 when at least one\n"
            "image was explained, else 1. Needs the extra: pip install 'cifarlab[explain]'.",
            "cifarlab explain runs/20260101-120000-fast photos/cat.jpg --method both --out maps/",
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (runs/<time>-<recipe>)")
    p.add_argument("paths", type=Path, nargs="+", metavar="IMAGE", help="image files and/or folders")
    p.add_argument(
        "--method",
        choices=("gradcam", "integrated_gradients", "both"),
        default="gradcam",
        help="gradcam (default), integrated_gradients, or both (one PNG each)",
    )
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="where the PNGs go (default RUN_DIR/explain/)")
    p.add_argument(
        "--target",
        default=None,
        metavar="CLASS",
        help="explain this class (a name or an index) instead of each image's predicted class",
    )
    p.add_argument("--steps", type=_steps, default=32, help="integrated-gradients steps, 1 to 1024 (default: 32)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from cifarlab.explain import explain_paths, format_explain_table
    from cifarlab.inference import set_threads

    set_threads()
    methods = ("gradcam", "integrated_gradients") if args.method == "both" else (args.method,)
    rows = explain_paths(
        args.run_dir,
        args.paths,
        methods=methods,
        out_dir=args.out,
        target=args.target,
        steps=args.steps,
        device=args.device,
    )
    print(format_explain_table(rows))
    n_ok = sum("written" in r for r in rows)
    n_bad = len(rows) - n_ok
    print(f"{n_ok} written" + (f", {n_bad} failed" if n_bad else ""), file=sys.stderr)
    return 0 if n_ok else 1
