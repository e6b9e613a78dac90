"""Image files: the one list of image suffixes, the decompression-bomb guard, and decoding to uint8 CHW.

Dataset loading (`imagefolder`) and `cifarlab predict` both decode through `decode_image`, so a model sees
images prepared exactly like the ones it was trained on. JPEGs that need no resizing are decoded by
simplejpeg (libjpeg-turbo, ~8x faster than Pillow for small images, whose header parsing is Python: 60,000
CIFAR-10 JPEGs in 1.4 s instead of 11 s), with the same pixels; everything else goes through Pillow.

The rules `decode_image` applies to every file:

- Formats: only `ACCEPTED_FORMATS` (PNG, JPEG, GIF, BMP, WebP, TIFF, PPM/PGM), judged from the bytes, not the
  name; anything else is an `UnsupportedImageError` naming them. `cifarlab serve` accepts the same list.
- EXIF orientation (as phones and cameras write it) is applied, so the image is upright as browsers and
  photo viewers show it.
- Pixel limit (decompression bombs): at most `max_pixels` (default 40 MP) pixels are decoded, checked from the
  header before any pixel is. A JPEG much larger than the model input is decoded at 1/2, 1/4 or 1/8 scale in
  the DCT domain (Pillow's draft mode), so the limit applies to that reduced size, and its header may declare
  up to `JPEG_HEADER_FACTOR` times the limit (120 MP by default: any camera up to 100 MP medium format).
- Bit depth: 8-bit modes as they are; 16-bit grayscale (PNG, TIFF, PGM/PPM) scaled to 8 bits,
  v -> round(v / 257). Pillow opens 32-bit TIFFs and a few rarer formats as mode "I" too: a TIFF is read by its
  BitsPerSample tag (32 bits is refused), any other "I" image as 16-bit, refused if a value is outside
  0-65535. Floating-point images (mode "F") are refused: their values have no agreed 0-255 scale. A refusal
  is an `UnsupportedImageError` asking for the image as 8- or 16-bit.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

try:
    import simplejpeg
except ImportError:  # pragma: no cover - a machine without its wheel (a GPU host without internet): Pillow
    simplejpeg = None  # decodes the same pixels, ~5x slower (the first load of the JPEG copy, then the cache)

from cifarlab.errors import DataError

if TYPE_CHECKING:
    from PIL import Image as PILImage

__all__ = [
    "ACCEPTED_FORMATS",
    "FORMAT_NAMES",
    "IMAGE_SUFFIXES",
    "JPEG_HEADER_FACTOR",
    "MAX_IMAGE_PIXELS",
    "UnsupportedImageError",
    "bomb_guard",
    "bomb_numbers",
    "decode_image",
    "header_pixel_limit",
    "image_formats",
    "is_image_name",
    "is_regular_file",
    "pil_to_array",
    "skip_name",
]

# The image formats cifarlab decodes (Pillow's names), for dataset loading, `predict` and `serve` alike. Pillow
# is never asked to try its other decoders: it picks one from the bytes, whatever the name says, and some run
# external programs (EPS: Ghostscript) or are rarely exercised parsers (ICO, TGA, PCX, ...) -- no place for
# untrusted files. MPO: how Pillow names many phone JPEGs; PPM: the whole Netpbm family (PBM, PGM, PPM).
ACCEPTED_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "WEBP", "TIFF", "PPM")
# What a person is told to use: the formats above, as people name them.
FORMAT_NAMES = "PNG, JPEG, GIF, BMP, WebP, TIFF or PPM/PGM/PBM"
# Folders are searched for these (case-insensitive), by dataset loading and `cifarlab predict` alike; a file
# named explicitly is tried whatever its suffix. All are formats Pillow decodes: JPEG's other suffixes (.jfif,
# .jpe) and the Netpbm family (.ppm, .pgm, .pbm, .pnm) included.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
# Pillow's own default is ~89 MP (error at twice that). 40 MP of decoded pixels refuses a bomb long before it
# can allocate gigabytes; the size is checked from the header before a pixel is decoded.
MAX_IMAGE_PIXELS = 40_000_000
# A big JPEG is decoded at up to 1/8 scale (1/64 of its pixels), so its header may declare more than the limit:
# 3x (120 MP by default) covers 100 MP cameras. A baseline JPEG (what cameras and phones write) then needs
# only the reduced image in memory; a progressive one buffers its DCT coefficients, 3-6 bytes a header pixel.
JPEG_HEADER_FACTOR = 3
# Formats Pillow opens as JpegImageFile (MPO: phone photos with a depth map or gain map), where draft works.
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


class UnsupportedImageError(ValueError):
    """An image cifarlab does not read: a format outside `ACCEPTED_FORMATS`, or pixel values with no agreed
    8-bit meaning (floating point, 32-bit integer). The message says what to do."""


def image_formats() -> list[str]:
    """`ACCEPTED_FORMATS` that this Pillow build has (for ``Image.open(..., formats=)``)."""
    from PIL import Image

    Image.init()  # registers every plugin (MPO among them), so OPEN lists all this build can open
    return [f for f in ACCEPTED_FORMATS if f in Image.OPEN]


def _claimed(src: bytes | Path | str, formats: list[str]) -> bool:
    """True when one of `formats` recognises the file's first bytes (a damaged file of that format), False for
    a file of another format or none. Uses only the plugins' signature checks, never another decoder."""
    from PIL import Image

    if isinstance(src, bytes):
        prefix = src[:16]  # what Image.open hands the plugins' checks
    else:
        with open(src, "rb") as f:
            prefix = f.read(16)
    for fmt in formats:
        accept = Image.OPEN[fmt][1]
        result = accept(prefix) if accept is not None else True
        if result and not isinstance(result, str):  # a str is Pillow's "not this format, because ..."
            return True
    return False


def header_pixel_limit(fmt: str | None, max_pixels: int = MAX_IMAGE_PIXELS) -> int:
    """The most pixels an image of format `fmt` (Pillow's name) may declare in its header: `max_pixels`, or
    `JPEG_HEADER_FACTOR` times that for a JPEG, which is decoded at reduced size when it is that big."""
    return max_pixels * JPEG_HEADER_FACTOR if fmt in _JPEG_FORMATS else max_pixels


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
    """Pillow's own decompression-bomb limit set for `max_pixels` (its warning band an error) for a block.

    Pillow's limit becomes the largest header `decode_image` accepts (a JPEG's, see `header_pixel_limit`);
    `decode_image` checks each format's limit itself. Changes process-wide Pillow state: use it around
    single-threaded decoding only; it is only needed to let Pillow accept images above its default limit.
    """
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = header_pixel_limit("JPEG", max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _bomb_error(n: int, limit: int, jpeg: bool) -> Exception:
    """Pillow's own error and wording (callers parse the two numbers), naming the JPEG limit when it applied."""
    from PIL import Image

    what = " for JPEGs" if jpeg else ""
    return Image.DecompressionBombError(
        f"Image size ({n} pixels) exceeds limit of {limit} pixels{what}, could be decompression bomb DOS attack."
    )


def bomb_numbers(exc: BaseException) -> tuple[int | None, int | None, bool]:
    """(pixels, limit, whether the limit was the JPEG one) from a decompression-bomb error's message, Pillow's or
    `_bomb_error`'s (both say "Image size (N pixels) exceeds limit of L pixels"); None where it does not say."""
    import re

    text = str(exc)
    size = re.search(r"\((\d+) pixels\)", text)
    limit = re.search(r"limit of (\d+) pixels( for JPEGs)?", text)
    return (
        int(size.group(1)) if size else None,
        int(limit.group(1)) if limit else None,
        bool(limit and limit.group(2)),
    )


def _check_pixels(im: PILImage.Image, max_pixels: int, jpeg: bool = False) -> None:
    n = im.width * im.height
    if n > max_pixels:
        raise _bomb_error(n, max_pixels, jpeg)


def _open(src: bytes | Path | str, max_pixels: int) -> PILImage.Image:
    """Image.open limited to `ACCEPTED_FORMATS` (another format is an UnsupportedImageError naming them), with
    Pillow's own bomb refusal (under `bomb_guard` its limit is the JPEG one) reworded to name the limit that
    applies to this file's format."""
    from PIL import Image, UnidentifiedImageError

    formats = image_formats()
    try:
        return Image.open(io.BytesIO(src) if isinstance(src, bytes) else src, formats=formats)
    except UnidentifiedImageError:
        if _claimed(src, formats):
            raise  # an accepted format's signature, then a header that does not parse: a damaged file
        raise UnsupportedImageError(f"not an image cifarlab reads (send {FORMAT_NAMES})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        pixels = bomb_numbers(exc)[0]
        if pixels is None:
            raise
        jpeg = isinstance(src, bytes) and src.startswith(_JPEG_MAGIC)
        raise _bomb_error(pixels, header_pixel_limit("JPEG" if jpeg else None, max_pixels), jpeg) from None


def _tiff_bits(im: PILImage.Image) -> int | None:
    """A TIFF's BitsPerSample (the widest sample), None for other formats."""
    tags = getattr(im, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None
    if isinstance(bits, tuple):
        return max(int(b) for b in bits) if bits else None
    return int(bits) if bits is not None else None


def _deep_to_8bit(im: PILImage.Image) -> PILImage.Image:
    """16-bit modes scaled to 8 bits; float and 32-bit integer pixels refused (the rule in the module docstring)."""
    again = "save it as 8- or 16-bit first"
    if im.mode == "F":
        raise UnsupportedImageError(f"floating-point image (Pillow mode F): no agreed 0-255 scale; {again}")
    if im.mode == "I":
        bits = _tiff_bits(im) if im.format == "TIFF" else None
        if bits is not None and bits > 16:
            raise UnsupportedImageError(f"{bits}-bit integer image: no agreed 0-255 scale; {again}")
        lo, hi = cast("tuple[int, int]", im.getextrema())  # one band: (min, max)
        if lo < 0 or hi > 65535:  # Pillow's "I" may hold 32-bit data: only 0-65535 can be read as 16-bit
            raise UnsupportedImageError(
                f"integer image with values {lo}..{hi}, outside the 16-bit range 0..65535 read here; {again}"
            )
    return _to_8bit(im) if im.mode in _SIXTEEN_BIT_MODES else im


def _to_8bit(im: PILImage.Image) -> PILImage.Image:
    """16-bit grayscale scaled (not clipped) to 8 bits: v -> round(v / 257)."""
    from PIL import Image

    a = np.asarray(im).astype(np.int64).clip(0, 65535)
    return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")


def pil_to_array(im: PILImage.Image, channels: str = "RGB") -> np.ndarray:
    """A Pillow image as uint8 CHW.

    `channels="RGB"`: any mode to 3 channels (alpha dropped, like torchvision's loader). `channels="keep"`:
    L stays 1 channel, LA/RGBA keep alpha, everything else becomes RGB (palette images with transparency
    become RGBA). 16-bit images are scaled to 8 bits in both cases; float and 32-bit ones are refused
    (UnsupportedImageError), as `decode_image` refuses them.
    """
    im = _deep_to_8bit(im)
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


def _has_app1(data: bytes) -> bool:
    """True when a JPEG's header (up to its first scan) has an APP1 segment (EXIF or XMP: where an orientation
    lives), or cannot be walked; the fast path leaves those to Pillow, which applies the orientation."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return True
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
        elif marker == 0xE1:
            return True
        elif marker == 0xDA:
            return False
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return True


def _decode_jpeg_as_is(data: bytes, size: int | None, max_pixels: int) -> np.ndarray | None:
    """A JPEG that needs no resizing, decoded by simplejpeg; None for anything else (Pillow's path decides).

    Only plain YCbCr/greyscale images at their final size without EXIF/XMP (so without an orientation to
    apply) take this path: there both libraries run
    libjpeg-turbo's default (accurate) IDCT and fancy upsampling, so the pixels are identical (checked on all
    60,000 CIFAR-10 images, and in tests/test_data_reliability.py). Any libjpeg warning or error (a truncated
    or damaged file) falls back to Pillow, whose message the user sees.
    """
    if simplejpeg is None or not data.startswith(_JPEG_MAGIC) or _has_app1(data):
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
    src: bytes | Path | str,
    where: str,
    size: int | None = 32,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    native: list[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Decode one image file to uint8 RGB ``(3, H, W)``, upright by its EXIF orientation.

    Any mode is converted to RGB (alpha dropped; 16-bit scaled to 8 bits; float and 32-bit integer images
    refused, see the module docstring). With `size` the image is resized to ``size x size`` without keeping
    the aspect ratio: area averaging (Pillow BOX) when shrinking, bilinear when enlarging; ``size=None``
    keeps the native size. A JPEG at least 4x `size` on each side is first decoded at reduced size (still
    >= `size`). Images that would decode to more than `max_pixels` are refused before decoding (a JPEG's
    header may declare up to `header_pixel_limit`). A path that is not a regular file (a FIFO, device,
    folder) is refused without opening it. Any failure raises `DataError` naming `where`. `native`: a list the
    image's upright size before any resizing, (width, height), is appended to (so a loader can say what it
    resized).
    """
    from PIL import Image, ImageOps

    try:
        if not isinstance(src, bytes) and not is_regular_file(src):
            raise OSError(f"{src} is not a regular file (a FIFO, device, socket or folder)")
        if not isinstance(src, bytes):
            src = _read_if_jpeg(src) or src  # a JPEG file is read once, for whichever decoder takes it
        fast = _decode_jpeg_as_is(src, size, max_pixels) if isinstance(src, bytes) else None
        if fast is not None:
            if native is not None:
                native.append((fast.shape[2], fast.shape[1]))
            return fast
        with _open(src, max_pixels) as im:
            jpeg = im.format in _JPEG_FORMATS
            header = im.size  # before a JPEG draft reduces it
            if size is not None and jpeg and min(im.size) >= 4 * size:
                # DCT-domain downscale of big JPEGs (1/2..1/8, still >= size): much faster, and the limit
                # applies to the pixels decoded, so 48 MP photos load; the header has its own, higher cap.
                _check_pixels(im, header_pixel_limit(im.format, max_pixels), jpeg=True)
                im.draft("RGB", (size, size))
            _check_pixels(im, max_pixels)
            pre = im.size
            ImageOps.exif_transpose(im, in_place=True)  # upright, as browsers and photo viewers show it
            if native is not None:  # the file's size, upright (a quarter turn swaps width and height)
                native.append(header if im.size == pre else (header[1], header[0]))
            out: Any = _deep_to_8bit(im)
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
