"""Export parity on real images: a run's ONNX (onnxruntime) and TorchScript exports against PyTorch.

    python benchmarks/check_export_parity.py runs/<run> --data-dir ../shared/data

Takes --n (default 1,000) test images of the run's dataset, evenly spaced over the test set, exports the
run to a temporary folder with --tta (default: the run's recipe's, what `cifarlab export` puts in the graph),
and prints the max abs difference of the probabilities from `inference.predict_proba(tta=..., precision="fp32")`
at the run's softmax temperature, plus top-1 agreement.
The exports are fed in batches of --batch (default 250, not the export's dummy batch of 2) to exercise the
dynamic batch axis. Exit status 1 when a difference exceeds --tol (default 1e-4).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--n", type=int, default=1000, help="test images to compare (default 1000)")
    ap.add_argument("--batch", type=int, default=250, help="batch size fed to the exports (default 250)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument(
        "--tta", choices=("recipe", "none", "flip", "flip_translate"), default="recipe", help="default: the recipe's"
    )
    args = ap.parse_args(argv)

    import onnxruntime as ort

    from cifarlab.data import load_dataset
    from cifarlab.export import export_onnx, export_torchscript
    from cifarlab.inference import predict_proba
    from cifarlab.runs import load_run

    run = load_run(args.run_dir)
    tta = run.recipe.tta if args.tta == "recipe" else args.tta
    ds = load_dataset(run.recipe.dataset, args.data_dir)
    # Evenly spaced over the test set: ImageFolder copies are sorted by class, so the first 1,000 would all
    # be airplanes.
    idx = torch.linspace(0, len(ds.y_test) - 1, min(args.n, len(ds.y_test))).round().long().unique()
    x, y = ds.x_test[idx].contiguous(), ds.y_test[idx]
    mean, std = run.normalization
    t0 = time.perf_counter()
    ref = predict_proba(
        run.build_model(), x, mean=mean, std=std, tta=tta, precision="fp32", channels_last=False,
        temperature=run.temperature,  # the exports divide by it too
    )  # fmt: skip
    print(
        f"run {run.path.name} (recipe {run.recipe.name}, model {run.recipe.model}); "
        f"{len(x)} test images of {ds.name}; PyTorch fp32 in {time.perf_counter() - t0:.1f} s"
    )
    acc = (ref.argmax(1) == y).float().mean().item()
    print(f"PyTorch top-1 accuracy on these images (TTA {tta}): {acc:.2%}")

    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(run.path, Path(tmp) / "model.onnx", tta=tta)
        ts_path = export_torchscript(run.path, Path(tmp) / "model.pt", tta=tta)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            scripted = torch.jit.load(str(ts_path))
        runners = {
            "onnx": lambda b: torch.from_numpy(session.run(None, {"images": b.numpy()})[0]),
            "torchscript": lambda b: scripted(b),
        }
        for name, fn in runners.items():
            t0 = time.perf_counter()
            with torch.no_grad():
                out = torch.cat([fn(x[i : i + args.batch]) for i in range(0, len(x), args.batch)])
            diff = (out - ref).abs().max().item()
            agree = (out.argmax(1) == ref.argmax(1)).float().mean().item()
            worst = max(worst, diff)
            verdict = "ok" if diff <= args.tol else f"FAIL (> {args.tol:g})"
            print(
                f"{name:<12} max abs diff {diff:.3e}  top-1 agreement {agree:.2%}  "
                f"({time.perf_counter() - t0:.2f} s, batch {args.batch})  {verdict}"
            )
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
