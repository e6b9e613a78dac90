"""`cifarlab predict`: classify image files and folders with a trained run.

Preprocessing is the training loader's own: every image goes through `cifarlab.data.images.decode_image` (EXIF
orientation applied, any mode -> RGB with alpha dropped, 16-bit scaled to 8 bits, float and 32-bit images
refused, any size -> 32x32 with BOX when shrinking / bilinear when enlarging, no aspect ratio kept; big JPEGs
decoded at reduced size first), then `inference.predict_proba` applies the run's scaling,
normalization and TTA. Alpha is dropped rather than composited on white because that is what the ImageFolder
training data went through: a model only sees inputs prepared like the ones it learned from.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.data.images import (
    IMAGE_SUFFIXES,
    MAX_IMAGE_PIXELS,
    UnsupportedImageError,
    bomb_guard,
    bomb_numbers,
    decode_image,
    is_image_name,
    is_regular_file,
    skip_name,
)
from cifarlab.errors import DataError, UserError
from cifarlab.text import terminal_safe

__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "expand_paths", "format_table", "load_images", "predict_paths"]

# Folders are searched for these; a file named on the command line is tried whatever its extension.
IMAGE_EXTENSIONS = IMAGE_SUFFIXES  # the one list, shared with dataset loading
NOT_REGULAR = "skipped: not a regular file"
LEADS_NOWHERE = "a link that leads nowhere (its target is missing, or it loops)"


def expand_paths(paths: Iterable[Path | str]) -> list[tuple[Path, str | None]]:
    """[(path, None)] for each file to decode and [(path, error)] for a missing path, a folder without
    images, a folder that cannot be read or a non-regular file, in the order given; folders expand recursively
    (sorted, image extensions only, hidden entries skipped, symlinked folders not followed). A FIFO, device or
    socket is never opened (that can block forever): inside a folder it is listed as "skipped: not a regular
    file" (a link that leads nowhere as "skipped: a link that leads nowhere"), named directly it is an error."""
    out: list[tuple[Path, str | None]] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += _expand_folder(p)
        elif is_regular_file(p):
            out.append((p, None))
        elif p.exists():
            out.append((p, "not a regular file or folder (a FIFO, device or socket): refused"))
        elif p.is_symlink():  # exists() follows links: a dangling or looping link lands here
            out.append((p, LEADS_NOWHERE))
        else:
            out.append((p, "no such file or folder"))
    return out


def _expand_folder(folder: Path) -> list[tuple[Path, str | None]]:
    found: list[tuple[Path, str | None]] = []
    unreadable: list[Path] = []

    def cannot_list(exc: OSError) -> None:
        # os.walk would skip the folder silently: its images would be missing from the output.
        where = Path(exc.filename) if exc.filename is not None else folder
        unreadable.append(where)
        found.append((where, f"cannot read this folder: {exc.strerror or exc}"))

    for root, dirs, names in os.walk(folder, onerror=cannot_list):
        dirs[:] = sorted(d for d in dirs if not skip_name(d))
        for n in sorted(names):
            if is_image_name(n):
                f = Path(root) / n
                found.append((f, None if is_regular_file(f) else _why_skipped(f)))
    if folder not in unreadable and not any(err is None for _, err in found):
        found.append((folder, f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder"))
    return found


def _why_skipped(path: Path) -> str:
    """Why an image-named entry of a folder is not read: a FIFO, device or socket, a link to nothing, or a folder
    that can be listed but not entered (mode r--), whose entries cannot even be looked at."""
    try:
        dangling = path.is_symlink() and not path.exists()
    except OSError as exc:  # pathlib swallows only "no such file": EACCES comes through
        return f"cannot read: {exc.strerror or exc} (make its folder readable: chmod u+rx {path.parent})"
    return f"skipped: {LEADS_NOWHERE}" if dangling else NOT_REGULAR


def _check_reads_files_for(shape: tuple[int, int, int]) -> None:
    c, h, w = shape
    if h != w or c not in (1, 3):
        raise DataError(f"this model takes {c}x{h}x{w} images; predict reads files for square 1- or 3-channel models")


def _decode(
    path: Path | bytes, max_pixels: int, shape: tuple[int, int, int] = (3, 32, 32), where: str | None = None
) -> np.ndarray:
    """uint8 `shape` (C, H, W) exactly as the training ImageFolder loader decodes it; one channel is the
    ITU-R 601 luma of the RGB image. `path` may be the file's bytes (`cifarlab serve`); `where` names it in
    errors (default: the path)."""
    c, h, w = shape
    _check_reads_files_for(shape)
    rgb = decode_image(path, where if where is not None else str(path), h, max_pixels=max_pixels)
    if c == 1:
        luma = rgb.astype(np.float32).transpose(1, 2, 0) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[None]
    return rgb


def _error_message(exc: BaseException, max_pixels: int) -> str:
    from PIL import Image

    cause = exc.__cause__ if isinstance(exc, DataError) and exc.__cause__ is not None else exc
    if isinstance(cause, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        pixels, limit, jpeg = bomb_numbers(cause)  # decode_image names the limit that applied (JPEG's or not)
        size = f"{pixels:,} pixels" if pixels is not None else "too many pixels"
        over = f"{limit:,}-pixel limit{' for JPEGs' if jpeg else ''}" if limit else f"{max_pixels:,}-pixel limit"
        return f"refused: {size}, over the {over} (possible decompression bomb)"
    if isinstance(cause, UnsupportedImageError):  # says what to do; not "refused": serve maps that to 413
        return str(cause)
    if isinstance(cause, OSError) and "cannot identify image file" in str(cause):
        return "not an image Pillow can read (unknown format or damaged file)"
    return f"cannot read image ({type(cause).__name__}: {cause})"


def _load(
    entries: Sequence[tuple[Path, str | None]], max_pixels: int, shape: tuple[int, int, int] = (3, 32, 32)
) -> tuple[list[tuple[int, np.ndarray]], dict[int, str]]:
    """Decode every entry without an error: ([(index, (3, 32, 32) array)], {index: error message})."""
    _check_reads_files_for(shape)  # the model, not any file: said once, not as every file's error
    decoded: list[tuple[int, np.ndarray]] = []
    failed = {i: err for i, (_, err) in enumerate(entries) if err is not None}
    with bomb_guard(max_pixels):
        for i, (f, err) in enumerate(entries):
            if err is not None:
                continue
            try:
                decoded.append((i, _decode(f, max_pixels, shape)))
            except Exception as exc:  # noqa: BLE001 (one bad file must not stop the others)
                failed[i] = _error_message(exc, max_pixels)
    return decoded, failed


def _stack(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    if not arrays:
        return torch.empty((0, 3, 32, 32), dtype=torch.uint8)
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))


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
    decoded, failed = _load(entries, max_pixels, run.input_shape)
    x = _stack([a for _, a in decoded])
    mean, std = run.normalization
    results: list[dict[str, Any]] = [{"path": str(p)} for p, _ in entries]
    for i, msg in failed.items():
        results[i]["error"] = msg
    if len(x):
        opts = {**recipe_options(run.recipe), "precision": prec}
        probs = predict_proba(model, x, mean=mean, std=std, device=dev, temperature=run.temperature, **opts)
        top_p, top_i = probs.topk(min(top_k, len(classes)), dim=1)
        for row, (i, _) in enumerate(decoded):
            results[i]["top_k"] = [
                {"class": classes[c], "probability": float(p)}
                for p, c in zip(top_p[row].tolist(), top_i[row].tolist(), strict=True)
            ]
    return results


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """path | top-k as 'class 93.1%' columns; failed files show their error in place of the classes.

    For a terminal: control characters in paths, class names and messages are escaped (`terminal_safe`);
    the JSON output keeps the real names."""
    if not results:
        return "no images"
    paths = [terminal_safe(r["path"]) for r in results]
    width = min(60, max(len("path"), *(len(p) for p in paths)))
    k = max((len(r.get("top_k", [])) for r in results), default=0)
    header = f"{'path':<{width}}  " + "  ".join(f"{'top-' + str(j + 1):<20}" for j in range(k))
    lines = [header.rstrip(), "-" * len(header.rstrip())]
    for r, path in zip(results, paths, strict=True):
        # A path is never shortened: a long one only pushes its own row's columns right.
        if "error" in r:
            msg = terminal_safe(r["error"])
            lines.append(f"{path:<{width}}  {msg if msg.startswith('skipped:') else 'error: ' + msg}")
        else:
            cells = [f"{terminal_safe(t['class'])} {100 * t['probability']:.1f}%" for t in r["top_k"]]
            lines.append((f"{path:<{width}}  " + "  ".join(f"{c:<20}" for c in cells)).rstrip())
    return "\n".join(lines)
