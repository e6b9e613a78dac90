"""`cifarlab calibrate`: fit (again) a finished run's softmax temperature, or remove it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cifarlab.cli.common import data_dir_arg, fmt, printable, warn

# The one-line help `cifarlab --help` lists (read without building this command's parser).
HELP = "fit a run's softmax temperature, so its probabilities are calibrated"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "calibrate",
        help=HELP,
        **fmt(
            "Fit the softmax temperature of a finished run (temperature scaling: the T that minimizes the\n"
            "cross-entropy of softmax(logits / T)) on 1,000 images of its validation split, or of its training\n"
            "images when it has none, and store it in model.safetensors, where predict, serve, export and the\n"
            "report find it. Training does this itself for recipes with calibrate=true (fast, air94, ...); this\n"
            "command is for the others (reference) and for runs trained before. No prediction changes.\n"
            "--off removes the temperature again (the plain softmax).",
            "cifarlab calibrate runs/20261125-120000-reference --data-dir ../shared/data",
        ),
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder written by cifarlab train")
    p.add_argument("--off", action="store_true", help="remove the run's temperature (back to the plain softmax)")
    data_dir_arg(p)
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cifarlab.calibrate import calibrate_run
    from cifarlab.inference import set_threads
    from cifarlab.runs import load_run

    set_threads()
    run = printable(args.run_dir)
    if args.off and load_run(args.run_dir).temperature == 1.0:
        print(f"{run} has no softmax temperature: nothing to remove")
        return 0
    result = calibrate_run(args.run_dir, data_dir=args.data_dir, off=args.off, on_warning=warn)
    if result is None:
        print(f"{run}: temperature removed; predict, serve and export give the plain softmax")
    elif result.get("unchanged"):
        print(
            f"{run}: softmax temperature {result['temperature']:.4g} again, fitted on {result['fitted_on']}: the "
            "same as the run's, so nothing changes (report and exports stay valid)"
        )
        _warn_if_degenerate(result["temperature"])
        return 0
    else:
        print(
            f"{run}: softmax temperature {result['temperature']:.4g}, fitted on {result['fitted_on']} "
            f"(cross-entropy {result['fit_loss_before']:.4f} -> {result['fit_loss_after']:.4f}) in "
            f"{result['seconds']:.1f} s; predict, serve and export apply it"
        )
    print(
        f"report.html and files exported before keep the old probabilities: run `cifarlab report {run}` and "
        "export again"
    )
    if result is not None:
        _warn_if_degenerate(result["temperature"])
    return 0


def _warn_if_degenerate(temperature: float) -> None:
    from cifarlab.calibrate import T_RANGE, at_bound

    bound = at_bound(temperature)
    if bound is not None:
        warn(
            f"the temperature {temperature:.3g} is at the {bound} bound of the fit's range ({T_RANGE[0]:g} to "
            f"{T_RANGE[1]:g}): a degenerate fit, not to be trusted ("
            + (
                "every calibration image was right with full confidence"
                if bound == "lower"
                else "the model is so often wrong on the calibration images that every probability was flattened"
            )
            + "); `--off` removes it"
        )
