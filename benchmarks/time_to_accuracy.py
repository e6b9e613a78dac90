"""Time to accuracy: run a recipe for N seeds, each in a fresh process, and report what it cost.

    python benchmarks/time_to_accuracy.py --recipe fast --seeds 5 --data-dir ../shared/data
    python benchmarks/time_to_accuracy.py --recipe reference --seeds 3 --data-dir ../shared/data

Per seed: test accuracy and the wall time from process start to the final test accuracy (interpreter and
torch import, data loading from the extracted cache, whitening, training and TTA evaluation all included;
the report is skipped), epochs, peak memory. Then mean ± std, the training work in FLOPs (counted with
torch's FlopCounterMode on the recipe's own model), the achieved TFLOP/s, and the dense-matmul peak of the
device and precision the runs trained in, measured after them in the same process.

`--cpu-isa avx2` caps torch's CPU kernels at AVX2 (oneDNN, ATen and MKL) in every run: a Zen 4 then computes
bit for bit what a Zen 3 (AVX2, no bf16) computes, so its test accuracies are a Zen 3's, and `precision=auto`
picks fp32 as it would there; its times are not (RESULTS.md, "A Zen 3 on a Zen 4").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# Environment settings that cap torch's kernels at an instruction set (read by each library at its first use).
CPU_ISA_CAPS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, seconds: float = 3.0) -> float:
    """Dense matmul throughput in TFLOP/s on `device` (the most it can do for this dtype)."""
    if device.type == "cuda":
        n = 8192  # a 2048 matmul cannot fill a large GPU
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        a @ b
    sync()
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    sync()
    return 2 * n**3 * count / (time.perf_counter() - t0) / 1e12


def run_precision(cfg: dict) -> tuple[torch.device, torch.dtype]:
    """The device and number format the runs trained in, from their config.json."""
    device = torch.device(cfg["machine"].get("device", "cpu"))
    precision = str(cfg.get("precision", "fp32"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision[:4], torch.float32)
    return device, dtype


def count_flops(recipe, epochs: int) -> dict[str, float]:
    """FLOPs of one training step per image (forward + backward; the mean over the epochs, whose image size
    `train_scales` may change) and of one inference pass with the recipe's TTA."""
    from torch.utils.flop_counter import FlopCounterMode

    from cifarlab.inference import tta_views
    from cifarlab.models import build_model

    model = build_model(recipe)

    def train_flops(side: int) -> float:
        with FlopCounterMode(display=False) as fc:
            model(torch.randn(8, 3, side, side)).sum().backward()
        return fc.get_total_flops() / 8

    scales = recipe.train_scales or (1.0,)
    sides = [round(32 * scales[min(e, len(scales) - 1)]) for e in range(max(1, round(epochs)))]
    per_side = {side: train_flops(side) for side in set(sides)}
    model.eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        for _, view in tta_views(x, recipe.tta):
            model(view)
    eval_per_image = fc.get_total_flops() / 8
    return {"train_per_image": statistics.mean(per_side[s] for s in sides), "eval_per_image": eval_per_image}


def run_seed(args: argparse.Namespace, seed: int, runs_dir: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "cifarlab.cli",
        "train",
        "--recipe",
        args.recipe,
        "--set",
        f"seed={seed}",
        "--runs-dir",
        str(runs_dir),
        "--no-report",
        "--quiet",
    ]
    if args.config:
        cmd += ["--config", str(args.config)]
    for s in args.set:
        cmd += ["--set", s]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out = proc.stdout.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"seed {seed} failed:\n{out}")
    run_dir = Path(out.strip().splitlines()[-1].split(":")[0])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "seed": seed,
        "run_dir": str(run_dir),
        "test_accuracy": metrics["test_accuracy"],
        "wall_seconds": wall,
        "train_seconds": metrics["timings"]["train_seconds"],
        "seconds_per_epoch": metrics["timings"]["seconds_per_epoch"],
        "epochs_run": metrics["epochs_run"],
        "best_epoch": metrics.get("best_epoch"),
        "lr_drops_after_epochs": metrics.get("lr_drops_after_epochs"),
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "training_step": metrics.get("training_step"),  # a CUDA graph or eager, and why
        "timings": metrics["timings"],  # where the wall time went: data, model, training, evaluation, ...
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--config", type=Path, help="recipe config file, as for cifarlab train (e.g. benchmarks/configs/)")
    ap.add_argument("--set", action="append", default=[], help="recipe override, as for cifarlab train")
    ap.add_argument("--data-dir", type=Path, default=os.environ.get("CIFARLAB_DATA"))
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/bench"))
    ap.add_argument("--json", type=Path, help="also write all figures to this JSON file")
    ap.add_argument(
        "--cpu-isa",
        choices=sorted(CPU_ISA_CAPS),
        default="native",
        help="avx2: cap torch's CPU kernels at AVX2 in the runs and the peak measurement (a Zen 3's numbers)",
    )
    args = ap.parse_args()
    os.environ.update(CPU_ISA_CAPS[args.cpu_isa])  # before the first kernel here; inherited by every run

    from cifarlab.plugins import load_plugins
    from cifarlab.recipes import Recipe

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        row = run_seed(args, seed, args.runs_dir)
        rows.append(row)
        print(
            f"seed {seed}: test {row['test_accuracy']:.2%}  wall {row['wall_seconds']:.1f} s  "
            f"train {row['train_seconds']:.1f} s  epochs {row['epochs_run']}  "
            f"{row['seconds_per_epoch']:.1f} s/epoch  LR drops after {row['lr_drops_after_epochs']}  "
            f"peak RSS {row['peak_rss_mib']:.0f} MiB  step: {row['training_step']}  "
            f"process start to test accuracy {row['timings'].get('process_seconds', float('nan')):.1f} s",
            flush=True,
        )

    cfg = json.loads((Path(rows[0]["run_dir"]) / "config.json").read_text())
    load_plugins()  # the runs' recipe may name a plugin's pieces ($CIFARLAB_PLUGINS, as the runs loaded them)
    # What the runs trained (on a CPU without bf16, `fast` hands over to `fast_fp32`), as they recorded it.
    recipe = Recipe.from_dict(cfg["recipe"])
    # The peak of the device and precision the runs used (a bf16 peak on a CPU without bf16 would be emulated,
    # and a CPU peak beside a GPU run meaningless), measured after the runs so it does not compete with them.
    device, dtype = run_precision(cfg)
    peak = matmul_peak(dtype, device)
    peak_name = f"{str(dtype).removeprefix('torch.')} on {device.type}"
    n_train, n_test = cfg["dataset"]["n_train"], cfg["dataset"]["n_test"]
    n_val = cfg["dataset"]["n_val"]
    accs = [r["test_accuracy"] for r in rows]
    walls = [r["wall_seconds"] for r in rows]
    epochs = statistics.mean(r["epochs_run"] for r in rows)
    flops = count_flops(recipe, epochs)
    steps_images = n_train * epochs
    train_flops = flops["train_per_image"] * steps_images + flops["eval_per_image"] * n_val * epochs
    total = train_flops + flops["eval_per_image"] * n_test
    # Training work (steps + per-epoch validation) over training time: the rate the loop sustains.
    achieved = train_flops / statistics.median([r["train_seconds"] for r in rows]) / 1e12
    summary = {
        "recipe": recipe.to_dict(),
        "machine": cfg["machine"],
        "seeds": rows,
        "test_accuracy_mean": statistics.mean(accs),
        "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "test_accuracy_min": min(accs),
        "wall_seconds_median": statistics.median(walls),
        "wall_seconds_mean": statistics.mean(walls),
        "flops_train_per_image": flops["train_per_image"],
        "flops_eval_per_image": flops["eval_per_image"],
        "total_pflop": total / 1e15,
        "train_pflop": train_flops / 1e15,
        "achieved_tflops_during_training": achieved,
        "matmul_peak_tflops": {peak_name: peak},
        "achieved_over_peak": achieved / peak,
    }
    print(
        f"\n{recipe.name}: test accuracy {summary['test_accuracy_mean']:.2%} ± {summary['test_accuracy_std']:.2%} "
        f"(min {summary['test_accuracy_min']:.2%}) over {len(rows)} seeds; wall time median "
        f"{summary['wall_seconds_median']:.1f} s (mean {summary['wall_seconds_mean']:.1f} s)"
    )
    print(
        f"work: {total / 1e15:.4f} PFLOP ({flops['train_per_image'] / 1e6:.1f} MFLOP/image/step train, "
        f"{flops['eval_per_image'] / 1e6:.1f} MFLOP/image eval); achieved {achieved:.3f} TFLOP/s during "
        f"training = {summary['achieved_over_peak']:.0%} of the measured {peak_name} matmul peak "
        f"({peak:.3f} TFLOP/s)"
    )
    m = cfg["machine"]
    print(
        f"machine: {m['cpu']} (bf16: {'yes' if m.get('cpu_bf16') else 'no'}"
        f"{'; ' + m['cpu_isa_cap'] if m.get('cpu_isa_cap') else ''}), {m.get('gpu', 'no GPU')}, "
        f"{m['torch_threads']} threads, torch {m['torch']}; precision {cfg.get('precision', '?')}"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
