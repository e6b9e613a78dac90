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
            "dynamic batch size, output softmax probabilities, with the run's test-time augmentation inside\n"
            "(as its test accuracy, evaluate, predict and serve use it; --tta none: the bare model, one\n"
            "forward pass). Class names, the input spec, normalization, the TTA, recipe and version are\n"
            "stored in the file's metadata. Default output: RUN_DIR/model.onnx or RUN_DIR/model.torchscript.pt.",
            "cifarlab export runs/20260101-120000-fast --format onnx\n"
            "  cifarlab export runs/20260101-120000-fast --tta none --out exports/fast-1view.onnx",
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
        "model.torchscript.pt inside; missing parent folders are created (the output says so)",
    )
    p.add_argument(
        "--tta",
        choices=("recipe", "none", "flip", "flip_translate"),
        default="recipe",
        help="test-time augmentation in the graph: the run's recipe's (default), none (one forward pass), flip "
        "(2 passes) or flip_translate (6)",
    )
    p.set_defaults(func=cmd_export)


def _tta_words(tta: str, recipe_tta: str) -> str:
    """What the summary line says about the graph's TTA, next to the recipe's."""
    import torch

    from cifarlab.inference import tta_views

    if tta == "none":
        return "" if recipe_tta == "none" else f" without TTA (the run evaluates with TTA {recipe_tta})"
    views = sum(1 for _ in tta_views(torch.zeros(1, 1, 2, 2), tta))
    as_run = "as the run evaluates" if tta == recipe_tta else f"the run evaluates with TTA {recipe_tta}"
    return f" of TTA {tta} ({views} forward passes, {as_run})"


def _missing_folder(folder: Path) -> Path | None:
    """The outermost folder of `folder` that does not exist yet (export creates it, and says so), else None."""
    if folder.exists():
        return None
    while not folder.parent.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def cmd_export(args: argparse.Namespace) -> int:
    from cifarlab.export import export, output_path, read_export_metadata, resolve_tta
    from cifarlab.runs import load_run

    run = load_run(args.run_dir)  # a damaged run folder fails here, before anything is written
    c, h, w = run.input_shape
    at = f" at the run's temperature {run.temperature:.3g}" if run.temperature != 1.0 else ""
    tta = resolve_tta(run, args.tta)
    # Before output_path, which creates the folder --out names (a trailing /) or its parent.
    made = _missing_folder(Path(args.out) if args.out.endswith("/") else Path(args.out).parent) if args.out else None
    target = output_path(args.run_dir, args.out, args.format)  # refuses a run's own files first
    replacing = target.is_file()
    owner = (read_export_metadata(target, args.format) or {}).get("run") if replacing else None
    out = export(args.run_dir, args.format, args.out, tta=tta)
    expected = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".torchscript")}[args.format]
    if out.suffix.lower() not in expected:  # written as asked; a tool that goes by the suffix would misread it
        kind = {"onnx": "an ONNX", "torchscript": "a TorchScript"}[args.format]
        name = f"ends in {out.suffix!r}, not {expected[0]}" if out.suffix else f"has no {expected[0]} suffix"
        warn(f"{out} holds {kind} model, though its name {name}")
    dtype = "uint8" if args.format == "onnx" else "uint8 or float"
    color = {1: "grayscale", 3: "RGB"}.get(c, f"{c}-channel")
    # Replacing another run's export outside its run folder is allowed (a deployment path updated), but said.
    was = f" (it held run {owner}'s export)" if owner and owner != run.path.resolve().name else ""
    if made is not None:
        was += f" (created the folder {made})"
    print(
        f"{'replaced' if replacing else 'wrote'} {out}{was} ({out.stat().st_size / 1e6:.2f} MB, {args.format}): "
        f"input {dtype} NCHW {h}x{w} {color} 0..255, dynamic batch; output softmax probabilities"
        f"{_tta_words(tta, run.recipe.tta)}{at}; class names and preprocessing in metadata"
    )
    return 0
