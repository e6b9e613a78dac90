"""Tiny learnable synthetic image data for training tests (no files, no network)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from cifarlab.budget import Clock
from cifarlab.data import Dataset


def make_images(n_per_class: int, n_classes: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Class k: a bright square in one quadrant-ish position plus a class colour tint, plus noise."""
    g = torch.Generator().manual_seed(seed)
    n = n_per_class * n_classes
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = torch.randint(0, 90, (n, 3, 32, 32), generator=g).float()
    for k in range(n_classes):
        idx = y == k
        r, c = 4 + 12 * (k // 2 % 2), 4 + 12 * (k % 2)
        x[idx, k % 3, r : r + 12, c : c + 12] += 150
    x = x.clamp(0, 255).to(torch.uint8)
    perm = torch.randperm(n, generator=g)
    return x[perm].contiguous(), y[perm].contiguous()


def fit_tiny(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 5, lr: float = 1e-2) -> None:
    """Train `model` in place on float images `x` (already scaled) with Adam, batches of 16, on one thread (tiny
    models train fastest there); the model is left in eval mode and torch's thread count as it was."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(y))
            for i in range(0, len(y), 16):
                idx = perm[i : i + 16]
                loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()


def make_dataset(n_train_per_class: int = 64, n_test_per_class: int = 16, n_classes: int = 4) -> Dataset:
    x_tr, y_tr = make_images(n_train_per_class, n_classes, seed=0)
    x_te, y_te = make_images(n_test_per_class, n_classes, seed=1)
    return Dataset(
        name="synthetic",
        classes=tuple(f"class{k}" for k in range(n_classes)),
        x_train=x_tr,
        y_train=y_tr,
        x_test=x_te,
        y_test=y_te,
        source="synthetic",
        checksum="",
        cache_dir="",
    )


# The tiny reference recipe on the command line: shared by the CLI tests that train in a subprocess.
TINY_ARGS = [
    "--recipe",
    "reference",
    "--set",
    "widths=8,16,16",
    "--set",
    "dense_width=32",
    "--set",
    "batch_size=16",
    "--set",
    "precision=fp32",
]


def default_sigint() -> None:
    """`preexec_fn` for a subprocess that a test stops with Ctrl-C (SIGINT): a shell that runs the suite in the
    background starts it with SIGINT ignored, which the child would inherit, and Python then installs no
    KeyboardInterrupt handler."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_image_folder(root: Path, n_train: int = 60, n_test: int = 10, n_classes: int = 4) -> Path:
    """`make_images` as an ImageFolder tree (`root/{train,test}/class<k>/*.png`, n per class) for tests that
    train in a subprocess; returns `root`."""
    from PIL import Image

    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = make_images(n, n_classes, seed=seed)
        for i, (img, label) in enumerate(zip(x, y)):
            d = root / split / f"class{int(label)}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:04d}.png")
    return root


@contextlib.contextmanager
def determinism_restored() -> Iterator[None]:
    """Put torch's deterministic-algorithms switch (and the cuBLAS setting it needs) back as they were: an
    in-process `--deterministic` run turns them on for the whole test process."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


class FixedClock(Clock):
    """A clock that says no time has passed: the plan's arithmetic does not depend on how long the probe took."""

    def elapsed(self) -> float:
        return 0.0


class SizedSlow(nn.Module):
    """A training step takes `seconds` x (image side / 32)**2: a known cost per image size."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.fc = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(self.seconds * (x.shape[-1] / 32) ** 2)
        return self.fc(x.float().mean((2, 3)))
