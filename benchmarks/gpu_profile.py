"""Where a recipe's training time goes on a GPU: each epoch's time with the GPU drained at both ends, the
one-time costs of the first steps (cuDNN autotuning, CUDA-graph warm-up and capture), and torch.profiler over
steps of the last epoch (host time per call, and kernel time), printed as tables.

    PYTHONPATH=src python benchmarks/gpu_profile.py --recipe fast --data-dir data [--set cuda_graph=false]

Trains the recipe through `cifarlab.fit` (its own loop, callbacks and data path) with two callbacks added.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import cifarlab
from cifarlab.train.callbacks import Callback

CUDA = torch.cuda.is_available()
sync = torch.cuda.synchronize if CUDA else (lambda: None)  # runs on a CPU too (to check the script)


class EpochClock(Callback):
    """Per-epoch seconds with the GPU drained at both ends, and the seconds of each epoch's first steps."""

    def __init__(self, first: int = 5) -> None:
        self.first = first
        self.rows: list[dict] = []

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        sync()
        self.t0 = self.t_step = time.perf_counter()
        self.steps: list[float] = []

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if batch < self.first:
            sync()
            now = time.perf_counter()
            self.steps.append(now - self.t_step)
            self.t_step = now

    def on_validation_begin(self, epoch: int, logs: dict | None = None) -> None:
        sync()
        n = self.trainer.steps_per_epoch
        self.rows.append({"epoch": epoch + 1, "seconds": time.perf_counter() - self.t0, "steps": n})
        self.rows[-1]["first_steps_ms"] = [round(s * 1e3, 1) for s in self.steps]


class Profile(Callback):
    """torch.profiler over steps [start, start + n) of the last epoch."""

    def __init__(self, start: int, n: int) -> None:
        self.start, self.n = start, n
        self.prof: profile | None = None
        self.wall = 0.0

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        last = len(self.trainer.history) == self.trainer.max_epochs - 1
        if last and batch == self.start:
            sync()
            self.prof = profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if CUDA else [])])
            self.prof.__enter__()
            self.t0 = time.perf_counter()
        elif last and batch == self.start + self.n and self.prof is not None:
            sync()
            self.wall = time.perf_counter() - self.t0
            self.prof.__exit__(None, None, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--set", action="append", default=[], help="recipe override KEY=VALUE")
    ap.add_argument("--steps", type=int, default=40, help="steps profiled in the last epoch")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    overrides = dict(s.split("=", 1) for s in args.set)
    clock, prof = EpochClock(), Profile(start=20, n=args.steps)
    t0 = time.perf_counter()
    run = cifarlab.fit(
        args.recipe,
        data_dir=args.data_dir,
        callbacks=[clock, prof],
        runs_dir="/tmp/cifarlab-profile",
        report=False,
        **overrides,
    )
    print(
        f"{args.recipe} {overrides}: test {run.metrics['test_accuracy']:.2%}, fit() {time.perf_counter() - t0:.1f} s, "
        f"step: {run.metrics.get('training_step')}, timings {run.metrics['timings']}"
    )
    for row in clock.rows:
        print(
            f"epoch {row['epoch']}: {row['seconds']:.3f} s for {row['steps']} steps "
            f"({row['seconds'] / row['steps'] * 1e3:.2f} ms/step); first steps (ms): {row['first_steps_ms']}"
        )
    if prof.prof is not None:
        print(
            f"profiled {args.steps} steps of the last epoch: {prof.wall * 1e3 / args.steps:.2f} ms/step under the "
            "profiler"
        )
        table = prof.prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        if CUDA:
            print(table.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
