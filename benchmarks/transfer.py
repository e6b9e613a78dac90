"""Transfer: Fashion-MNIST with only 1,000 labelled images, fine-tuned from a CIFAR-10 run vs trained from scratch.

    .venv/bin/python benchmarks/transfer.py --source runs/transfer/<a fast run on CIFAR-10>
    .venv/bin/python benchmarks/transfer.py --source RUN --no-select --finetune pretrained_lr_scale=0.3 ...

Data: Fashion-MNIST's official files (`apt-get install dataset-fashion-mnist`, or --data-dir). 5,000 training
images (500 per class, seed 1234) are set aside as a validation set; seed s draws its 1,000 labelled images
(100 per class) from the other 55,000. Both arms train on exactly those images with the same recipe (`fast`:
airnet, flip/translate augmentation, label smoothing, EMA, TTA), epochs and batch size; the fine-tuned arm
starts from the source run's weights (`--init`: the head is new, the whitening adapted from RGB to grey by
summing over channels, which needs the source's whitening width, whiten_width=24).

1. Selection, on the validation set only (seed 0's subset): the fine-tuning settings (pretrained_lr_scale x
   freeze_stages, at --epochs), then each arm's epochs (half, same, twice --epochs).
2. Final: seeds 0, 1, 2 of each arm, test accuracy on the full 10,000-image test set: both arms at --epochs
   (the same budget), and each at the epochs validation chose for it when that differs.
3. Full: a recipe on all 60,000 training images, for the published baselines of the Fashion-MNIST table.

Writes benchmarks/results/transfer.json after every run (a killed benchmark keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cifarlab.config import apply_overrides
from cifarlab.data import Dataset, from_arrays, load_dataset
from cifarlab.experiment import run_experiment
from cifarlab.files import write_json
from cifarlab.recipes import Recipe, get_recipe, validate
from cifarlab.runs import load_run, machine_info

HERE = Path(__file__).resolve().parent
# The published table of zalandoresearch/fashion-mnist's README (commit 55506a9, the copy Debian's
# dataset-fashion-mnist ships in /usr/share/doc/dataset-fashion-mnist/README.md.gz); test accuracy.
BASELINES = {
    "Human performance (crowd-sourced, 1000 test images)": 0.835,
    "MLP 256-128-100": 0.8833,
    "XGBoost": 0.898,
    "2 Conv+pooling (Kashif Rasul)": 0.876,
    "2 Conv+pooling (TensorFlow's doc)": 0.916,
    "3 Conv+BN+pooling": 0.921,
    "HOG+SVM": 0.926,
    "5 Conv+BN+pooling": 0.931,
    "2 Conv+2 FC (random horizontal flips), the best small CNN": 0.939,
    "Google AutoML (24 compute hours)": 0.939,
    "ResNet18 (normalization, flips, translation, rotation)": 0.949,
    "MobileNet (horizontal flips)": 0.950,
    "WRN-28-10 (crops/flips)": 0.959,
    "WRN-28-10 + Random Erasing": 0.963,
    "WRN40-4 8.9M params": 0.967,
}


def stratified(y: torch.Tensor, per_class: int, seed: int, pool: torch.Tensor | None = None) -> torch.Tensor:
    """`per_class` indices of each class, drawn with `seed` (from `pool` when given), in class order."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(len(y)) if pool is None else pool
    picks = []
    for k in range(int(y.max()) + 1):
        of_k = pool[y[pool] == k]
        picks.append(of_k[torch.randperm(len(of_k), generator=g)[:per_class]])
    return torch.cat(picks)


def subset(ds: Dataset, train_idx: torch.Tensor, x_eval: torch.Tensor, y_eval: torch.Tensor, name: str) -> Dataset:
    return from_arrays(ds.x_train[train_idx], ds.y_train[train_idx], x_eval, y_eval, classes=ds.classes, name=name)


def recipe_for(base: Recipe, changes: dict[str, Any], seed: int) -> Recipe:
    return validate(apply_overrides(base, [*changes.items(), ("seed", seed)], source="benchmark"), check_paths=False)


def train(recipe: Recipe, ds: Dataset, runs: Path, init: Path | None, report: bool = False) -> dict[str, Any]:
    t0 = time.perf_counter()
    recipe = recipe.replace(dataset=ds.name)  # what config.json's recipe says it trained on
    res = run_experiment(recipe, dataset=ds, init=init, runs_root=runs, quiet=True, report=report)
    m = res.metrics
    return {
        "test_accuracy": m["test_accuracy"],
        "epochs": m["epochs_run"],
        "train_seconds": round(m["timings"]["train_seconds"], 1),
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "run_dir": str(res.run_dir),
    }


def parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def summary(accs: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, required=True, help="the CIFAR-10 run folder to fine-tune from")
    ap.add_argument("--data-dir", type=Path, default=None, help="where the Fashion-MNIST files are (else Debian's)")
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=20, help="of both arms")
    ap.add_argument("--batch-size", type=int, default=100, help="1,000 images: 10 steps per epoch")
    ap.add_argument("--no-select", action="store_true", help="skip the selection; use --finetune and --scratch-epochs")
    ap.add_argument("--finetune", nargs="*", default=[], metavar="KEY=VALUE", help="fine-tuning recipe keys")
    ap.add_argument("--scratch-epochs", type=int, default=None)
    ap.add_argument(
        "--full",
        nargs="*",
        default=["fast", "fast:epochs=10"],
        metavar="RECIPE[:KEY=VALUE,...]",
        help="runs on all 60,000 training images (none: skip)",
    )
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/transfer"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "transfer.json")
    args = ap.parse_args()

    ds = load_dataset("fashion_mnist", args.data_dir)
    source = load_run(args.source)
    per_class = args.n_train // len(ds.classes)
    holdout = stratified(ds.y_train, 500, seed=1234)
    pool = torch.ones(len(ds.y_train), dtype=torch.bool)
    pool[holdout] = False
    pool_idx = torch.nonzero(pool).flatten()
    base = get_recipe(args.recipe).replace(precision="fp32", batch_size=args.batch_size, epochs=args.epochs)
    finetune_keys = {"whiten_width": 24} if base.model == "airnet" else {}  # the RGB source's whitening width

    out: dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {"label": "AMD Zen 3, 2 cores, fp32, no bf16", **machine_info()},
        "dataset": {"name": ds.name, "source": ds.source, "checksum": ds.checksum, "status": ds.checksum_status},
        "protocol": {
            "n_train": per_class * len(ds.classes),
            "validation": "5,000 training images (500 per class, seed 1234), never in a subset",
            "subsets": "seed s: 100 per class from the other 55,000, drawn with seed s (torch.randperm)",
            "test": f"the official test set ({len(ds.y_test):,} images)",
            "recipe": args.recipe,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
        },
        "source": {
            "run": str(args.source),
            "recipe": source.recipe.name,
            "dataset": source.config["dataset"].get("source"),
            "test_accuracy": source.metrics.get("test_accuracy"),
            "train_seconds": (source.metrics.get("timings") or {}).get("train_seconds"),
        },
        "baselines": {"source": "zalandoresearch/fashion-mnist README, commit 55506a9", "test_accuracy": BASELINES},
    }
    if isinstance(prior := _read(args.out), dict) and prior.get("command") == out["command"]:
        out.update({k: v for k, v in prior.items() if k in ("selection", "final", "full")})  # resume after a kill

    def save() -> None:
        write_json(args.out, out)

    def say(text: str) -> None:
        print(text, flush=True)

    # 1. selection on the validation set
    finetune = {**finetune_keys, **parse_sets(args.finetune)}
    scratch_epochs = args.scratch_epochs or args.epochs
    finetune_epochs = args.epochs
    if not args.no_select:
        sel = out.setdefault("selection", {})
        val = subset(
            ds, stratified(ds.y_train, per_class, 0, pool_idx), ds.x_train[holdout], ds.y_train[holdout], "val"
        )
        candidates = {
            f"finetune lr_scale={s} freeze={f}": (
                {**finetune_keys, "pretrained_lr_scale": s, "freeze_stages": f},
                args.source,
            )
            for s in (1.0, 0.3)
            for f in (0, 1)
        }
        epoch_grid = sorted({max(1, args.epochs // 2), args.epochs, args.epochs * 2})
        for e in epoch_grid:
            candidates[f"scratch epochs={e}"] = ({"epochs": e}, None)

        def select(cands: dict[str, tuple[dict[str, Any], Path | None]]) -> None:
            for name, (changes, init) in cands.items():
                if name in sel:
                    continue
                r = train(recipe_for(base, changes, 0), val, args.runs_dir / "select", init)
                sel[name] = {"changes": changes, "val_accuracy": r.pop("test_accuracy"), **r}
                say(f"select {name}: val {sel[name]['val_accuracy']:.4f} ({r['wall_seconds']:.0f} s)")
                save()

        def best(prefix: str) -> str:
            return max((k for k in sel if k.startswith(prefix)), key=lambda k: sel[k]["val_accuracy"])

        select(candidates)
        finetune = dict(sel[best("finetune lr_scale")]["changes"])
        # Then the fine-tuned arm's epochs too, so both arms are tuned alike (its settings at args.epochs are in).
        select(
            {f"finetune epochs={e}": ({**finetune, "epochs": e}, args.source) for e in epoch_grid if e != args.epochs}
        )
        ft_best = best("finetune")
        finetune_epochs = int(sel[ft_best]["changes"].get("epochs", args.epochs))
        scratch_epochs = int(sel[best("scratch")]["changes"]["epochs"])
        out["chosen"] = {"finetune": finetune, "finetune_epochs": finetune_epochs, "scratch_epochs": scratch_epochs}
        say(f"chosen: fine-tune {finetune}, {finetune_epochs} epochs; scratch {scratch_epochs} epochs")

    # 2. final: the same 1,000 images per seed for every arm, the official test set
    # "finetune" and "scratch_e<epochs>": the same epochs; then each arm at the epochs validation chose for it
    arms = {"finetune": (finetune, args.source), f"scratch_e{args.epochs}": ({}, None)}
    if finetune_epochs != args.epochs:
        arms[f"finetune_e{finetune_epochs}"] = ({**finetune, "epochs": finetune_epochs}, args.source)
    if scratch_epochs != args.epochs:
        arms[f"scratch_e{scratch_epochs}"] = ({"epochs": scratch_epochs}, None)
    # A control: scratch with the fine-tuned arm's architecture (the whitening as wide as the RGB source's), so a
    # gain cannot come from the wider whitening alone.
    for e in sorted({args.epochs, scratch_epochs}) if finetune_keys else ():
        arms[f"scratch_e{e}_w{finetune_keys['whiten_width']}"] = ({**finetune_keys, "epochs": e}, None)
    final = out.setdefault("final", {})
    for seed in args.seeds:
        data = subset(ds, stratified(ds.y_train, per_class, seed, pool_idx), ds.x_test, ds.y_test, f"fm1k-s{seed}")
        for arm, (changes, init) in arms.items():
            rows = final.setdefault(arm, {"changes": changes, "seeds": {}})["seeds"]
            if str(seed) in rows:
                continue
            rows[str(seed)] = train(recipe_for(base, changes, seed), data, args.runs_dir / "final", init)
            say(f"{arm} seed {seed}: test {rows[str(seed)]['test_accuracy']:.4f}")
            save()
    for arm in final.values():
        arm["test_accuracy"] = summary([r["test_accuracy"] for r in arm["seeds"].values()])
    save()

    # 3. the full training set
    full = out.setdefault("full", {})
    for spec in args.full:
        if spec in full:
            continue
        name, _, sets = spec.partition(":")
        changes = parse_sets([s for s in sets.split(",") if s])
        recipe = apply_overrides(get_recipe(name).replace(precision="fp32"), list(changes.items()))
        recipe = validate(recipe, check_paths=False)
        full[spec] = {"recipe": name, "changes": changes, **train(recipe, ds, args.runs_dir / "full", None, True)}
        say(f"full {spec}: test {full[spec]['test_accuracy']:.4f}")
        save()
    say(json.dumps({k: out[k] for k in ("chosen", "final", "full") if k in out}, indent=1, default=str))


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    main()
