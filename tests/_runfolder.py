"""Tiny run folders for predict/export/runs tests: a random-init model saved the way training saves one."""

from __future__ import annotations

from pathlib import Path

import torch

from cifarlab.models import build_model, init_whitening
from cifarlab.recipes import Recipe, get_recipe
from cifarlab.runs import CONFIG, TEMPERATURE, WEIGHTS, save_weights, write_json

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def tiny_recipe(model: str = "reference_cnn") -> Recipe:
    if model == "airnet":
        # 6-view TTA (fast itself uses 2): the richest inference path, for the parity tests
        return get_recipe("fast").replace(widths=(8, 16, 16), tta="flip_translate")
    return get_recipe("reference").replace(widths=(8, 16, 16), dense_width=32)


def make_run(
    run_dir: Path, recipe: Recipe, classes: tuple[str, ...] = CLASSES, seed: int = 0, temperature: float | None = None
) -> Path:
    """config.json + model.safetensors for `recipe`, with non-trivial BN statistics (and whitening filters
    for the airnet) so probabilities are far from uniform; `temperature`: a softmax temperature in the weights'
    metadata, as a calibrated run has one."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = build_model(recipe, num_classes=len(classes))
    mean = std = None
    if recipe.scaling == "standardize":
        mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
        last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.mul_(10 if recipe.model == "reference_cnn" else 60)  # peaky, not near-uniform, outputs
        if recipe.whiten_init:
            x = torch.randint(0, 256, (64, 3, 32, 32), generator=g).float() / 255
            if mean is not None:
                x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
            init_whitening(model.whiten, x)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        run_dir / CONFIG,
        {
            "recipe": recipe.to_dict(),
            "seed": recipe.seed,
            "dataset": {"name": "synthetic", "classes": list(classes), "checksum": ""},
            "normalization": {"mean": mean, "std": std},
            "versions": {"cifarlab": "test"},
        },
    )
    meta = None if temperature is None else {TEMPERATURE: repr(temperature)}
    save_weights(model, run_dir / WEIGHTS, metadata=meta)
    return run_dir
