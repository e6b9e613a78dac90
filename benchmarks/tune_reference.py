"""Does tuning beat the hand-set recipe? A budgeted Optuna study on the `reference` architecture, then the best
config and the pinned reference, each trained fully for N seeds and evaluated on the test set.

    PYTHONPATH=src python benchmarks/tune_reference.py --data-dir ../shared/data \\
        --trials 24 --workers 8 --trial-epochs 10 --prune-after 2 --study-timeout 120 --parallel 6

Steps, each a fresh `cifarlab` process (so any machine with the package and Optuna importable runs it):
  1. warm the decoded-data cache once (so the parallel processes do not all decode the archive);
  2. `cifarlab tune --recipe reference` with --workers local worker processes on one SQLite storage, TPE and the
     median pruner, trials capped at --trial-epochs (`--trial-set epochs=N`), no final run (`--final-seeds 0`);
     the pinned reference's seed runs start at the same time (--parallel permitting) since they do not depend
     on the study;
  3. `cifarlab train --config best.yaml --set seed=S` for each seed (the tuned recipe's full run: the recipe's
     own 30 epochs with early stopping), up to --parallel at a time;
  4. the mean test accuracies, the study's wall time, its pruned/complete/failed counts and every run's numbers
     go to benchmarks/results/tune_reference.json (--out).

--set KEY=VALUE applies to the study and to both sets of full runs (a tiny check: --set widths=8,16,16
--set dataset=PATH/TO/IMAGEFOLDER). On an H200 an epoch of `reference` takes ~1.5 s alone; the defaults above
aim at about 5 minutes there. On the 2-core CPU an epoch takes ~2 minutes: use it only for tiny checks.
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
from typing import Any


def cifarlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "cifarlab.cli", *args]


def common(ns: argparse.Namespace) -> list[str]:
    out = ["--device", ns.device]
    if ns.data_dir:
        out += ["--data-dir", str(ns.data_dir)]
    for s in ns.set:
        out += ["--set", s]
    return out


def run_folder(root: Path) -> Path:
    (only,) = [p for p in root.iterdir() if p.is_dir()]
    return only


class Pool:
    """Run commands as subprocesses, at most `size` at once; each writes its output to a log file."""

    def __init__(self, size: int, logs: Path) -> None:
        self.size, self.logs = max(1, size), logs
        self.queue: list[tuple[str, list[str]]] = []
        self.running: dict[str, tuple[subprocess.Popen[bytes], float, Any]] = {}
        self.done: dict[str, dict[str, Any]] = {}

    def add(self, name: str, cmd: list[str]) -> None:
        self.queue.append((name, cmd))
        self.fill()

    def fill(self) -> None:
        while self.queue and len(self.running) < self.size:
            name, cmd = self.queue.pop(0)
            log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - closed when the process ends
            self.running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time(), log)
            print(f"  started {name}", flush=True)

    def poll(self) -> None:
        for name, (proc, t0, log) in list(self.running.items()):
            if proc.poll() is not None:
                log.close()
                self.done[name] = {"returncode": proc.returncode, "seconds": round(time.time() - t0, 1)}
                del self.running[name]
                print(f"  {name} ended ({proc.returncode}) after {self.done[name]['seconds']} s", flush=True)
        self.fill()

    def wait(self) -> None:
        while self.running or self.queue:
            self.poll()
            time.sleep(0.5)


def full_run(root: Path, name: str, done: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {"name": name, **done.get(name, {})}
    try:
        run = run_folder(root / name)
        metrics = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError) as e:
        return {**info, "error": f"{type(e).__name__}: {e}"}
    return {
        **info,
        "run_dir": str(run),
        "test_accuracy": metrics.get("test_accuracy"),
        "epochs_run": metrics.get("epochs_run"),
        "best_val_accuracy": metrics.get("best_val_accuracy"),
        "train_seconds": (metrics.get("timings") or {}).get("train_seconds"),
    }


def stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    accs = [r["test_accuracy"] for r in runs if r.get("test_accuracy") is not None]
    return {
        "test_accuracies": accs,
        "mean_test_accuracy": statistics.fmean(accs) if accs else None,
        "sd_test_accuracy": statistics.stdev(accs) if len(accs) > 1 else None,
        "runs": runs,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--trials", type=int, default=24, help="complete + pruned trials of the study")
    ap.add_argument("--workers", type=int, default=8, help="local worker processes of the study")
    ap.add_argument("--trial-epochs", type=int, default=10, help="epochs per trial at most (full runs: the recipe's)")
    ap.add_argument("--pruner", default="median", choices=("median", "hyperband", "none"))
    ap.add_argument("--prune-after", type=int, default=2, help="no trial pruned before this many epochs")
    ap.add_argument("--startup-trials", type=int, default=8, help="random trials before TPE")
    ap.add_argument("--study-timeout", type=float, default=None, help="seconds after which no trial starts")
    ap.add_argument("--seeds", type=int, default=3, help="full runs per recipe (seeds 0..N-1)")
    ap.add_argument("--parallel", type=int, default=6, help="full runs at once (they share the device)")
    ap.add_argument(
        "--reference-after-study",
        action="store_true",
        help="start the reference's full runs after the study, not beside it",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for the study and all runs")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/bench-tune"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "tune_reference.json")
    ns = ap.parse_args()

    t_start = time.time()
    root = ns.runs_dir / time.strftime("%Y%m%d-%H%M%S")
    logs = root / "logs"
    logs.mkdir(parents=True)
    study = "reference-bench"
    study_dir = root / "tune" / study
    phases: dict[str, float] = {}

    # 1. the data, decoded once
    t0 = time.time()
    warm = "from cifarlab.config import resolve_recipe; from cifarlab.data import load_dataset; import sys; "
    warm += "r = resolve_recipe('reference', None, sys.argv[2:], data_dir=sys.argv[1] or None); "
    warm += "load_dataset(r.dataset, sys.argv[1] or None)"
    subprocess.run([sys.executable, "-c", warm, str(ns.data_dir or ""), *ns.set], check=True)
    phases["data_cache_seconds"] = round(time.time() - t0, 1)

    # 2. the study, with the reference's full runs beside it
    pool = Pool(ns.parallel, logs)

    def add_reference() -> None:
        for s in range(ns.seeds):
            name = f"reference-seed{s}"
            pool.add(
                name,
                cifarlab(
                    "train",
                    "--recipe",
                    "reference",
                    "--set",
                    f"seed={s}",
                    *common(ns),
                    "--no-report",
                    "--quiet",
                    "--runs-dir",
                    str(root / "full" / name),
                ),
            )

    tune_cmd = cifarlab(
        "tune", "--recipe", "reference", "--study", study, "--runs-dir", str(root),
        "--n-trials", str(ns.trials), "--workers", str(ns.workers), "--pruner", ns.pruner,
        "--prune-after", str(ns.prune_after), "--startup-trials", str(ns.startup_trials),
        "--trial-set", f"epochs={ns.trial_epochs}", "--final-seeds", "0", *common(ns),
    )  # fmt: skip
    if ns.study_timeout:
        tune_cmd += ["--timeout", str(ns.study_timeout)]
    print(f"study: {' '.join(tune_cmd)}", flush=True)
    t0 = time.time()
    with open(logs / "tune.log", "wb") as log:
        proc = subprocess.Popen(tune_cmd, stdout=log, stderr=subprocess.STDOUT)
        if not ns.reference_after_study:
            add_reference()
        while proc.poll() is None:
            pool.poll()
            time.sleep(0.5)
    phases["study_command_seconds"] = round(time.time() - t0, 1)
    if proc.returncode != 0:
        print((logs / "tune.log").read_text()[-4000:], file=sys.stderr)
        print(f"the study failed (exit status {proc.returncode}); see {logs / 'tune.log'}", file=sys.stderr)
        pool.wait()
        return 1
    summary = json.loads((study_dir / "study.json").read_text())

    # 3. the tuned recipe's full runs
    t0 = time.time()
    if ns.reference_after_study:
        add_reference()
    for s in range(ns.seeds):
        name = f"tuned-seed{s}"
        pool.add(
            name,
            cifarlab("train", "--config", str(study_dir / "best.yaml"), "--set", f"seed={s}", *common(ns),
                     "--no-report", "--quiet", "--runs-dir", str(root / "full" / name)),
        )  # fmt: skip
    pool.wait()
    phases["full_runs_after_study_seconds"] = round(time.time() - t0, 1)

    tuned = stats([full_run(root / "full", f"tuned-seed{s}", pool.done) for s in range(ns.seeds)])
    reference = stats([full_run(root / "full", f"reference-seed{s}", pool.done) for s in range(ns.seeds)])
    machine: dict[str, Any] = {}
    for r in tuned["runs"] + reference["runs"]:
        if r.get("run_dir"):
            machine = json.loads((Path(r["run_dir"]) / "config.json").read_text()).get("machine", {})
            break
    delta = None
    if tuned["mean_test_accuracy"] is not None and reference["mean_test_accuracy"] is not None:
        delta = tuned["mean_test_accuracy"] - reference["mean_test_accuracy"]
    result = {
        "benchmark": "tune_reference",
        "command": " ".join([sys.executable, *sys.argv]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()},
        "study": {
            "folder": str(study_dir),
            "wall_seconds": summary.get("wall_seconds"),
            "command_seconds": phases["study_command_seconds"],
            "n_trials": summary.get("n_trials"),
            "counts": summary.get("counts"),
            "pruned": summary.get("pruned"),
            "trial_epochs": summary.get("trial_epochs"),
            "workers": summary.get("workers"),
            "best": summary.get("best"),
            "importances": summary.get("importances"),
            "trial_seconds_total": summary.get("trial_seconds_total"),
        },
        "tuned": tuned,
        "reference": reference,
        "tuned_minus_reference": delta,
        "tuning_beats_reference": None if delta is None else delta > 0,
        "phases": phases,
        "total_seconds": round(time.time() - t_start, 1),
        "machine": machine,
        "optuna": (summary.get("versions") or {}).get("optuna"),
    }
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text(json.dumps(result, indent=2) + "\n")

    def pct(v: float | None) -> str:
        return "–" if v is None else f"{100 * v:.2f}%"

    c = summary.get("counts") or {}
    print(
        f"\nstudy: {c.get('complete')} complete, {c.get('pruned')} pruned, {c.get('failed')} failed in "
        f"{summary.get('wall_seconds') or 0:.0f} s (best val_accuracy {(summary.get('best') or {}).get('value')})"
    )
    print(
        f"tuned     mean test accuracy {pct(tuned['mean_test_accuracy'])}  {[pct(a) for a in tuned['test_accuracies']]}"
    )
    print(
        f"reference mean test accuracy {pct(reference['mean_test_accuracy'])}  "
        f"{[pct(a) for a in reference['test_accuracies']]}"
    )
    print(f"total {result['total_seconds']} s; written {ns.out}")
    failed = [r["name"] for r in tuned["runs"] + reference["runs"] if r.get("test_accuracy") is None]
    if failed:
        print(f"runs without a result: {', '.join(failed)} (logs in {logs})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
