"""`cifarlab export`: export a run's model to ONNX or TorchScript."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cifarlab.cli.common import fmt, warn

# The one-line help `cifarlab --help` lists (read without building this command's parser).
HELP = "export a run's model to ONNX or TorchScript"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help=HELP,
        **fmt(
            "Export a run's model with its preprocessing inside: input NCHW images at the run's size and\n"
            "channels (32x32 RGB for CIFAR-10), values 0..255 (ONNX: uint8; TorchScript: uint8 or float),\n"
            "dynamic batch size, output softmax probabilities. Class names, the input spec, normalization,\n"
            "recipe and version are stored in the file's metadata. Default output: RUN_DIR/model.onnx or\n"
            "RUN_DIR/model.torchscript.pt.",
            "cifarlab export runs/20260101-120000-fast --format onnx",
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run folder (runs/<time>-<recipe>)")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="default: onnx")
    p.add_argument(
        "--out",
        type=str,  # not Path, which drops the trailing slash that names a folder
        default=None,
        metavar="PATH",
        help="output file; a folder (existing, or written with a trailing /) gets model.onnx or "
        "model.torchscript.pt inside",
    )
    p.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    from cifarlab.export import export, output_path
    from cifarlab.runs import load_run

    run = load_run(args.run_dir)  # a damaged run folder fails here, before anything is written
    c, h, w = run.input_shape
    at = f" at the run's temperature {run.temperature:.3g}" if run.temperature != 1.0 else ""
    replacing = output_path(args.run_dir, args.out, args.format).is_file()  # refuses a run's own files first
    out = export(args.run_dir, args.format, args.out)
    expected = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".torchscript")}[args.format]
    if out.suffix.lower() not in expected:  # written as asked; a tool that goes by the suffix would misread it
        warn(f"{out} holds a {args.format} model, though its name ends in {out.suffix or 'no suffix'!r}")
    dtype = "uint8" if args.format == "onnx" else "uint8 or float"
    color = {1: "grayscale", 3: "RGB"}.get(c, f"{c}-channel")
    print(
        f"{'replaced' if replacing else 'wrote'} {out} ({out.stat().st_size / 1e6:.2f} MB, {args.format}): input "
        f"{dtype} NCHW {h}x{w} {color} 0..255, dynamic batch; output softmax probabilities{at}; class names and "
        "preprocessing in metadata"
    )
    return 0
