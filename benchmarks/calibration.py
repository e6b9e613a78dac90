"""How well a run's softmax temperature calibrates its test probabilities (RESULTS.md, "Calibrated probabilities").

    python benchmarks/calibration.py RUN_DIR... --data-dir ../shared/data [--json out.json]

Per run: the temperature fitted after training (`cifarlab.calibrate`, stored in model.safetensors) and what it was
fitted on, the test ECE and cross-entropy of the plain softmax and at the temperature, and, for comparison, the
temperature an oracle would fit on the test set itself (the best any single temperature can do there).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from cifarlab.calibrate import fit_temperature
from cifarlab.evaluate import calibration, load_run_dataset
from cifarlab.inference import predict_logits, recipe_options
from cifarlab.runs import load_run, read_json


def ece(logits: torch.Tensor, y: torch.Tensor, t: float) -> float:
    p = torch.softmax(logits.double() / t, dim=1)
    conf, pred = p.max(1)
    return calibration(conf.numpy(), (pred == y).numpy()).ece


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    for run_dir in args.runs:
        run = load_run(run_dir)
        ds = load_run_dataset(run, args.data_dir)
        mean, std = run.normalization
        z = predict_logits(run.build_model(), ds.x_test, mean=mean, std=std, **recipe_options(run.recipe))
        y = ds.y_test
        t, oracle = run.temperature, fit_temperature(z, y)
        cal = read_json(run_dir / "metrics.json").get("calibration") or {}
        rows.append(
            {
                "run": run_dir.name,
                "seed": run.recipe.seed,
                "temperature": t,
                "fitted_on": cal.get("fitted_on"),
                "fit_seconds": cal.get("seconds"),
                "test_accuracy": (z.argmax(1) == y).float().mean().item(),
                "ece_plain": ece(z, y, 1.0),
                "ece_calibrated": ece(z, y, t),
                "loss_plain": F.cross_entropy(z, y).item(),
                "loss_calibrated": F.cross_entropy(z / t, y).item(),
                "oracle_temperature": oracle,
                "ece_oracle": ece(z, y, oracle),
                "loss_oracle": F.cross_entropy(z / oracle, y).item(),
            }
        )
        r = rows[-1]
        print(
            f"{r['run']}: T {t:.3f} ({r['fitted_on']}, {r['fit_seconds'] or 0:.2f} s)  "
            f"ECE {r['ece_plain']:.2%} -> {r['ece_calibrated']:.2%}  loss {r['loss_plain']:.4f} -> "
            f"{r['loss_calibrated']:.4f}  (oracle T {oracle:.3f}: ECE {r['ece_oracle']:.2%}, "
            f"loss {r['loss_oracle']:.4f})"
        )
    if len(rows) > 1:
        for key in ("temperature", "ece_plain", "ece_calibrated", "loss_plain", "loss_calibrated", "fit_seconds"):
            vals = [r[key] for r in rows if r[key] is not None]
            print(f"{key}: mean {statistics.mean(vals):.4f}, min {min(vals):.4f}, max {max(vals):.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
