"""Common corruptions in the manner of CIFAR-10-C, and a run's accuracy under them.

Hendrycks & Dietterich (ICLR 2019), "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", built CIFAR-10-C by corrupting the CIFAR-10 test set at five severities. The corruptions here
follow their CIFAR script (`make_cifar_c.py`) with its severity parameters, re-implemented with numpy, scipy
and Pillow on uint8 batches (N, C, H, W) of any size and 1 or 3 channels (brightness works in HSV for RGB,
on the grey level for one channel):

| corruption | parameter | severity 1 .. 5 |
| --- | --- | --- |
| gaussian_noise | std of additive N(0, s^2) noise (pixels in [0, 1]) | 0.04, 0.06, 0.08, 0.09, 0.10 |
| shot_noise | photon count c: Poisson(x * c) / c | 500, 250, 100, 75, 50 |
| impulse_noise | salt-and-pepper share of values | 0.01, 0.02, 0.03, 0.05, 0.07 |
| gaussian_blur | sigma in pixels | 0.4, 0.6, 0.7, 0.8, 1.0 |
| brightness | added to V in HSV | 0.05, 0.10, 0.15, 0.20, 0.30 |
| contrast | factor towards each image's mean | 0.75, 0.50, 0.40, 0.30, 0.15 |
| fog | (strength, plasma-fractal wibble decay) | (0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75) |
| pixelate | downscale factor (box down, box up) | 0.95, 0.90, 0.85, 0.75, 0.65 |
| jpeg | JPEG quality (Pillow) | 80, 65, 58, 50, 40 |

Severity 0 is the identity: `corrupt` returns exactly the input. Random corruptions draw from a numpy
generator seeded with (seed, the corruption's name): the same seed gives the same output on every machine,
and one seed uses the same noise at every severity, so a higher severity never changes a pixel less (the
noise is scaled, the salt-and-pepper set grows). Registered in `CORRUPTIONS`; a new corruption is one
decorated function `(x, severity, rng) -> x` on float64 (N, C, H, W) in [0, 1]:

    from cifarlab.corruptions import CORRUPTIONS

    @CORRUPTIONS.register("invert")
    def invert(x, severity, rng):
        '''blend towards the negative'''
        a = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
        return (1 - a) * x + a * (1 - x)

`evaluate_corruptions` measures a saved run's accuracy on corrupted copies of (part of) its test set; the
`cifarlab evaluate RUN_DIR --corruptions` command prints it and saves `eval_corruptions.json`.
"""

from __future__ import annotations

import io
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from cifarlab.errors import UserError
from cifarlab.registry import Registry
from cifarlab.text import terminal_safe

__all__ = [
    "CORRUPTIONS",
    "MAX_SEVERITY",
    "corrupt",
    "evaluate_corruptions",
    "format_corruptions",
    "parse_severities",
]

# (x float64 (N, C, H, W) in [0, 1], severity 1..5, rng) -> float array in [0, 1] of the same shape
CORRUPTIONS: Registry[Callable[..., Any]] = Registry("corruption", "corruption")
MAX_SEVERITY = 5

T = TypeVar("T", torch.Tensor, np.ndarray)


def _param(values: Sequence[Any], severity: int) -> Any:
    return values[severity - 1]


def corrupt(x: T, name: str, severity: int, seed: int = 0) -> T:
    """`x` (uint8 (N, C, H, W), torch or numpy) corrupted by `name` at `severity` (0 = the input itself,
    1..5 as in CIFAR-10-C); uint8 of the same shape and kind, deterministic for `seed`."""
    if isinstance(x, torch.Tensor):
        return torch.from_numpy(_corrupt_array(x.detach().cpu().numpy(), name, severity, seed)).to(x.device)
    return _corrupt_array(np.asarray(x), name, severity, seed)


def _corrupt_array(arr: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    entry = CORRUPTIONS.get(name)
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 0 <= severity <= MAX_SEVERITY:
        raise UserError(f"severity must be an integer 0..{MAX_SEVERITY}, got {severity!r}")
    if arr.dtype != np.uint8 or arr.ndim != 4:
        raise ValueError(f"corrupt takes uint8 (N, C, H, W) images, got {arr.dtype} {arr.shape}")
    if severity == 0:
        return arr.copy()
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode())])
    out = np.asarray(entry.fn(arr.astype(np.float64) / 255.0, int(severity), rng), dtype=np.float64)
    if out.shape != arr.shape:
        raise ValueError(f"corruption {name!r} changed the shape {arr.shape} to {out.shape}")
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


# -- the corruptions ---------------------------------------------------------------------------------------


@CORRUPTIONS.register("gaussian_noise")
def gaussian_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """additive Gaussian noise (std 0.04 .. 0.10)"""
    s = _param((0.04, 0.06, 0.08, 0.09, 0.10), severity)
    return np.clip(x + rng.standard_normal(x.shape) * s, 0, 1)


@CORRUPTIONS.register("shot_noise")
def shot_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Poisson (photon) noise, 500 .. 50 photons at full intensity"""
    c = _param((500, 250, 100, 75, 50), severity)
    return np.clip(rng.poisson(x * c) / c, 0, 1)


@CORRUPTIONS.register("impulse_noise")
def impulse_noise(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """salt-and-pepper noise on 1% .. 7% of the values"""
    amount = _param((0.01, 0.02, 0.03, 0.05, 0.07), severity)
    hit = rng.random(x.shape) < amount
    salt = rng.random(x.shape) < 0.5
    out = x.copy()
    out[hit & salt] = 1.0
    out[hit & ~salt] = 0.0
    return out


@CORRUPTIONS.register("gaussian_blur")
def gaussian_blur(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (sigma 0.4 .. 1 pixel)"""
    from scipy.ndimage import gaussian_filter

    sigma = _param((0.4, 0.6, 0.7, 0.8, 1.0), severity)
    return np.clip(gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0), 0, 1)


@CORRUPTIONS.register("brightness")
def brightness(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """brighter: +0.05 .. +0.3 on the HSV value"""
    from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

    c = _param((0.05, 0.1, 0.15, 0.2, 0.3), severity)
    if x.shape[1] != 3:
        return np.clip(x + c, 0, 1)  # grey levels: the value is the pixel
    hsv = rgb_to_hsv(x.transpose(0, 2, 3, 1))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return np.clip(hsv_to_rgb(hsv).transpose(0, 3, 1, 2), 0, 1)


@CORRUPTIONS.register("contrast")
def contrast(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """lower contrast: pixels pulled towards each channel's mean (factor 0.75 .. 0.15)"""
    c = _param((0.75, 0.5, 0.4, 0.3, 0.15), severity)
    means = x.mean(axis=(2, 3), keepdims=True)  # per image and channel, as CIFAR-10-C (HWC axes 0, 1)
    return np.clip((x - means) * c + means, 0, 1)


def _plasma_fractal(size: int, wibbledecay: float, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) diamond-square plasma fractal in [0, 1] (size a power of two), as CIFAR-10-C's fog."""
    maparray = np.zeros((size, size), dtype=np.float64)
    stepsize = size
    wibble = 100.0

    def wibbledmean(array: np.ndarray) -> np.ndarray:
        return array / 4 + wibble * rng.uniform(-wibble, wibble, array.shape)

    while stepsize >= 2:
        # squares
        cornerref = maparray[0:size:stepsize, 0:size:stepsize]
        squareaccum = cornerref + np.roll(cornerref, shift=-1, axis=0)
        squareaccum = squareaccum + np.roll(squareaccum, shift=-1, axis=1)
        maparray[stepsize // 2 : size : stepsize, stepsize // 2 : size : stepsize] = wibbledmean(squareaccum)
        # diamonds
        drgrid = maparray[stepsize // 2 : size : stepsize, stepsize // 2 : size : stepsize]
        ulgrid = maparray[0:size:stepsize, 0:size:stepsize]
        ltsum = drgrid + np.roll(drgrid, 1, axis=0) + ulgrid + np.roll(ulgrid, -1, axis=1)
        maparray[0:size:stepsize, stepsize // 2 : size : stepsize] = wibbledmean(ltsum)
        ttsum = drgrid + np.roll(drgrid, 1, axis=1) + ulgrid + np.roll(ulgrid, -1, axis=0)
        maparray[stepsize // 2 : size : stepsize, 0:size:stepsize] = wibbledmean(ttsum)
        stepsize //= 2
        wibble /= wibbledecay
    maparray -= maparray.min()
    peak = maparray.max()
    return maparray / peak if peak > 0 else maparray


@CORRUPTIONS.register("fog")
def fog(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """fog: a plasma fractal added (strength 0.2 .. 1.5), then rescaled"""
    strength, decay = _param(((0.2, 3), (0.5, 3), (0.75, 2.5), (1.0, 2), (1.5, 1.75)), severity)
    n, _, h, w = x.shape
    size = 1 << max(1, (max(h, w) - 1).bit_length())
    out = np.empty_like(x)
    for i in range(n):
        max_val = x[i].max()
        img = x[i] + strength * _plasma_fractal(size, decay, rng)[:h, :w][None]
        out[i] = np.clip(img * max_val / (max_val + strength), 0, 1)
    return out


def _per_plane(img_chw: np.ndarray, fn: Callable[[Any], Any]) -> np.ndarray:
    """Apply a PIL image -> PIL image function to an RGB image, or to each plane of any other image."""
    from PIL import Image

    u8 = np.clip(np.rint(img_chw * 255.0), 0, 255).astype(np.uint8)
    if u8.shape[0] == 3:
        out = np.asarray(fn(Image.fromarray(np.ascontiguousarray(u8.transpose(1, 2, 0)), "RGB")).convert("RGB"))
        return out.transpose(2, 0, 1).astype(np.float64) / 255.0
    planes = [np.asarray(fn(Image.fromarray(np.ascontiguousarray(p), "L")).convert("L")) for p in u8]
    return np.stack(planes).astype(np.float64) / 255.0


@CORRUPTIONS.register("pixelate")
def pixelate(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """pixelation: box-downscaled to 95% .. 65% of the size, then box-upscaled back"""
    from PIL import Image

    c = _param((0.95, 0.9, 0.85, 0.75, 0.65), severity)
    h, w = x.shape[2:]
    small = (max(1, int(w * c)), max(1, int(h * c)))

    def fn(img: Any) -> Any:
        return img.resize(small, Image.Resampling.BOX).resize((w, h), Image.Resampling.BOX)

    return np.stack([_per_plane(img, fn) for img in x])


@CORRUPTIONS.register("jpeg")
def jpeg(x: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """JPEG compression (Pillow, quality 80 .. 40)"""
    from PIL import Image

    quality = _param((80, 65, 58, 50, 40), severity)

    def fn(img: Any) -> Any:
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            return decoded.copy()

    return np.stack([_per_plane(img, fn) for img in x])


# -- a run's accuracy under corruption ----------------------------------------------------------------------


def parse_severities(text: str | Sequence[int]) -> tuple[int, ...]:
    """Parse "1,2,3" (or a sequence of ints) -> (1, 2, 3): sorted, unique, each in 0..5."""
    items: list[Any] = [s for s in text.split(",") if s.strip()] if isinstance(text, str) else list(text)
    try:
        values = sorted({int(s) for s in items})
    except (TypeError, ValueError):
        raise UserError(f"severities {text!r}: give integers 0..{MAX_SEVERITY} separated by commas") from None
    if not values or any(not 0 <= v <= MAX_SEVERITY for v in values):
        raise UserError(f"severities {text!r}: give integers 0..{MAX_SEVERITY} separated by commas")
    return tuple(values)


def evaluate_corruptions(
    run_dir: Path | str,
    dataset: Any = None,
    data_dir: Path | str | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    names: Sequence[str] | None = None,
    limit: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """A saved run's accuracy on its test set (or `limit` of its images, a random subset fixed by `seed`: test
    sets are often stored class by class, so the first N would be a few classes) under each corruption and
    severity.

    Predictions use the run's scaling, normalization, TTA and precision, exactly like `cifarlab evaluate`.
    `dataset`: the data (default: the run's, loaded from `data_dir`); `names`: corruptions (default: every
    registered one); `progress(line)` is called once per corruption. Returns (the `eval_corruptions.json`
    format; accuracies are fractions in [0, 1]):

        {
          "clean_accuracy": 0.83,                 # on the same images, uncorrupted
          "n": 1000,                              # images used
          "seed": 0,                              # the corruptions' seed
          "severities": [1, 2, 3, 4, 5],
          "results": {"gaussian_noise": {"1": 0.71, "2": 0.64, ...}, ...},   # JSON keys are strings
          "mean_accuracy": 0.61,                  # over every corruption and severity (0, clean, left out)
          "relative_drop": 0.265,                 # 1 - mean_accuracy / clean_accuracy
          "per_corruption": {"gaussian_noise": 0.55, ...},  # each corruption's mean over the severities
          "corruptions": {"gaussian_noise": "additive Gaussian noise (std 0.04 .. 0.10)", ...},
          "run": "runs/...", "dataset": {"name", "source", "checksum"}, "seconds": 12.3
        }

    `results[name]` has int keys in Python (strings once written as JSON); `relative_drop` is None when the
    clean accuracy is 0.
    """
    from cifarlab.evaluate import check_dataset, load_run_dataset
    from cifarlab.inference import predict_logits, recipe_options, resolve_device
    from cifarlab.runs import load_run

    t_start = time.perf_counter()
    names = list(CORRUPTIONS.names() if names is None else names)
    for name in names:
        CORRUPTIONS.get(name)  # an unknown name: one error listing the accepted ones
    sev = parse_severities(severities)
    if not any(sev):
        raise UserError("--severities 0 alone corrupts nothing (0 is the clean images); add severities 1..5")
    if limit is not None and limit < 1:
        raise UserError(f"--corruption-limit {limit}: must be >= 1")
    run = load_run(run_dir)
    if dataset is None:
        dataset = load_run_dataset(run, Path(data_dir) if data_dir is not None else None)
    info = check_dataset(run, dataset)
    x, y = dataset.x_test, dataset.y_test
    if limit is not None and limit < len(y):
        pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
        x, y = x[pick], y[pick]
    if len(y) == 0:
        raise UserError("nothing to evaluate: the test split has no images")
    y_np = y.numpy() if hasattr(y, "numpy") else np.asarray(y)
    mean, std = run.normalization
    device = resolve_device("auto")
    model = run.inference_model(device)
    opts = recipe_options(run.recipe)

    def accuracy(images: torch.Tensor) -> float:
        logits = predict_logits(model, images, mean=mean, std=std, device=device, **opts)
        return float((logits.argmax(1).numpy() == y_np).mean())

    clean = accuracy(x)
    results: dict[str, dict[int, float]] = {}
    for name in names:
        results[name] = {s: clean if s == 0 else accuracy(corrupt(x, name, s, seed)) for s in sev}
        if progress is not None:
            progress(f"{name}: " + "  ".join(f"{s}: {a:.2%}" for s, a in results[name].items()))
    # Severity 0 (the clean images, shown beside the others for comparison) is not a corruption: the means and
    # the drop are over severities 1..5 only.
    per_name = {name: float(np.mean([a for s, a in r.items() if s > 0])) for name, r in results.items()}
    overall = float(np.mean([a for r in results.values() for s, a in r.items() if s > 0])) if results else clean
    return {
        "clean_accuracy": clean,
        "n": int(len(y_np)),
        "seed": int(seed),
        "severities": list(sev),
        "results": results,
        "mean_accuracy": overall,
        "relative_drop": (1.0 - overall / clean) if clean > 0 else None,
        "per_corruption": per_name,
        "corruptions": {name: CORRUPTIONS.describe(name) for name in names},
        "run": str(run.path),
        "dataset": {"name": info.name, "source": info.source, "checksum": info.checksum},
        "seconds": time.perf_counter() - t_start,
    }


def format_corruptions(result: dict[str, Any]) -> str:
    """The terminal table of `evaluate_corruptions`: one row per corruption, one column per severity."""
    sev = [int(s) for s in result["severities"]]
    rows = result["results"]
    width = max(10, *(len(terminal_safe(n)) for n in rows)) if rows else 10
    header = f"{'corruption':<{width}}  " + "  ".join(f"{'sev ' + str(s):>7}" for s in sev) + "     mean"
    lines = [
        f"corruptions on {result['n']:,} test images (seed {result['seed']}): clean accuracy "
        f"{result['clean_accuracy']:.2%}",
        "",
        header,
        "-" * len(header),
    ]
    for name, accs in rows.items():
        cells = "  ".join(f"{float(accs.get(s, accs.get(str(s), float('nan')))):>7.2%}" for s in sev)
        lines.append(f"{terminal_safe(name):<{width}}  {cells}  {result['per_corruption'][name]:>7.2%}")
    drop = result["relative_drop"]
    lines += [
        "",
        f"mean corruption accuracy {result['mean_accuracy']:.2%}"
        + (f"   relative drop from clean {drop:.1%}" if drop is not None else "   relative drop: n/a (clean is 0%)"),
    ]
    return "\n".join(lines)
