"""`cifarlab explain`: saliency maps (Grad-CAM, integrated gradients) of a run's decisions on image files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cifarlab.cli.common import fmt

# The one-line help `cifarlab --help` lists (read without building this command's parser).
HELP = "saliency maps (Grad-CAM, integrated gradients): which pixels a run's prediction rests on"


def steps_count(text: str) -> int:
    """--steps: an integer from 1 to 1024 (the error names the rule, not this function)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to 1024, got {text!r}")
    return value


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "explain",
        help=HELP,
        **fmt(
            "Decode images exactly like `cifarlab predict` (files and folders), classify them in eval mode\n"
            "(float32, no TTA), and compute a saliency map per image and method with Captum: Grad-CAM on the\n"
            "last convolution, or integrated gradients from a black image. Writes <name>.<method>.png per\n"
            "image and method into --out (default RUN_DIR/explain/): the image as the model sees it beside\n"
            "the map drawn over it, titled with the class explained and its probability. <name> is the\n"
            "file's stem, prefixed with its folder's name when the images come from several folders\n"
            "(cat-0000), with -2, -3, ... when still taken; a PNG that replaces one from an earlier run is\n"
            "marked so. Images are explained in batches, so memory does not grow with their number. A file\n"
            "that cannot be read gets an error line and the others are still explained. Exit status 0 when\n"
            "at least one image was explained, else 1. Needs the extra: pip install 'cifarlab[explain]'.",
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
    p.add_argument(
        "--steps",
        type=steps_count,
        default=None,
        help="integrated-gradients steps, 1 to 1024 (default: 32); not used by gradcam",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, ...")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args: argparse.Namespace) -> int:
    from cifarlab.explain import check_out_dir, explain_paths, explain_summary, format_explain_table
    from cifarlab.inference import set_threads

    set_threads()
    methods = ("gradcam", "integrated_gradients") if args.method == "both" else (args.method,)
    if args.out is not None:
        check_out_dir(args.out)  # before the run or any image is loaded
    if args.steps is not None and "integrated_gradients" not in methods:
        print("warning: --steps is for integrated_gradients; gradcam does not use it", file=sys.stderr)
    rows = explain_paths(
        args.run_dir,
        args.paths,
        methods=methods,
        out_dir=args.out,
        target=args.target,
        steps=32 if args.steps is None else args.steps,
        device=args.device,
    )
    print(format_explain_table(rows))
    print(explain_summary(rows), file=sys.stderr)
    return 0 if any("written" in r for r in rows) else 1
