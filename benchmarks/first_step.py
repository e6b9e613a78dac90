"""Start-up cost: a fresh process's time to its first training step of a recipe (no data loading).

Run it as a whole process under a timer, e.g. `/usr/bin/time -f %e python benchmarks/first_step.py`:
interpreter start, imports, building the model and the recipe's optimizer, one forward/backward/update on a
random batch. It also says whether torch's compiler front end (torch._dynamo) was imported on the way.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from cifarlab.models import build_model
from cifarlab.recipes import get_recipe
from cifarlab.train.optim import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="fast")
    args = ap.parse_args()
    t0 = time.perf_counter()
    recipe = get_recipe(args.recipe)
    model = build_model(recipe)
    optimizer = build_optimizer(model, recipe)
    x, y = torch.randn(recipe.batch_size, 3, 32, 32), torch.randint(0, 10, (recipe.batch_size,))
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    print(
        f"{args.recipe}: model, optimizer and one step {time.perf_counter() - t0:.2f} s; "
        f"torch._dynamo imported: {'torch._dynamo' in sys.modules}"
    )


if __name__ == "__main__":
    main()
