"""`cifarlab train --budget`: does each run end on time, and does accuracy rise with the budget?

    python benchmarks/budget.py --data-dir ../shared/data --budgets 30s 60s 2m 10m

Each budget is one fresh `cifarlab train --recipe fast --budget B --no-report` process; its wall time is timed
here from before the process starts to its exit (so it includes interpreter start-up and everything the run
does, the report excepted). Prints a table, writes benchmarks/results/budget.json and the accuracy-versus-budget
chart benchmarks/budget.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def run(budget: str, args: argparse.Namespace) -> dict:
    runs = args.runs_dir / budget
    cmd = [sys.executable, "-m", "cifarlab.cli", "train", "--recipe", args.recipe, "--budget", budget]
    cmd += ["--runs-dir", str(runs), "--no-report", "--quiet", "--set", f"seed={args.seed}"]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:  # e.g. a budget too small for this machine: recorded, the others still run
        return {"budget": budget, "wall_seconds": wall, "error": (proc.stderr or proc.stdout).strip()[-500:]}
    run_dir = Path(proc.stdout.strip().splitlines()[-1].split(":")[0])
    m = json.loads((run_dir / "metrics.json").read_text())
    b = m["budget"]
    return {
        "budget": budget,
        "budget_seconds": b["budget_seconds"],
        "wall_seconds": wall,  # measured here, around the whole process
        "taken_seconds": b["taken_seconds"],  # measured by the run: process start to the saved test result
        "over_budget": wall / b["budget_seconds"] - 1,
        "test_accuracy": m["test_accuracy"],
        "widths": b["widths"],
        "scale": b["scale"],
        "tta": b["tta"],
        "epochs_run": m["epochs_run"],
        "planned_at": b["planned_at"],
        "probe_seconds": b["probe_seconds"],
        "train_seconds": m["timings"]["train_seconds"],
        "eval_seconds": m["timings"]["eval_seconds"],
        "run_dir": str(run_dir),
    }


def chart(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=150)
    xs = [r["budget_seconds"] for r in rows]
    ys = [100 * r["test_accuracy"] for r in rows]
    ax.plot(xs, ys, "o-")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(
            f"{y:.1f}%\n{r['wall_seconds']:.0f} s", (x, y), textcoords="offset points", xytext=(6, -14), fontsize=7
        )
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(xs, [r["budget"] for r in rows])
    ax.axhline(81.42, color="grey", ls="--", lw=0.8)
    # at the right, under the line: the shortest budget's point sits near it on the left
    ax.text(xs[-1], 81.42, "the talk's 81.42% ", fontsize=7, color="grey", ha="right", va="top")
    ax.set_xlabel("--budget (wall time from process start to test accuracy)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", nargs="+", default=["30s", "60s", "2m", "10m"])
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=os.environ.get("CIFARLAB_DATA"))
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/bench-budget"))
    ap.add_argument("--json", type=Path, default=HERE / "results" / "budget.json")
    ap.add_argument("--chart", type=Path, default=HERE / "budget.png")
    ap.add_argument(
        "--update", action="store_true", help="keep the other budgets' rows of an existing --json; rerun these"
    )
    args = ap.parse_args()
    rows = []
    for budget in args.budgets:
        row = run(budget, args)
        rows.append(row)
        if "error" in row:
            print(f"{budget:>5}: failed after {row['wall_seconds']:.1f} s: {row['error']}", flush=True)
            continue
        print(
            f"{budget:>5}: {row['wall_seconds']:6.1f} s ({row['over_budget']:+.1%})  test {row['test_accuracy']:.2%}  "
            f"widths {row['widths']}  {row['epochs_run']} epochs  TTA {row['tta']}  "
            f"(plan at {row['planned_at']:.1f} s, probe {row['probe_seconds']:.1f} s, "
            f"train {row['train_seconds']:.1f} s, eval {row['eval_seconds']:.1f} s)",
            flush=True,
        )
    cpu = cpu_name()
    bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    commands = [" ".join(sys.argv)]
    if args.update and args.json.exists():  # the rows of budgets not rerun now, and the commands that made them
        old = json.loads(args.json.read_text())
        rows += [r for r in old["runs"] if r["budget"] not in args.budgets]
        commands = [*old.get("commands", [old.get("command", "")]), *commands]
        rows.sort(key=lambda r: r.get("budget_seconds", 0.0))
    out = {
        "cpu": cpu,
        "cpu_bf16": bf16,
        "cores": len(os.sched_getaffinity(0)),
        "commands": commands,
        "runs": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    chart(
        [r for r in rows if "error" not in r],
        args.chart,
        f"{args.recipe} under --budget, {cpu} ({out['cores']} cores, bf16: {'yes' if bf16 else 'no'})",
    )
    print(f"written {args.json} and {args.chart}")


if __name__ == "__main__":
    main()
