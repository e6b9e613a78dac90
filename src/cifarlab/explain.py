"""Saliency maps: which pixels a classifier's decision rests on, with Captum.

Two methods, both computed by Captum (never re-implemented here):

- ``gradcam``: Grad-CAM (Selvaraju et al. 2017) on the last convolution stage: the model's
  ``saliency_layer()`` when it defines one, else the last ``nn.Conv2d`` in ``model.modules()``. The class
  score's gradients, averaged over space, weight that layer's channels; the ReLU of the weighted sum is
  upsampled bilinearly to the image size (``LayerAttribution.interpolate``).
- ``integrated_gradients``: Integrated Gradients (Sundararajan et al. 2017) on the input, from a black image
  (after the run's scaling) to the image in ``steps`` steps; the map is the absolute attribution summed over
  the channels.

Images are uint8 ``(N, C, H, W)`` and go through `cifarlab.inference.to_float`, the scaling training used.
The model runs in eval mode, in float32, without test-time augmentation. Each map is min-max normalised per
image to [0, 1] (a constant map becomes all zeros).

`overlay` / `overlay_png` draw a map over its image (matplotlib colormap), for the CLI, the web service and the
report. Captum is an optional extra: ``pip install 'cifarlab[explain]'``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cifarlab.errors import UserError

__all__ = [
    "METHODS",
    "check_out_dir",
    "explain_paths",
    "explain_summary",
    "format_explain_table",
    "overlay",
    "overlay_png",
    "png_bytes",
    "saliency",
    "saliency_layer",
    "side_by_side_png",
]

METHODS = ("gradcam", "integrated_gradients")
COLORMAP = "jet"
# Images per forward/backward pass (`saliency`, `explain_paths`): memory stays flat whatever the number of images.
BATCH_SIZE = 64
# Integrated gradients: (image, step) pairs per pass; Captum splits the steps to fit it.
IG_INTERNAL = 256


def _captum_attr() -> Any:
    try:
        import captum.attr
    except ImportError:
        raise UserError("saliency maps need Captum: pip install 'cifarlab[explain]'") from None
    return captum.attr


def saliency_layer(model: nn.Module) -> nn.Module:
    """The layer Grad-CAM explains: `model.saliency_layer()` if defined, else the last `nn.Conv2d`."""
    fn = getattr(model, "saliency_layer", None)
    if callable(fn):
        layer = fn()
        if not isinstance(layer, nn.Module):
            raise UserError(f"{type(model).__name__}.saliency_layer() must return an nn.Module, got {layer!r}")
        return layer
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise UserError(
            f"{type(model).__name__} has no nn.Conv2d layer for Grad-CAM; define saliency_layer() on the model "
            "or use method='integrated_gradients'"
        )
    return convs[-1]


def _normalise(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> per-map min-max to [0, 1]; a constant map (all zeros, say) becomes zeros."""
    flat = maps.reshape(len(maps), -1)
    lo = flat.min(dim=1).values.view(-1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1)
    span = hi - lo
    out = torch.where(span > 0, (maps - lo) / torch.where(span > 0, span, torch.ones_like(span)), 0.0)
    return out.clamp(0, 1)


def saliency(
    model: nn.Module,
    images: torch.Tensor,
    *,
    method: str = "gradcam",
    target: int | Sequence[int] | torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    steps: int = 32,
    batch_size: int = BATCH_SIZE,
) -> torch.Tensor:
    """Saliency maps (N, H, W), float32 in [0, 1] on the CPU, for uint8 images (N, C, H, W).

    `target`: the class explained: one int for every image, one per image, or None for each image's predicted
    class. `mean`/`std`: the run's normalization (`Run.normalization`). `device`: where to compute (the model
    is moved there); default the device of the model's parameters. `steps`: integrated-gradients steps.
    `batch_size`: images per forward/backward pass, so memory stays bounded whatever N is (each map depends on
    its own image only, so the maps do not depend on it).
    """
    from cifarlab.inference import model_device, resolve_device

    if method not in METHODS:
        raise UserError(f"unknown saliency method {method!r}; use {' or '.join(METHODS)}")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError("saliency takes uint8 images (N, C, H, W)")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    attr = _captum_attr()
    n, _, h, w = images.shape
    if n == 0:
        return torch.zeros((0, h, w))
    dev = resolve_device(str(device)) if device is not None else model_device(model)
    if device is not None:
        model.to(dev)
    was_training = model.training
    model.eval()
    try:
        tgt: torch.Tensor | None = None
        if target is not None:
            tgt = torch.as_tensor(target, dtype=torch.long).reshape(-1)
            if len(tgt) == 1:
                tgt = tgt.expand(n)
            if len(tgt) != n:
                raise UserError(f"target: one class or one per image ({n}), got {len(tgt)}")
        maps = torch.cat(
            [
                _saliency_batch(
                    attr,
                    model,
                    images[i : i + batch_size],
                    None if tgt is None else tgt[i : i + batch_size],
                    method=method,
                    mean=mean,
                    std=std,
                    dev=dev,
                    steps=steps,
                )
                for i in range(0, n, batch_size)
            ]
        )
    finally:
        model.train(was_training)
    return _normalise(maps)


def _saliency_batch(
    attr: Any,
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor | None,
    *,
    method: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    dev: torch.device,
    steps: int,
) -> torch.Tensor:
    """`saliency` for one batch: raw (unnormalised) maps (n, H, W), float32 on the CPU."""
    from cifarlab.inference import to_float

    h, w = images.shape[2:]
    with torch.enable_grad(), torch.autocast(dev.type, enabled=False):
        x = to_float(images, mean, std, dev).contiguous()
        if target is None:
            with torch.no_grad():
                tgt = model(x).float().argmax(dim=1)
        else:
            tgt = target.to(dev)
        if method == "gradcam":
            cam = attr.LayerGradCam(model, saliency_layer(model))
            a = cam.attribute(x, target=tgt, relu_attributions=True)
            a = attr.LayerAttribution.interpolate(a, (h, w), interpolate_mode="bilinear")
            maps = a.detach().float().sum(dim=1)
        else:
            ig = attr.IntegratedGradients(model)
            baseline = to_float(torch.zeros_like(images[:1]), mean, std, dev).expand_as(x)
            # Captum raises internal_batch_size to the number of images (with a UserWarning) when it is smaller:
            # a batch is at most `batch_size` images, so this bound holds and nothing is printed.
            a = ig.attribute(
                x, baselines=baseline, target=tgt, n_steps=steps, internal_batch_size=max(IG_INTERNAL, len(x))
            )
            maps = a.detach().float().abs().sum(dim=1)
    return maps.cpu()

    return _normalise(maps.cpu())


# -- drawing ----------------------------------------------------------------------------------------------


def _image_hwc(image: Any) -> np.ndarray:
    a = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] not in (1, 3, 4):
        raise ValueError(f"image must be (C, H, W) with 1, 3 or 4 channels, got {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {a.dtype}")
    a = a[:3].transpose(1, 2, 0)
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def overlay(image_chw_uint8: Any, heat_hw: Any, alpha: float = 0.5) -> np.ndarray:
    """The map drawn over its image: (H, W, 3) uint8 = (1 - alpha) * image + alpha * colormap(heat).

    `image_chw_uint8`: (C, H, W) uint8 (grayscale is shown as RGB); `heat_hw`: (H, W) in [0, 1]."""
    from matplotlib import colormaps

    img = _image_hwc(image_chw_uint8)
    heat = heat_hw.detach().cpu().numpy() if isinstance(heat_hw, torch.Tensor) else np.asarray(heat_hw)
    heat = np.nan_to_num(heat.astype(np.float64), nan=0.0)
    if heat.shape != img.shape[:2]:
        raise ValueError(f"heat map {heat.shape} does not match the image's {img.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = colormaps[COLORMAP](np.clip(heat, 0, 1))[..., :3] * 255.0
    out = (1.0 - alpha) * img.astype(np.float64) + alpha * colours
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def png_bytes(rgb_hwc: np.ndarray, scale: int = 1) -> bytes:
    """(H, W, 3) uint8 as PNG bytes, nearest-upscaled by `scale`."""
    from PIL import Image

    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    big = np.repeat(np.repeat(rgb_hwc, scale, axis=0), scale, axis=1) if scale > 1 else rgb_hwc
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(big), "RGB").save(buf, "PNG")
    return buf.getvalue()


def overlay_png(image: Any, heat: Any, scale: int = 4) -> bytes:
    """`overlay(image, heat)` as PNG bytes, nearest-upscaled `scale` times (a 32x32 image becomes 128x128)."""
    return png_bytes(overlay(image, heat), scale)


# -- image files (`cifarlab explain`) ----------------------------------------------------------------------


def side_by_side_png(image: Any, heat: Any, title: str, scale: int = 4) -> bytes:
    """PNG of the image as the model sees it beside the map over it, with `title` above (matplotlib, Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = _image_hwc(image)
    over = overlay(image, heat)
    h, w = img.shape[:2]
    side = max(1.6, min(4.0, w * scale / 100))
    fig = Figure(figsize=(2 * side + 0.3, side * h / w + 0.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for ax, pic, label in zip(fig.subplots(1, 2), (img, over), ("input", "saliency"), strict=True):
        ax.imshow(pic, interpolation="nearest")
        ax.set_title(label, fontsize=8)
        ax.set_axis_off()
    fig.suptitle(title.replace("$", r"\$"), fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _target_index(target: int | str | None, classes: Sequence[str]) -> int | None:
    if target is None:
        return None
    if isinstance(target, str) and target in classes:
        return list(classes).index(target)
    try:
        i = int(target)
    except (TypeError, ValueError):
        i = -1
    if not 0 <= i < len(classes):
        raise UserError(
            f"--target {target!r} is not one of the run's classes ({', '.join(classes)}) nor an index "
            f"0..{len(classes) - 1}"
        )
    return i


def _png_stems(paths: Sequence[Any]) -> list[str]:
    """A unique, informative file stem per image: its own stem, prefixed with its folder's name when the images
    come from more than one folder (a class-folder tree keeps its classes: `cat-0000`, `dog-0000`); a stem that
    is still taken gets `-2`, `-3`, ..."""
    from pathlib import Path

    paths = [Path(p) for p in paths]
    folders = {p.parent.absolute() for p in paths}
    used: set[str] = set()
    stems = []
    for p in paths:
        base = p.stem or "image"
        if len(folders) > 1 and p.parent.absolute().name:
            base = f"{p.parent.absolute().name}-{base}"
        stem, k = base, 2
        while stem in used:
            stem, k = f"{base}-{k}", k + 1
        used.add(stem)
        stems.append(stem)
    return stems


def check_out_dir(out: Any) -> None:
    """Refuse, before any model work, an output folder that is a file (or lies under a file)."""
    from pathlib import Path

    p = Path(out)
    for q in (p, *p.parents):
        if q.exists() or q.is_symlink():
            if not q.is_dir():
                if q == p:
                    raise UserError(f"--out {p} is a file, not a folder; give a folder for the PNGs")
                raise UserError(f"--out {p} cannot be a folder: {q} is a file; give a folder for the PNGs")
            return


def explain_paths(
    run_dir: Any,
    paths: Sequence[Any],
    *,
    methods: Sequence[str] = ("gradcam",),
    out_dir: Any = None,
    target: int | str | None = None,
    steps: int = 32,
    device: str | None = None,
    max_pixels: int | None = None,
    batch_size: int = BATCH_SIZE,
) -> list[dict[str, Any]]:
    """Explain image files and folders with a saved run; write `<name>.<method>.png` per image and method.

    `<name>` is the image's stem, prefixed with its folder's name when the images come from several folders
    (`cat-0000`), made unique with `-2`, `-3`, ... Images are decoded like `cifarlab predict` at the run's input
    shape and explained `batch_size` at a time (decode, classify, maps, PNGs, then the next batch), so memory
    does not grow with the number of images. Returns rows in input order: {"path", "method", "class",
    "probability", "written"} per image and method ("replaced": True when that PNG already existed and was
    overwritten), {"path", "error"} for a file that could not be read, and {"path", "method", "class",
    "probability", "error"} when a PNG could not be written; each row also has "image", the index of its
    input file (after folders are expanded). `target`: a class name or index to explain instead
    of the predicted class."""
    from pathlib import Path

    from cifarlab.files import atomic_write_bytes
    from cifarlab.inference import resolve_device, to_float
    from cifarlab.predict import MAX_IMAGE_PIXELS, _load, _stack, expand_paths
    from cifarlab.runs import load_run

    for m in methods:
        if m not in METHODS:
            raise UserError(f"unknown saliency method {m!r}; use {' or '.join(METHODS)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _captum_attr()  # fail before any work when the extra is missing
    run = load_run(run_dir)
    classes = run.classes
    tgt = _target_index(target, classes)
    out = Path(out_dir) if out_dir is not None else Path(run.path) / "explain"
    check_out_dir(out)
    dev = resolve_device(device)
    model = run.build_model().to(dev)
    mean, std = run.normalization

    entries = expand_paths(paths)
    todo = [i for i, (_, err) in enumerate(entries) if err is None]
    stems = dict(zip(todo, _png_stems([entries[i][0] for i in todo]), strict=True))
    rows: dict[int, list[dict[str, Any]]] = {
        i: [{"path": str(p), "error": err, "image": i}] for i, (p, err) in enumerate(entries) if err is not None
    }
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        decoded, failed = _load([entries[i] for i in chunk], max_pixels or MAX_IMAGE_PIXELS, run.input_shape)
        for j, msg in failed.items():
            rows[chunk[j]] = [{"path": str(entries[chunk[j]][0]), "error": msg, "image": chunk[j]}]
        if not decoded:
            continue
        x = _stack([a for _, a in decoded])
        with torch.no_grad():
            probs = torch.softmax(model(to_float(x, mean, std, dev)).float() / run.temperature, dim=1).cpu()
        cls = torch.full((len(x),), tgt) if tgt is not None else probs.argmax(dim=1)
        maps = {
            m: saliency(
                model, x, method=m, target=cls, mean=mean, std=std, device=dev, steps=steps, batch_size=batch_size
            )
            for m in methods
        }
        for row, (j, _) in enumerate(decoded):
            i = chunk[j]
            path = entries[i][0]
            c = int(cls[row])
            p = float(probs[row, c])
            rows[i] = []
            for m in methods:
                r: dict[str, Any] = {"path": str(path), "method": m, "class": classes[c], "probability": p, "image": i}
                dest = out / f"{stems[i]}.{m}.png"
                title = f"{classes[c]} {p:.1%}  ({m.replace('_', ' ')})"
                existed = dest.is_file()
                try:
                    atomic_write_bytes(dest, side_by_side_png(x[row], maps[m][row], title))
                    r["written"] = str(dest)
                    if existed:
                        r["replaced"] = True
                except OSError as exc:
                    r["error"] = f"cannot write {dest}: {exc.strerror or exc}"
                rows[i].append(r)
        del x, probs, maps
    return [r for i in sorted(rows) for r in rows[i]]


def explain_summary(rows: Sequence[dict[str, Any]]) -> str:
    """One line for the end of `cifarlab explain`: images explained (PNGs written), images failed, PNGs that
    replaced earlier ones. An image counts as failed when it could not be read or any of its PNGs failed."""
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for k, r in enumerate(rows):
        by_image.setdefault(r.get("image", ("row", k)), []).append(r)
    images = list(by_image.values())
    ok = sum(all("written" in r for r in g) for g in images)
    bad = len(images) - ok
    pngs = sum("written" in r for r in rows)
    replaced = sum(bool(r.get("replaced")) for r in rows)

    def n(count: int, word: str) -> str:
        return f"{count} {word}{'' if count == 1 else 's'}"

    text = f"{n(ok, 'image')} explained ({n(pngs, 'PNG')})"
    if bad:
        text += f", {bad} failed"
    if replaced:
        text += f"; {replaced} of the PNGs replaced one of the same name"
    return text


def format_explain_table(rows: Sequence[dict[str, Any]]) -> str:
    """path | method | class | probability | written file (or the error), for a terminal (names escaped)."""
    from cifarlab.text import terminal_safe

    if not rows:
        return "no images"
    paths = [terminal_safe(r["path"]) for r in rows]
    width = min(60, max(len("path"), *(len(p) for p in paths)))
    cls_w = max(len("class"), *(len(terminal_safe(r.get("class", ""))) for r in rows))
    header = f"{'path':<{width}}  {'method':<20}  {'class':<{cls_w}}  {'prob':>6}  written"
    lines = [header, "-" * len(header)]
    for r, path in zip(rows, paths, strict=True):
        if "class" not in r:
            msg = terminal_safe(r["error"])
            lines.append(f"{path:<{width}}  {msg if msg.startswith('skipped:') else 'error: ' + msg}")
            continue
        done = terminal_safe(r["written"]) if "written" in r else "error: " + terminal_safe(r["error"])
        if r.get("replaced"):
            done += "  (replaced an earlier PNG)"
        lines.append(
            f"{path:<{width}}  {r['method']:<20}  {terminal_safe(r['class']):<{cls_w}}  "
            f"{100 * r['probability']:>5.1f}%  {done}"
        )
    return "\n".join(lines)
