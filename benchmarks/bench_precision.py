"""Training-step and inference speed of a recipe's model in fp32 / bf16, NCHW / channels_last.

    python benchmarks/bench_precision.py --recipe reference

Prints ms per training step (forward, loss with L2, backward, Adam/SGD step) at the recipe's batch size,
the implied seconds per epoch, and inference time for 10,000 images. Synthetic inputs: this measures the
kernels, not the data pipeline.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cifarlab.inference import set_threads
from cifarlab.models import build_model
from cifarlab.recipes import get_recipe
from cifarlab.train import build_optimizer


def bench(recipe_name: str, dtype: torch.dtype | None, channels_last: bool, steps: int) -> tuple[float, float]:
    recipe = get_recipe(recipe_name)
    model = build_model(recipe)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = build_optimizer(model, recipe)
    bs = recipe.batch_size
    x = torch.rand(bs, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (bs,))

    def step() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    train = (time.perf_counter() - t0) / steps
    model.eval()
    xe = torch.rand(1000, 3, 32, 32).contiguous(memory_format=fmt)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        model(xe)
        t0 = time.perf_counter()
        for _ in range(3):
            model(xe)
    infer = (time.perf_counter() - t0) / 3 * 10
    return train, infer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="reference")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--train-images", type=int, default=40_000, help="images per epoch for the s/epoch column")
    args = ap.parse_args()
    threads = set_threads()
    print(f"recipe {args.recipe}, batch {get_recipe(args.recipe).batch_size}, {threads} threads")
    print(f"{'precision':<10}{'layout':<15}{'ms/step':>9}{'s/epoch (train)':>17}{'10k inference (s)':>19}")
    for dtype, name in ((None, "fp32"), (torch.bfloat16, "bf16")):
        for cl in (False, True):
            train, infer = bench(args.recipe, dtype, cl, args.steps)
            per_epoch = train * args.train_images / get_recipe(args.recipe).batch_size
            layout = "channels_last" if cl else "NCHW"
            print(f"{name:<10}{layout:<15}{train * 1000:>9.1f}{per_epoch:>17.1f}{infer:>19.2f}", flush=True)


if __name__ == "__main__":
    main()
