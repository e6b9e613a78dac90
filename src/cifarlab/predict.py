"""`cifarlab predict`: classify image files and folders with a trained run.

Preprocessing is the training loader's own: every image goes through `cifarlab.data._decode_image` (any mode
-> RGB with alpha dropped, any size -> 32x32 with BOX when shrinking / bilinear when enlarging, no aspect
ratio kept), then `inference.predict_proba` applies the run's scaling, normalization and TTA. Alpha is
dropped rather than composited on white because that is what the ImageFolder training data went through:
a model only sees inputs prepared like the ones it learned from.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.errors import DataError, UserError

# Folders are searched for these; a file named on the command line is tried whatever its extension.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
# Pillow's own default is ~89 MP (error at twice that). 40 MP covers any camera photo and refuses a bomb
# long before it can allocate gigabytes; Pillow checks the header's size before decoding a single pixel.
MAX_IMAGE_PIXELS = 40_000_000


@contextlib.contextmanager
def _bomb_guard(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit set to `max_pixels`, its warning band turned into an error."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _skip(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"  # hidden files, macOS resource forks


def _is_image_name(name: str) -> bool:
    return not _skip(name) and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def expand_paths(paths: Iterable[Path | str]) -> list[tuple[Path, str | None]]:
    """[(path, None)] for each file to decode and [(path, error)] for a missing path or a folder without
    images, in the order given; folders expand recursively (sorted, image extensions only, hidden entries
    skipped, symlinked folders not followed)."""
    out: list[tuple[Path, str | None]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found: list[Path] = []
            for root, dirs, names in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not _skip(d))
                found += [Path(root) / n for n in sorted(names) if _is_image_name(n)]
            out += [(f, None) for f in found]
            if not found:
                out.append((p, f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder"))
        elif p.is_file():
            out.append((p, None))
        elif p.exists():
            out.append((p, "not a regular file or folder"))
        else:
            out.append((p, "no such file or folder"))
    return out


def _decode(path: Path) -> np.ndarray:
    """(32, 32, 3) uint8 exactly as the training ImageFolder loader decodes it."""
    from cifarlab.data import _decode_image

    return _decode_image(path, str(path))


def _error_message(exc: BaseException, max_pixels: int) -> str:
    from PIL import Image

    cause = exc.__cause__ if isinstance(exc, DataError) and exc.__cause__ is not None else exc
    if isinstance(cause, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        m = re.search(r"\((\d+) pixels\)", str(cause))
        size = f"{int(m.group(1)):,} pixels" if m else "too many pixels"
        return f"refused: {size}, over the {max_pixels:,}-pixel limit (possible decompression bomb)"
    if isinstance(cause, OSError) and "cannot identify image file" in str(cause):
        return "not an image Pillow can read (unknown format or damaged file)"
    return f"cannot read image ({type(cause).__name__}: {cause})"


def _load(
    entries: Sequence[tuple[Path, str | None]], max_pixels: int
) -> tuple[list[tuple[int, np.ndarray]], dict[int, str]]:
    """Decode every entry without an error: ([(index, (32, 32, 3) array)], {index: error message})."""
    decoded: list[tuple[int, np.ndarray]] = []
    failed = {i: err for i, (_, err) in enumerate(entries) if err is not None}
    with _bomb_guard(max_pixels):
        for i, (f, err) in enumerate(entries):
            if err is not None:
                continue
            try:
                decoded.append((i, _decode(f)))
            except Exception as exc:  # noqa: BLE001 (one bad file must not stop the others)
                failed[i] = _error_message(exc, max_pixels)
    return decoded, failed


def _stack(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    if not arrays:
        return torch.empty((0, 3, 32, 32), dtype=torch.uint8)
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays).transpose(0, 3, 1, 2)))


def load_images(
    paths: Iterable[Path | str], max_pixels: int = MAX_IMAGE_PIXELS
) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
    """Decode files and folders: (uint8 (N, 3, 32, 32), the N paths decoded, [(path, error message)])."""
    entries = expand_paths(paths)
    decoded, failed = _load(entries, max_pixels)
    errors = [(str(entries[i][0]), msg) for i, msg in sorted(failed.items())]
    return _stack([a for _, a in decoded]), [str(entries[i][0]) for i, _ in decoded], errors


def predict_paths(
    run_dir: Path | str,
    paths: Iterable[Path | str],
    top_k: int = 3,
    *,
    device: str | None = None,
    precision: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> list[dict[str, Any]]:
    """One dict per file, in input order: {"path", "top_k": [{"class", "probability"}, ...]} or
    {"path", "error"}. Uses the run's normalization, TTA, precision and memory format."""
    from cifarlab.inference import predict_proba, recipe_options, resolve_device
    from cifarlab.runs import load_run

    if top_k < 1:
        raise UserError(f"--top-k {top_k}: must be >= 1")
    run = load_run(run_dir)
    model = run.build_model()  # safetensors weights: nothing from the run folder is unpickled
    classes = run.classes
    dev = resolve_device(device)
    model.to(dev)
    prec = precision or run.recipe.precision
    if prec == "fp16" and dev.type != "cuda":
        prec = "auto"  # a CUDA-trained fp16 run predicting on a CPU: fp16 autocast does not exist there

    entries = expand_paths(paths)
    decoded, failed = _load(entries, max_pixels)
    x = _stack([a for _, a in decoded])
    mean, std = run.normalization
    results: list[dict[str, Any]] = [{"path": str(p)} for p, _ in entries]
    for i, msg in failed.items():
        results[i]["error"] = msg
    if len(x):
        probs = predict_proba(
            model, x, mean=mean, std=std, device=dev, **{**recipe_options(run.recipe), "precision": prec}
        )
        top_p, top_i = probs.topk(min(top_k, len(classes)), dim=1)
        for row, (i, _) in enumerate(decoded):
            results[i]["top_k"] = [
                {"class": classes[c], "probability": float(p)}
                for p, c in zip(top_p[row].tolist(), top_i[row].tolist(), strict=True)
            ]
    return results


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """path | top-k as 'class 93.1%' columns; failed files show their error in place of the classes."""
    if not results:
        return "no images"
    width = min(60, max(len("path"), *(len(r["path"]) for r in results)))
    k = max((len(r.get("top_k", [])) for r in results), default=0)
    header = f"{'path':<{width}}  " + "  ".join(f"{'top-' + str(j + 1):<20}" for j in range(k))
    lines = [header.rstrip(), "-" * len(header.rstrip())]
    for r in results:
        path = r["path"]  # never shortened: a long path only pushes its own row's columns right
        if "error" in r:
            lines.append(f"{path:<{width}}  error: {r['error']}")
        else:
            cells = [f"{t['class']} {100 * t['probability']:.1f}%" for t in r["top_k"]]
            lines.append((f"{path:<{width}}  " + "  ".join(f"{c:<20}" for c in cells)).rstrip())
    return "\n".join(lines)
