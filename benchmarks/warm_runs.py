"""Several runs of a recipe in one process, timed as airbench94 times its runs.

    PYTHONPATH=src python benchmarks/warm_runs.py --recipe air94 --runs 4 --data-dir data [--set KEY=VALUE ...]
        [--json FILE]

airbench94.py trains its 25 runs in one process and adds up CUDA-event time over the training epochs and the
final TTA pass only: cuDNN's timing of each new convolution shape and the first launch of each kernel are paid
by its first run, and its published times (1.95 s on an H200 for 90.53%) are the steady state of the others.
`benchmarks/time_to_accuracy.py` runs every seed in a fresh process, so each of our runs pays those one-time
costs (~2 s of `fast`'s ~3 s on the H200). This script gives the like-for-like figure: `cifarlab.fit` N times
(seeds first_seed, first_seed + 1, ...) in this process, each run's training seconds, seconds per epoch, TTA
evaluation seconds and test accuracy; the first run is the cold one, the mean of the others the warm figure.
Runs on a CPU too (there the first run differs little from the others).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import cifarlab
from cifarlab.config import parse_set


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides, as for train")
    ap.add_argument("--json", type=Path, help="write the runs and the summary here")
    args = ap.parse_args()
    if args.runs < 2:
        ap.error("--runs must be at least 2: the first run is the cold one")
    overrides = dict(parse_set(s) for s in args.set)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cifarlab-warm-") as runs_dir:
        for i in range(args.runs):
            seed = args.first_seed + i
            run = cifarlab.fit(
                args.recipe, data_dir=args.data_dir, runs_dir=runs_dir, report=False, **{**overrides, "seed": seed}
            )
            t = run.metrics["timings"]
            rows.append(
                {
                    "seed": seed,
                    "test_accuracy": run.test_accuracy,
                    "train_seconds": t["train_seconds"],
                    "seconds_per_epoch": t["seconds_per_epoch"],
                    "eval_seconds": t["eval_seconds"],
                    "training_step": run.metrics.get("training_step"),
                }
            )
            r = rows[-1]
            print(
                f"run {i + 1} ({'cold' if i == 0 else 'warm'}), seed {seed}: {r['test_accuracy']:.2%}, training "
                f"{r['train_seconds']:.2f} s ({r['seconds_per_epoch']:.3f} s/epoch), TTA evaluation "
                f"{r['eval_seconds']:.2f} s; step: {r['training_step']}",
                flush=True,
            )
    warm = rows[1:]
    summary = {
        "cold_train_seconds": rows[0]["train_seconds"],
        "warm_train_seconds_mean": statistics.mean(r["train_seconds"] for r in warm),
        "warm_seconds_per_epoch_mean": statistics.mean(r["seconds_per_epoch"] for r in warm),
        "warm_eval_seconds_mean": statistics.mean(r["eval_seconds"] for r in warm),
        "test_accuracy_mean": statistics.mean(r["test_accuracy"] for r in rows),
        "test_accuracy_min": min(r["test_accuracy"] for r in rows),
    }
    print(
        f"{args.recipe}: cold run {summary['cold_train_seconds']:.2f} s of training; warm runs "
        f"{summary['warm_train_seconds_mean']:.2f} s ({summary['warm_seconds_per_epoch_mean']:.3f} s/epoch) + "
        f"{summary['warm_eval_seconds_mean']:.2f} s TTA; accuracy {summary['test_accuracy_mean']:.2%} mean, "
        f"{summary['test_accuracy_min']:.2%} min over {len(rows)} runs"
    )
    if args.json:
        args.json.write_text(json.dumps({"recipe": args.recipe, "sets": args.set, "runs": rows, **summary}, indent=1))


if __name__ == "__main__":
    main()
