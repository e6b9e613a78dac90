"""Image files: the one list of image suffixes, the decompression-bomb guard, and decoding to uint8 CHW.

Dataset loading (`imagefolder`) and `cifarlab predict` both decode through `decode_image`, so a model sees
images prepared exactly like the ones it was trained on. JPEGs that need no resizing are decoded by
simplejpeg (libjpeg-turbo, ~8x faster than Pillow for small images, whose header parsing is Python: 60,000
CIFAR-10 JPEGs in 1.4 s instead of 11 s), with the same pixels; everything else goes through Pillow.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import simplejpeg

from cifarlab.errors import DataError

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS",
    "bomb_guard",
    "decode_image",
    "is_image_name",
    "is_regular_file",
    "pil_to_array",
    "skip_name",
]

# Folders are searched for these (case-insensitive); a file named explicitly is tried whatever its suffix.
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
# Pillow's own default is ~89 MP (error at twice that). 40 MP covers any camera photo and refuses a bomb
# long before it can allocate gigabytes; the size is checked from the header before a pixel is decoded.
MAX_IMAGE_PIXELS = 40_000_000

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def skip_name(name: str) -> bool:
    """Hidden files and folders, macOS resource forks: never data."""
    return name.startswith(".") or name == "__MACOSX"


def is_image_name(name: str) -> bool:
    return not skip_name(name) and Path(name).suffix.lower() in IMAGE_SUFFIXES


def is_regular_file(path: Path | str) -> bool:
    """True for a regular file (or a link to one). Never opens it: opening a FIFO can block forever."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


@contextlib.contextmanager
def bomb_guard(max_pixels: int = MAX_IMAGE_PIXELS) -> Iterator[None]:
    """Pillow's own decompression-bomb limit set to `max_pixels` (its warning band an error) for a block.

    Changes process-wide Pillow state: use it around single-threaded decoding only. `decode_image` checks
    `max_pixels` itself, so this is only needed to let Pillow accept images above its default limit.
    """
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _check_pixels(im: PILImage.Image, max_pixels: int) -> None:
    from PIL import Image

    n = im.width * im.height
    if n > max_pixels:
        raise Image.DecompressionBombError(
            f"Image size ({n} pixels) exceeds limit of {max_pixels} pixels, could be decompression bomb DOS attack."
        )


def _to_8bit(im: PILImage.Image) -> PILImage.Image:
    """16-bit grayscale scaled (not clipped) to 8 bits: v -> round(v / 257)."""
    from PIL import Image

    a = np.asarray(im).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")


def pil_to_array(im: PILImage.Image, channels: str = "RGB") -> np.ndarray:
    """A Pillow image as uint8 CHW.

    `channels="RGB"`: any mode to 3 channels (alpha dropped, like torchvision's loader). `channels="keep"`:
    L stays 1 channel, LA/RGBA keep alpha, everything else becomes RGB (palette images with transparency
    become RGBA). 16-bit images are scaled to 8 bits in both cases.
    """
    if im.mode in _SIXTEEN_BIT_MODES:
        im = _to_8bit(im)
    if im.mode in ("P", "PA"):
        im = im.convert("RGBA" if "transparency" in im.info or im.mode == "PA" else "RGB")
    if channels == "keep":
        if im.mode not in ("L", "LA", "RGB", "RGBA"):
            im = im.convert("RGB")
    elif im.mode != "RGB":
        im = im.convert("RGB")
    a = np.asarray(im, dtype=np.uint8)
    if a.ndim == 2:
        a = a[:, :, None]
    return np.ascontiguousarray(a.transpose(2, 0, 1))


_JPEG_MAGIC = b"\xff\xd8\xff"


def _read_if_jpeg(path: Path | str) -> bytes | None:
    """The file's bytes if it is a JPEG (by its first bytes), else None without reading further."""
    with open(path, "rb") as f:
        head = f.read(len(_JPEG_MAGIC))
        return head + f.read() if head == _JPEG_MAGIC else None


def _decode_jpeg_as_is(data: bytes, size: int | None, max_pixels: int) -> np.ndarray | None:
    """A JPEG that needs no resizing, decoded by simplejpeg; None for anything else (Pillow's path decides).

    Only plain YCbCr/greyscale images at their final size take this path: there both libraries run
    libjpeg-turbo's default (accurate) IDCT and fancy upsampling, so the pixels are identical (checked on all
    60,000 CIFAR-10 images, and in tests/test_data_reliability.py). Any libjpeg warning or error (a truncated
    or damaged file) falls back to Pillow, whose message the user sees.
    """
    if not data.startswith(_JPEG_MAGIC):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray") or height * width > max_pixels:
            return None
        if size is not None and (height, width) != (size, size):
            return None
        rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    except ValueError:
        return None
    return np.ascontiguousarray(rgb.transpose(2, 0, 1))


def decode_image(
    src: bytes | Path | str, where: str, size: int | None = 32, *, max_pixels: int = MAX_IMAGE_PIXELS
) -> np.ndarray:
    """Decode one image file to uint8 RGB ``(3, H, W)``.

    Any mode is converted to RGB (alpha dropped; 16-bit scaled to 8 bits). With `size` the image is resized
    to ``size x size`` without keeping the aspect ratio: area averaging (Pillow BOX) when shrinking, bilinear
    when enlarging; ``size=None`` keeps the native size. Images over `max_pixels` are refused before
    decoding. A path that is not a regular file (a FIFO, device, folder) is refused without opening it.
    Any failure raises `DataError` naming `where`.
    """
    from PIL import Image

    try:
        if not isinstance(src, bytes) and not is_regular_file(src):
            raise OSError(f"{src} is not a regular file (a FIFO, device, socket or folder)")
        if not isinstance(src, bytes):
            src = _read_if_jpeg(src) or src  # a JPEG file is read once, for whichever decoder takes it
        fast = _decode_jpeg_as_is(src, size, max_pixels) if isinstance(src, bytes) else None
        if fast is not None:
            return fast
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            _check_pixels(im, max_pixels)
            if size is not None and im.format == "JPEG" and min(im.size) >= 4 * size:
                im.draft("RGB", (size, size))  # DCT-domain downscale of big JPEGs: much faster, still >= size
            out: Any = im
            if out.mode in _SIXTEEN_BIT_MODES:
                out = _to_8bit(out)
            if out.mode in ("P", "PA") and "transparency" in out.info:
                out = out.convert("RGBA")
            rgb = out.convert("RGB")
            if size is not None and rgb.size != (size, size):
                shrink = rgb.width >= size and rgb.height >= size
                rgb = rgb.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
            return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1))
    except Exception as exc:  # noqa: BLE001 (PIL raises many types for bad files)
        raise DataError(
            f"cannot decode image {where} ({type(exc).__name__}: {exc}). Delete or replace that file, then re-run."
        ) from exc
