"""Reliability of dataset loading: damaged archives and caches, FIFOs, 16-bit PNGs (each test fails on the
code before the fix)."""

from __future__ import annotations

import gzip
import json
import logging
import os
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cifarlab.data import decode_image, load_dataset
from cifarlab.errors import DataError
from conftest import tar_tree, write_cifar_archive, write_imagefolder


def _cache_files() -> list[Path]:
    d = Path(os.environ["CIFARLAB_CACHE"])
    return sorted(d.rglob("*")) if d.exists() else []


def _within(seconds: float, fn: Callable[[], Any], unblock: Path | None = None) -> Any:
    """fn() run in a thread; fails (instead of hanging the suite) when it has not returned in `seconds`."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (re-raised below, in the test's thread)
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if unblock is not None:  # release a reader blocked on the FIFO, so the thread can end
            with open(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK), "wb"):
                pass
        pytest.fail(f"still running after {seconds} s (blocked on a FIFO?)")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


# -- damaged archives ------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["middle", "near-end", "crc-trailer", "length-trailer"])
def test_flipped_byte_in_official_archive_is_detected(tmp_path, where) -> None:
    t = write_cifar_archive(tmp_path / "d")
    good = t.path.read_bytes()
    n = len(good)
    _flip(t.path, {"middle": n // 2, "near-end": n - 200, "crc-trailer": n - 6, "length-trailer": n - 2}[where])
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz is damaged.*Delete it and re-run"):
        load_dataset("cifar10", t.data_dir)
    assert _cache_files() == []  # nothing from the damaged stream was cached
    t.path.write_bytes(good)
    ds = load_dataset("cifar10", t.data_dir)
    np.testing.assert_array_equal(ds.x_train.numpy(), t.x_train)


def test_changed_pixel_in_stored_gzip_is_detected_not_cached(tmp_path) -> None:
    # With stored (uncompressed) deflate blocks a flipped byte decodes fine: a silently changed pixel that
    # only the gzip CRC32 reveals. It used to load and be cached.
    t = write_cifar_archive(tmp_path / "d", python2=True)  # raw pixel bytes in the pickles, like the real files
    stored = gzip.compress(gzip.decompress(t.path.read_bytes()), compresslevel=0)
    t.path.write_bytes(stored)
    pixels = t.x_train.reshape(len(t.x_train), -1)[7, 1000:1064].tobytes()
    at = stored.find(pixels)
    assert at > 0
    _flip(t.path, at + 10)
    with pytest.raises(DataError, match=r"is damaged.*its gzip checksum does not match"):
        load_dataset("cifar10", t.data_dir)
    assert _cache_files() == []


@pytest.mark.parametrize("mode", ["gz", "bz2", "xz"])
def test_flipped_byte_in_imagefolder_tarball_is_detected(tmp_path, mode) -> None:
    t = write_imagefolder(tmp_path / "src" / "cifar10-jpeg")
    archive = tmp_path / f"tree.tar.{mode}"
    with tarfile.open(archive, f"w:{mode}") as tar:
        tar.add(t.root, arcname="tree")
    good = archive.read_bytes()
    _flip(archive, len(good) - (6 if mode == "gz" else 40))
    with pytest.raises(DataError, match=r"tree\.tar\.\w+ is damaged.*re-create"):
        load_dataset(archive)
    assert _cache_files() == []
    archive.write_bytes(good)
    assert len(load_dataset(archive).x_train) == 12


def test_flipped_byte_in_cifar10_jpeg_copy_is_detected(tmp_path) -> None:
    colours = {f"c{i}": (i * 20, 100, 200 - i * 10) for i in range(3)}
    t = write_imagefolder(tmp_path / "src" / "cifar10-jpeg", colours)
    (tmp_path / "d").mkdir()
    archive = tar_tree(t.root, tmp_path / "d" / "cifar10-jpeg.tar.gz")
    _flip(archive, archive.stat().st_size - 7)  # in the gzip CRC32 trailer
    with pytest.raises(DataError, match="cifar10-jpeg.tar.gz is damaged"):
        load_dataset("cifar10", tmp_path / "d", download=False)
    assert _cache_files() == []


# -- damaged cache files ---------------------------------------------------------------------------


def _safetensors(tensors: dict[str, torch.Tensor], classes: list[str]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata={"classes": json.dumps(classes)})


@pytest.mark.parametrize("damage", ["truncated", "header", "dtype", "shape", "labels"])
def test_damaged_cache_is_rebuilt_with_one_warning(tmp_path, damage, caplog) -> None:
    t = write_cifar_archive(tmp_path / "d")
    load_dataset("cifar10", t.data_dir)
    (cache_file,) = [p for p in _cache_files() if p.suffix == ".safetensors"]
    good = {"x_train": torch.from_numpy(t.x_train), "y_train": torch.from_numpy(t.y_train)}
    good |= {"x_test": torch.from_numpy(t.x_test), "y_test": torch.from_numpy(t.y_test)}
    if damage == "truncated":
        cache_file.write_bytes(cache_file.read_bytes()[:-100])
    elif damage == "header":
        cache_file.write_bytes(b"\xff" * 8 + cache_file.read_bytes()[8:])
    elif damage == "dtype":
        cache_file.write_bytes(_safetensors({**good, "x_train": good["x_train"].float()}, list(t.classes)))
    elif damage == "shape":
        cache_file.write_bytes(
            _safetensors({**good, "x_test": good["x_test"][:, :, :16].contiguous()}, list(t.classes))
        )
    else:
        cache_file.write_bytes(_safetensors({**good, "y_train": good["y_train"] + 10}, list(t.classes)))
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        ds = load_dataset("cifar10", t.data_dir)
    np.testing.assert_array_equal(ds.x_train.numpy(), t.x_train)
    np.testing.assert_array_equal(ds.y_train.numpy(), t.y_train)
    notes = [r for r in caplog.records if r.name == "cifarlab.data.cache"]
    assert len(notes) == 1 and "\n" not in notes[0].getMessage() and notes[0].exc_info is None
    assert str(cache_file) in notes[0].getMessage()
    load_dataset("cifar10", t.data_dir)  # rebuilt: reads back fine now
    assert cache_file.stat().st_size > 1000


# -- FIFOs -----------------------------------------------------------------------------------------


def test_fifo_in_image_folder_is_skipped(tmp_path) -> None:
    t = write_imagefolder(tmp_path / "tree")
    fifo = t.root / "train" / "cat" / "zz_fifo.png"
    os.mkfifo(fifo)
    ds = _within(20, lambda: load_dataset(t.root), unblock=fifo)
    assert len(ds.x_train) == 12


@pytest.mark.parametrize("name", ["cifar10-jpeg.tar.gz", "cifar-10-python.tar.gz"])
def test_fifo_named_like_an_archive_is_refused(tmp_path, name) -> None:
    (tmp_path / "d").mkdir()
    fifo = tmp_path / "d" / name
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        _within(5, lambda: load_dataset("cifar10", tmp_path / "d", download=False), unblock=fifo)
    with pytest.raises(DataError, match="not a regular file"):
        _within(5, lambda: load_dataset(fifo), unblock=fifo)


# -- 16-bit PNGs -----------------------------------------------------------------------------------


def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path) -> None:
    from PIL import Image

    values = np.array([[0, 257, 0x8000, 65535]], dtype=np.uint16).repeat(4, axis=0)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # really 16-bit on disk
    x = decode_image(path, str(path), size=None)
    assert x.shape == (3, 4, 4) and x.dtype == np.uint8
    assert x[0, 0].tolist() == [0, 1, 128, 255] and (x[0] == x[2]).all()


# -- JPEGs: simplejpeg where it gives Pillow's pixels, Pillow everywhere else ------------------------


def _pillow_decode(data: bytes, size: int | None) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
        if size is not None and rgb.size != (size, size):
            shrink = min(rgb.size) >= size
            rgb = rgb.resize((size, size), Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
        return np.asarray(rgb).transpose(2, 0, 1)


@pytest.mark.parametrize(
    "mode, options",
    [
        ("RGB", {"subsampling": "4:2:0"}),
        ("RGB", {"subsampling": "4:2:2", "quality": 60}),
        ("RGB", {"subsampling": "4:4:4", "quality": 95}),
        ("RGB", {"progressive": True}),
        ("L", {}),
        ("CMYK", {}),  # not YCbCr: Pillow's path
    ],
)
@pytest.mark.parametrize("shape", [(32, 32), (33, 17)])
def test_jpeg_decodes_to_pillows_pixels(tmp_path, mode, options, shape) -> None:
    import io

    from PIL import Image

    from cifarlab.data import images

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    noise.save(buf, "JPEG", **options)
    data = buf.getvalue()
    path = tmp_path / "x.jpg"
    path.write_bytes(data)
    as_is = images._decode_jpeg_as_is(data, size=None, max_pixels=10**6)
    assert (as_is is None) == (mode == "CMYK")  # the fast path really ran for the others
    for size in (None, 32):
        want = _pillow_decode(data, size)
        np.testing.assert_array_equal(decode_image(data, "x", size), want)
        np.testing.assert_array_equal(decode_image(path, "x", size), want)


def test_without_simplejpeg_pillow_decodes_the_same_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    """simplejpeg is a speed-up, not a requirement: a machine without its wheel (the GPU hosts of this project
    have no internet) decodes every JPEG with Pillow, to the same pixels."""
    import io

    from PIL import Image

    from cifarlab.data import images

    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    fast = decode_image(data, "x", 32)
    assert images._decode_jpeg_as_is(data, size=32, max_pixels=10**6) is not None
    monkeypatch.setattr(images, "simplejpeg", None)
    assert images._decode_jpeg_as_is(data, size=32, max_pixels=10**6) is None
    np.testing.assert_array_equal(decode_image(data, "x", 32), fast)
    # And the module imports where the package is missing altogether.
    import subprocess
    import sys

    code = "import sys; sys.modules['simplejpeg'] = None; import cifarlab.data.images as m; print(m.simplejpeg)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "None"


def test_damaged_jpeg_is_pillows_clear_error_not_garbage(tmp_path) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "JPEG")
    truncated = buf.getvalue()[: len(buf.getvalue()) // 2]  # libjpeg only warns; strict decoding refuses it
    with pytest.raises(DataError, match=r"cannot decode image where \(OSError: .*[Tt]runcated"):
        decode_image(truncated, "where", 32)
    with pytest.raises(DataError, match="exceeds limit of 100 pixels"):
        decode_image(buf.getvalue(), "where", 32, max_pixels=100)
