"""Datasets: official CIFAR-10/100 archives, ImageFolder trees, the uint8 `Dataset`, splits and `BatchLoader`.

Images stay uint8 ``(N, 3, 32, 32)`` (channel-planar, like the official rows) until a batch is drawn; labels
are int64 ``(N,)``. Decoding happens once per source file: the arrays are cached in a safetensors file
keyed by the source's MD5 (or, for a plain folder, by a fingerprint of its file list), written atomically.

Where ``load_dataset("cifar10", data_dir)`` looks, in order: ``cifar-10-batches-py/`` (extracted official
batches), ``cifar-10-python.tar.gz`` (official archive), ``cifar10-jpeg.tar.gz`` / ``cifar10-jpeg/`` (JPEG
ImageFolder copy), else it downloads the official archive (when ``download=True``).

Where decoded arrays are cached (first that applies): the ``cache_dir`` argument; ``$CIFARLAB_CACHE``;
``<data dir>/cifarlab-cache/`` when the data dir is writable; ``~/.cache/cifarlab``.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import pickle
import stat
import tarfile
import tempfile
import time
import urllib.request
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cifarlab import __version__
from cifarlab.errors import ConfigError, DataError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "CIFAR10_CLASSES",
    "ChecksumWarning",
    "OFFICIAL",
    "BatchLoader",
    "Dataset",
    "OfficialArchive",
    "channel_stats",
    "default_data_dir",
    "download_url",
    "file_md5",
    "load_dataset",
    "resolve_cache_dir",
    "sample_grid_figure",
    "scale_images",
    "scaling_constants",
    "split_indices",
]

log = logging.getLogger(__name__)

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_SIZE = 32
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
CACHE_SUBDIR = "cifarlab-cache"
_CACHE_VERSION = 1  # bump when the decoded layout or resize rule changes: old cache files are then ignored
_ROW_BYTES = 3 * IMAGE_SIZE * IMAGE_SIZE


class ChecksumWarning(UserWarning):
    """An archive's MD5 differs from the official one (it still loads)."""


@dataclass(frozen=True)
class OfficialArchive:
    """Where an official "python version" archive comes from and what is inside it."""

    name: str
    url: str
    filename: str
    md5: str
    folder: str  # top-level folder inside the archive
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    jpeg_names: tuple[str, ...] = ()  # ImageFolder copies accepted in the data dir, in order of preference


OFFICIAL: dict[str, OfficialArchive] = {
    "cifar10": OfficialArchive(
        name="cifar10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        filename="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        jpeg_names=("cifar10-jpeg.tar.gz", "cifar10-jpeg"),
    ),
    "cifar100": OfficialArchive(
        name="cifar100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        filename="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
    ),
}


# ------------------------------------------------------------------------------------------------------------
# Dataset
# ------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset in memory: uint8 images ``(N, 3, H, W)`` and int64 labels, plus where it came from."""

    name: str
    classes: tuple[str, ...]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str
    checksum: str  # see checksum_kind
    cache_dir: str
    checksum_kind: str = ""  # "md5 of archive", or "" when there is no archive (plain folder): checksum is ""
    expected_checksum: str = ""  # the official MD5 for this kind of source; "" when there is none

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise ValueError(f"x_{split} must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.ndim != 1 or len(y) != len(x):
                raise ValueError(f"y_{split} must be int64 ({len(x)},), got {y.dtype} {tuple(y.shape)}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def checksum_status(self) -> str:
        """'official', 'not official', or 'none' (no official checksum applies to this source)."""
        if not self.checksum or not self.expected_checksum:
            return "none"
        return "official" if self.checksum == self.expected_checksum else "not official"

    def __repr__(self) -> str:  # the default repr would print four tensors
        return (
            f"Dataset(name={self.name!r}, classes={len(self.classes)}, train={tuple(self.x_train.shape)}, "
            f"test={tuple(self.x_test.shape)}, source={self.source!r}, checksum={self.checksum!r})"
        )


def default_data_dir() -> Path:
    """``$CIFARLAB_DATA``, else ``~/.cache/cifarlab``."""
    env = os.environ.get("CIFARLAB_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cifarlab"


def _user_cache_dir() -> Path:
    return Path.home() / ".cache" / "cifarlab"


def _writable_dir(path: Path) -> bool:
    """True when `path` is (or can be made) a directory we may write into.

    Root passes ``os.access`` on a ``r-x`` directory, so its mode bits are checked too: a folder marked
    read-only (like the shared data folder) is treated as read-only even when running as root.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        st = path.stat()
    except OSError:
        return False
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    return bool(st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def resolve_cache_dir(data_dir: Path | str | None, cache_dir: Path | str | None = None) -> Path:
    """Where decoded arrays go: `cache_dir`, ``$CIFARLAB_CACHE``, ``<data_dir>/cifarlab-cache`` when the data
    dir is writable, else ``~/.cache/cifarlab``. An explicit setting wins over the data dir."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CIFARLAB_CACHE")
    if env:
        return Path(env).expanduser()
    if data_dir is not None:
        data_dir = Path(data_dir)
        if data_dir.is_dir() and _writable_dir(data_dir) and _writable_dir(data_dir / CACHE_SUBDIR):
            return data_dir / CACHE_SUBDIR
    return _user_cache_dir()


# ------------------------------------------------------------------------------------------------------------
# Checksums and download
# ------------------------------------------------------------------------------------------------------------

# (path, size, mtime_ns) -> md5: a second load in the same process skips re-hashing
_MD5_MEMO: dict[tuple[str, int, int], str] = {}


def file_md5(path: Path | str, chunk_size: int = 1 << 20) -> str:
    """MD5 hex digest of a file (memoized per process on path, size and mtime)."""
    path = Path(path)
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key in _MD5_MEMO:
            return _MD5_MEMO[key]
        h = hashlib.md5()
        with open(path, "rb") as f:
            while chunk := f.read(chunk_size):
                h.update(chunk)
    except OSError as exc:
        raise DataError(
            f"cannot read {path}: {exc.strerror or exc}. Check that it exists and is readable."
        ) from exc
    _MD5_MEMO[key] = h.hexdigest()
    return _MD5_MEMO[key]


def _open_url(url: str) -> Any:
    """Default opener for `download_url` (tests replace it: they never touch the network)."""
    req = urllib.request.Request(url, headers={"User-Agent": f"cifarlab/{__version__}"})
    return urllib.request.urlopen(req, timeout=60)  # noqa: S310 (fixed https URLs)


def _content_length(resp: Any) -> int | None:
    headers = getattr(resp, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _remove_stale_parts(dest: Path, suffix: str = ".part", older_than_s: float = 600.0) -> None:
    # A killed process cannot clean up its temp file; one not written to for 10 minutes is garbage.
    now = time.time()
    for part in dest.parent.glob(f"{dest.name}.*{suffix}"):
        with contextlib.suppress(OSError):
            if now - part.stat().st_mtime > older_than_s:
                part.unlink()


def download_url(
    url: str,
    dest: Path | str,
    md5: str | None = None,
    *,
    opener: Callable[[str], Any] | None = None,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download `url` to `dest` with a progress bar, checking the MD5 when given.

    The bytes stream into ``<dest>.<random>.part`` beside `dest`, renamed to `dest` only once complete
    and verified: an interrupted or corrupted download never leaves a file that looks finished. `opener(url)`
    returns a binary file-like (``read(n)``; optional ``headers``/``close``); the default is urllib.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    open_fn = opener if opener is not None else _open_url
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_parts(dest)
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    except OSError as exc:
        raise DataError(
            f"cannot write into {dest.parent} to download {dest.name}: {exc.strerror or exc}. "
            "Choose a writable --data-dir (or $CIFARLAB_DATA)."
        ) from exc
    tmp = Path(tmp_name)
    done = 0
    h = hashlib.md5()
    log.info("downloading %s -> %s", url, dest)
    try:
        with os.fdopen(fd, "wb") as f:
            resp = open_fn(url)
            try:
                total = _content_length(resp)
                with tqdm(
                    total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, disable=None
                ) as bar:
                    while chunk := resp.read(chunk_size):
                        f.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        bar.update(len(chunk))
            finally:
                if hasattr(resp, "close"):
                    resp.close()
            f.flush()
            os.fsync(f.fileno())
        if total is not None and done != total:
            raise DataError(
                f"download of {url} stopped after {done} of {total} bytes; nothing was kept. Re-run to try "
                f"again, or download it by hand and put it at {dest}."
            )
        got = h.hexdigest()
        if md5 and got != md5:
            raise DataError(
                f"downloaded {url} but its MD5 is {got}, not the expected {md5} (corrupted in transit?); "
                f"nothing was kept. Re-run to try again, or download it by hand and put it at {dest}."
            )
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600
        os.replace(tmp, dest)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, DataError) or not isinstance(exc, Exception):
            raise  # our own message, or KeyboardInterrupt/SystemExit
        raise DataError(
            f"downloading {url} to {dest} failed after {done} bytes ({type(exc).__name__}: {exc}); "
            "nothing was kept. Check the network and re-run, or download the file by hand and put it at "
            f"{dest}."
        ) from exc
    log.info("downloaded %s (%d bytes, md5 %s)", dest, done, got)
    return dest


# ------------------------------------------------------------------------------------------------------------
# Restricted unpickling of the official batch files
# ------------------------------------------------------------------------------------------------------------


def _numpy_attr(*candidates: str) -> Any:
    import importlib

    for dotted in candidates:
        module, _, name = dotted.rpartition(".")
        with contextlib.suppress(ImportError, AttributeError):
            return getattr(importlib.import_module(module), name)
    raise ImportError(candidates[0])


_RECONSTRUCT = _numpy_attr("numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct")
_SCALAR = _numpy_attr("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar")
_FROMBUFFER = _numpy_attr("numpy._core.numeric._frombuffer", "numpy.core.numeric._frombuffer")

# Everything a CIFAR batch pickle needs (Python 2 and 3 writers, numpy 1 and 2 module names): plain numpy
# array/scalar reconstruction and protocol-2 bytes. Nothing here can run arbitrary code.
_PICKLE_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PICKLE_ALLOWED[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None


def _unpickle(raw: bytes, where: str) -> dict[str, Any]:
    """Load one batch file with the restricted unpickler; keys come back as str."""
    try:
        # latin1 decodes Python 2 str (the official files) the way numpy expects; Python 3 bytes stay bytes.
        obj = _SafeUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except _RefusedGlobal as exc:
        raise DataError(
            f"refusing to load {where}: it asks to import {exc}, which a CIFAR batch file never needs "
            "(it may be malicious, or not a CIFAR file). Replace it with a copy of the official archive."
        ) from None
    except Exception as exc:  # noqa: BLE001 (any failure of a data file is the same user-facing problem)
        raise DataError(
            f"{where} is not a readable CIFAR batch file ({type(exc).__name__}: {exc}). The archive is "
            "corrupt or not the CIFAR python version: delete it and re-run to download it again, or put a "
            "good copy there."
        ) from exc
    if not isinstance(obj, dict):
        raise DataError(
            f"{where} holds a {type(obj).__name__}, not a CIFAR batch dict: put a good copy there."
        )
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _field(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise DataError(
            f"{where} has no {key!r} entry (keys: {sorted(d)}): not the expected CIFAR file. "
            "Put a good copy there."
        )
    return d[key]


def _batch_arrays(
    d: dict[str, Any], label_key: str, num_classes: int, where: str
) -> tuple[np.ndarray, np.ndarray]:
    data = _field(d, "data", where)
    labels = _field(d, label_key, where)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _ROW_BYTES
    ):
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: 'data' must be uint8 N x {_ROW_BYTES}, got {desc}. Put a good copy there.")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: {label_key!r} is not a list of integers. Put a good copy there.") from exc
    if y.ndim != 1 or len(y) != len(data):
        raise DataError(f"{where}: {len(data)} images but {y.size} labels. Put a good copy there.")
    if len(y) and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{where}: labels outside 0..{num_classes - 1}. Put a good copy there.")
    # Official rows are channel-planar: 1024 R, 1024 G, 1024 B bytes, each 32x32 row-major -> (N, 3, 32, 32).
    return data.reshape(len(data), 3, IMAGE_SIZE, IMAGE_SIZE), y


def _arrays_from_batches(spec: OfficialArchive, read: Callable[[str], bytes], where: str) -> dict[str, Any]:
    meta = _unpickle(read(spec.meta_file), f"{where}/{spec.meta_file}")
    names = _field(meta, spec.names_key, f"{where}/{spec.meta_file}")
    classes = tuple(n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names)
    out: dict[str, Any] = {"classes": classes}
    for split, files in (("train", spec.train_files), ("test", spec.test_files)):
        parts = [
            _batch_arrays(_unpickle(read(f), f"{where}/{f}"), spec.label_key, len(classes), f"{where}/{f}")
            for f in files
        ]
        out[f"x_{split}"] = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
        out[f"y_{split}"] = np.concatenate([p[1] for p in parts])
    return out


def _corrupt_archive(path: Path, exc: BaseException) -> DataError:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        head = b""
    if not head:
        why = "it is empty"
    elif head.lstrip()[:1] == b"<":
        why = "it looks like an HTML page, not an archive (a failed download?)"
    else:  # tarfile's "r:*" lists every method it tried on separate lines: keep one line
        detail = " ".join(str(exc).split())
        why = f"{type(exc).__name__}: {detail[:200]}"
    return DataError(
        f"{path} is corrupt, truncated or not a .tar.gz archive ({why}). Delete it and re-run to download it "
        "again, or put a good copy there."
    )


def _decode_official_tar(spec: OfficialArchive, archive: Path) -> dict[str, Any]:
    wanted = {f"{spec.folder}/{n}": n for n in (*spec.train_files, *spec.test_files, spec.meta_file)}
    blobs: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:  # read every member: a truncated stream fails here, not silently
                name = m.name.removeprefix("./")
                if name in wanted and m.isfile():
                    f = tar.extractfile(m)
                    assert f is not None
                    blobs[wanted[name]] = f.read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise _corrupt_archive(archive, exc) from exc
    missing = [n for n in wanted.values() if n not in blobs]
    if missing:
        raise DataError(
            f"{archive} lacks {', '.join(f'{spec.folder}/{n}' for n in missing)}: it is not the "
            f"{spec.name} python archive ({spec.url}). Delete it and re-run to download it again, or put "
            "a good copy there."
        )
    return _arrays_from_batches(spec, blobs.__getitem__, str(archive))


def _read_official_folder(spec: OfficialArchive, folder: Path) -> dict[str, Any]:
    def read(name: str) -> bytes:
        path = folder / name
        try:
            return path.read_bytes()
        except OSError as exc:
            raise DataError(
                f"cannot read {path} ({exc.strerror or exc}): the extracted {spec.folder}/ folder is "
                f"incomplete. Delete {folder} (a {spec.filename} beside it is then used, or downloaded), "
                "or put a good copy there."
            ) from exc

    return _arrays_from_batches(spec, read, str(folder))


# ------------------------------------------------------------------------------------------------------------
# Cache of decoded arrays
# ------------------------------------------------------------------------------------------------------------

_ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read_cache(path: Path) -> dict[str, Any] | None:
    """The cached arrays, or None when absent or unreadable (an unreadable one is removed and rebuilt)."""
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            arrays: dict[str, Any] = {k: f.get_tensor(k) for k in _ARRAY_KEYS}
        arrays["classes"] = tuple(json.loads(meta["classes"]))
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if x.dtype != torch.uint8 or x.ndim != 4 or y.dtype != torch.int64 or len(x) != len(y):
                raise ValueError(f"bad {split} arrays")
    except Exception as exc:  # noqa: BLE001 (any unreadable cache is rebuilt from the source)
        log.warning("ignoring unreadable cache %s (%s); decoding the source again", path, exc)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    log.debug("loaded decoded arrays from %s", path)
    return arrays


def _write_cache(path: Path, arrays: dict[str, Any]) -> bool:
    """Write atomically (temp file + rename): a reader never sees a half-written cache. False on failure."""
    from safetensors.torch import save_file

    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_parts(path, ".tmp")
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        tmp = Path(tmp_name)
        tensors = {k: torch.as_tensor(arrays[k]).contiguous() for k in _ARRAY_KEYS}
        save_file(tensors, str(tmp), metadata={"classes": json.dumps(list(arrays["classes"]))})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except Exception as exc:  # noqa: BLE001 (a cache we cannot write only costs time next run)
        log.warning("could not write the cache %s (%s); the next load will decode again", path, exc)
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return False
    log.info("cached decoded arrays in %s", path)
    return True


def _cached(cache_file: Path, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    arrays = _read_cache(cache_file)
    if arrays is None:
        arrays = build()
        _write_cache(cache_file, arrays)
    return arrays


def _to_dataset(arrays: dict[str, Any], **fields: Any) -> Dataset:
    def tensor(a: Any, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(a).to(dtype).contiguous()

    return Dataset(
        classes=tuple(arrays["classes"]),
        x_train=tensor(arrays["x_train"], torch.uint8),
        y_train=tensor(arrays["y_train"], torch.int64),
        x_test=tensor(arrays["x_test"], torch.uint8),
        y_test=tensor(arrays["y_test"], torch.int64),
        **fields,
    )


# ------------------------------------------------------------------------------------------------------------
# ImageFolder trees and tarballs
# ------------------------------------------------------------------------------------------------------------

_SPLITS = ("train", "test", "val")
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")


def _decode_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _decode_image(src: bytes | Path, where: str) -> np.ndarray:
    """Decode one image to uint8 (32, 32, 3) RGB.

    Any mode is converted to RGB (alpha dropped, like torchvision's loader); any size is resized to 32x32
    without keeping the aspect ratio: area averaging (Pillow BOX) when shrinking, bilinear when enlarging.
    """
    from PIL import Image

    size = (IMAGE_SIZE, IMAGE_SIZE)
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            if im.format == "JPEG" and min(im.size) >= 4 * IMAGE_SIZE:
                im.draft("RGB", size)  # DCT-domain downscale of big JPEGs: much faster, result still >= 32 px
            if im.mode in ("P", "PA") and "transparency" in im.info:
                im = im.convert("RGBA")
            rgb = im.convert("RGB")
            if rgb.size != size:
                shrink = rgb.width >= IMAGE_SIZE and rgb.height >= IMAGE_SIZE
                rgb = rgb.resize(size, Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 (PIL raises many types for bad files)
        raise DataError(
            f"cannot decode image {where} ({type(exc).__name__}: {exc}). Delete or replace that file, "
            "then re-run."
        ) from exc


_Entry = tuple[str, str, str, "bytes | Path", str]  # split, class, key (sort/report name), source, where


def _chunks(items: Iterable[_Entry], n: int) -> Iterator[list[_Entry]]:
    chunk: list[_Entry] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _decode_entries(
    entries: Iterable[_Entry], total: int | None, desc: str
) -> list[tuple[str, str, str, np.ndarray]]:
    """Decode in a small thread pool (Pillow releases the GIL while decoding), keeping few chunks in
    flight so a big tarball is never held in memory whole."""
    from tqdm.auto import tqdm

    def work(chunk: list[_Entry]) -> list[tuple[str, str, str, np.ndarray]]:
        return [(s, c, k, _decode_image(src, where)) for s, c, k, src, where in chunk]

    workers = _decode_workers()
    results: list[tuple[str, str, str, np.ndarray]] = []
    pending: deque = deque()
    with ThreadPoolExecutor(workers) as pool, tqdm(total=total, desc=desc, unit="img", disable=None) as bar:
        try:
            for chunk in _chunks(entries, 256):
                pending.append(pool.submit(work, chunk))
                while len(pending) > 2 * workers:
                    done = pending.popleft().result()
                    results.extend(done)
                    bar.update(len(done))
            while pending:
                done = pending.popleft().result()
                results.extend(done)
                bar.update(len(done))
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
    return results


def _layout_help(root: str) -> str:
    return (
        f"expected {root}/train/<class>/*.png|jpg|jpeg|bmp|webp and {root}/test/<class>/... "
        "(or val/ instead of test/)"
    )


def _assemble_imagefolder(decoded: list[tuple[str, str, str, np.ndarray]], where: str) -> dict[str, Any]:
    splits = {s for s, *_ in decoded}
    if "train" not in splits:
        raise DataError(f"{where} has no train/ images: {_layout_help(where)}.")
    test_split = "test" if "test" in splits else "val" if "val" in splits else None
    if test_split is None:
        raise DataError(f"{where} has train/ but no test/ (or val/) images: {_layout_help(where)}.")
    if test_split == "test" and "val" in splits:
        log.info("%s: using test/ as the test split; val/ is ignored", where)
    classes = tuple(sorted({c for s, c, *_ in decoded if s in ("train", test_split)}))
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, Any] = {"classes": classes}
    for split, key in (("train", "train"), (test_split, "test")):
        # Deterministic order: by class, then file name (never by the arrays themselves).
        items = sorted(((index[c], k, a) for s, c, k, a in decoded if s == split), key=lambda t: t[:2])
        out[f"x_{key}"] = np.ascontiguousarray(np.stack([a for *_, a in items]).transpose(0, 3, 1, 2))
        out[f"y_{key}"] = np.array([i for i, *_ in items], dtype=np.int64)
    return out


def _skip_name(part: str) -> bool:
    return part.startswith(".") or part == "__MACOSX"  # hidden files, macOS resource forks


def _scan_folder(root: Path) -> tuple[Path, list[tuple[str, str, Path]]]:
    """(tree root, [(split, class, file)]) for root/<split>/<class>/<image>; descends into a lone subfolder
    that holds the splits (an extracted tarball's top folder)."""
    if not any((root / s).is_dir() for s in _SPLITS):
        subdirs = [p for p in root.iterdir() if p.is_dir() and not _skip_name(p.name)]
        if len(subdirs) == 1 and any((subdirs[0] / s).is_dir() for s in _SPLITS):
            root = subdirs[0]
    files: list[tuple[str, str, Path]] = []
    for split in _SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for cls_dir in sorted(split_dir.iterdir()):
            if not cls_dir.is_dir() or _skip_name(cls_dir.name):
                continue
            for f in sorted(cls_dir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES and not _skip_name(f.name) and f.is_file():
                    files.append((split, cls_dir.name, f))
    if not files:
        raise DataError(f"no images found in {root}: {_layout_help(str(root))}.")
    return root, files


def _folder_fingerprint(root: Path, files: list[tuple[str, str, Path]]) -> str:
    # A plain folder has no archive MD5; key its cache on its path and every file's name, size and mtime.
    h = hashlib.md5(str(root.resolve()).encode())
    for split, cls, f in files:
        st = f.stat()
        h.update(f"{split}/{cls}/{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _tar_entries(archive: Path) -> Iterator[_Entry]:
    """Stream image members laid out as [<top>/]<split>/<class>/<image> from a tarball."""
    prefixes: set[str] = set()
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in tar:
                parts = [p for p in m.name.split("/") if p not in ("", ".")]
                if not m.isfile() or not parts or any(_skip_name(p) for p in parts):
                    continue
                if Path(parts[-1]).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                if len(parts) < 3 or parts[-3] not in _SPLITS:
                    continue
                prefixes.add("/".join(parts[:-3]))
                if len(prefixes) > 1:
                    raise DataError(
                        f"{archive} holds more than one image tree "
                        f"({', '.join(sorted(p + '/' for p in prefixes))}): {_layout_help('<top>')}, once."
                    )
                f = tar.extractfile(m)
                assert f is not None
                key = "/".join(parts[-3:])
                yield parts[-3], parts[-2], key, f.read(), f"{archive} (member {m.name})"
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise _corrupt_archive(archive, exc) from exc


def _tar_stem(path: Path) -> str:
    name = path.name
    for suffix in _TAR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _load_imagefolder(path: Path, cache_dir: Path | str | None, name: str | None = None) -> Dataset:
    """An ImageFolder tree (folder, or a tarball of one) resized to 32x32, cached after the first decode."""
    size_tag = f"{IMAGE_SIZE}px-v{_CACHE_VERSION}"
    if path.is_dir():
        root, files = _scan_folder(path)
        ds_name = name or root.name
        checksum, kind = "", ""
        key = _folder_fingerprint(root, files)
        entries: Iterable[_Entry] = ((s, c, f"{s}/{c}/{f.name}", f, str(f)) for s, c, f in files)
        total: int | None = len(files)
    else:
        ds_name = name or _tar_stem(path)
        checksum, kind = file_md5(path), "md5 of archive"
        key = checksum
        entries, total = _tar_entries(path), None
    cdir = resolve_cache_dir(path.parent, cache_dir)
    # Keyed by content only, so loading the same tarball by name or by path shares one cache file.
    cache_file = cdir / f"imagefolder-{key}-{size_tag}.safetensors"

    def build() -> dict[str, Any]:
        log.info("decoding images in %s (first time only; cached in %s)", path, cdir)
        decoded = _decode_entries(entries, total, f"decoding {path.name}")
        if not decoded:
            raise DataError(f"no images found in {path}: {_layout_help('<top>')}.")
        return _assemble_imagefolder(decoded, str(path))

    arrays = _cached(cache_file, build)
    return _to_dataset(
        arrays, name=ds_name, source=str(path), checksum=checksum, checksum_kind=kind, cache_dir=str(cdir)
    )


# ------------------------------------------------------------------------------------------------------------
# Official archives
# ------------------------------------------------------------------------------------------------------------


def _check_md5(spec: OfficialArchive, archive: Path) -> str:
    md5 = file_md5(archive)
    if md5 != spec.md5:
        msg = (
            f"{archive}: MD5 {md5} is not the official {spec.md5}; loading it anyway (a re-packed copy "
            "is fine; if loading fails, delete the file and re-run to download it again)"
        )
        log.warning(msg)
        warnings.warn(msg, ChecksumWarning, stacklevel=2)
    return md5


def _load_official_archive(spec: OfficialArchive, archive: Path, cache_dir: Path | str | None) -> Dataset:
    md5 = _check_md5(spec, archive)
    cdir = resolve_cache_dir(archive.parent, cache_dir)
    cache_file = cdir / f"{spec.name}-{md5}-v{_CACHE_VERSION}.safetensors"

    def build() -> dict[str, Any]:
        log.info("decoding %s (first time only; cached in %s)", archive, cdir)
        return _decode_official_tar(spec, archive)

    arrays = _cached(cache_file, build)
    return _to_dataset(
        arrays,
        name=spec.name,
        source=str(archive),
        checksum=md5,
        checksum_kind="md5 of archive",
        expected_checksum=spec.md5,
        cache_dir=str(cdir),
    )


def _load_official_folder(spec: OfficialArchive, folder: Path) -> Dataset:
    arrays = _read_official_folder(spec, folder)  # plain pickles load in well under a second: no cache needed
    return _to_dataset(arrays, name=spec.name, source=str(folder), checksum="", cache_dir=str(folder))


def _load_official(
    spec: OfficialArchive,
    data_dir: Path,
    download: bool,
    cache_dir: Path | str | None,
    opener: Callable[[str], Any] | None,
) -> Dataset:
    folder = data_dir / spec.folder
    if folder.is_dir():
        return _load_official_folder(spec, folder)
    archive = data_dir / spec.filename
    if archive.is_file():
        return _load_official_archive(spec, archive, cache_dir)
    for jpeg_name in spec.jpeg_names:
        path = data_dir / jpeg_name
        if path.exists():
            ds = _load_imagefolder(path, cache_dir, name=spec.name)
            if spec.name == "cifar10" and ds.classes != CIFAR10_CLASSES:
                raise DataError(
                    f"{path} does not look like CIFAR-10: its class folders are {list(ds.classes)}, expected "
                    f"{list(CIFAR10_CLASSES)}. Put a good copy there, or load it as a path instead of "
                    "'cifar10'."
                )
            return ds
    where = f"put {spec.filename} ({spec.url}) or its extracted {spec.folder}/ folder"
    if spec.jpeg_names:
        where += f" or {spec.jpeg_names[0]}"
    if not download:
        state = "is empty of it" if data_dir.is_dir() else "does not exist"
        raise DataError(
            f"{spec.name} not found: {data_dir} {state}. {where[0].upper()}{where[1:]} in {data_dir}, pass "
            "--data-dir (or set $CIFARLAB_DATA) to where it is, or allow downloading (no --no-download)."
        )
    if not _writable_dir(data_dir):
        raise DataError(
            f"{spec.name} not found in {data_dir}, and that folder is not writable, so it cannot be "
            f"downloaded there: {where} in it, or pass a writable --data-dir (or set $CIFARLAB_DATA)."
        )
    try:
        download_url(spec.url, archive, spec.md5, opener=opener)
    except DataError as exc:
        raise DataError(f"{exc} (Without network: {where} in {data_dir}.)") from exc
    return _load_official_archive(spec, archive, cache_dir)


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def _load_path(path: Path, cache_dir: Path | str | None) -> Dataset:
    for spec in OFFICIAL.values():
        if path.name == spec.folder and path.is_dir():
            return _load_official_folder(spec, path)
        if path.name == spec.filename and path.is_file():
            return _load_official_archive(spec, path, cache_dir)
    if path.is_dir():
        for spec in OFFICIAL.values():  # a data dir passed as the dataset: use what it holds
            if (path / spec.folder).is_dir() or (path / spec.filename).is_file():
                return _load_official(spec, path, False, cache_dir, None)
        return _load_imagefolder(path, cache_dir)
    if path.is_file():
        if not path.name.endswith(_TAR_SUFFIXES):
            raise DataError(
                f"{path} is neither a folder nor a tarball (.tar.gz, .tgz, .tar): pass an ImageFolder tree "
                "(root/train/<class>/*.png, root/test/<class>/*.png) or a tarball of one."
            )
        return _load_imagefolder(path, cache_dir)
    raise DataError(f"{path} does not exist.")


def load_dataset(
    name: str | os.PathLike = "cifar10",
    data_dir: Path | str | None = None,
    download: bool = True,
    *,
    cache_dir: Path | str | None = None,
    opener: Callable[[str], Any] | None = None,
) -> Dataset:
    """Load a dataset as uint8 tensors.

    `name` is "cifar10", "cifar100" (looked up in `data_dir`, default `default_data_dir()`, downloaded when
    missing and `download`), or a path: an ImageFolder tree (``root/{train,test}/<class>/*.png|jpg|...``), a
    tarball of one, or an official archive / extracted batch folder. A relative path that does not exist is
    also tried inside `data_dir`. Bad input raises `cifarlab.errors.DataError` with what to do.
    """
    data_path = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    key = _canonical(os.fspath(name))
    if key in OFFICIAL and not isinstance(name, Path):
        return _load_official(OFFICIAL[key], data_path, download, cache_dir, opener)
    path = Path(name).expanduser()
    if not path.exists() and not path.is_absolute():
        for candidate in (data_path / path, *(data_path / f"{path}{s}" for s in _TAR_SUFFIXES)):
            if candidate.exists():
                path = candidate
                break
    if path.exists():
        return _load_path(path, cache_dir)
    raise DataError(
        f"unknown dataset {os.fspath(name)!r}: use cifar10, cifar100, or the path of an ImageFolder tree "
        f"(folder or .tar.gz); no such file or folder here or in {data_path}."
    )


# ------------------------------------------------------------------------------------------------------------
# Splits, statistics
# ------------------------------------------------------------------------------------------------------------


def split_indices(
    n: int, val_fraction: float, seed: int, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(n)`` into (train_idx, val_idx), each sorted ascending (int64).

    ``len(val_idx) == round(n * val_fraction)``. With `labels` the split is stratified: every class gives the
    same fraction (largest-remainder rounding so the total is still exact). Same arguments, same split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if n < 0:
        raise ConfigError(f"n must be >= 0, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    n_val = round(n * val_fraction)
    if labels is None:
        perm = torch.randperm(n, generator=g)
        val = perm[:n_val]
    else:
        labels = torch.as_tensor(labels).long()
        if labels.shape != (n,):
            raise ConfigError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        classes, counts = torch.unique(labels, return_counts=True)
        exact = counts.double() * n_val / max(n, 1)
        quota = exact.floor().long()
        # Hand the leftover val slots to the classes with the largest fractional parts (ties: lower class).
        order = sorted(range(len(classes)), key=lambda i: (-(exact[i] - quota[i]).item(), i))
        for i in order[: n_val - int(quota.sum())]:
            quota[i] += 1
        parts = []
        for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
            members = (labels == c).nonzero().flatten()
            parts.append(members[torch.randperm(len(members), generator=g)[:q]])
        val = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    mask = torch.ones(n, dtype=torch.bool)
    mask[val] = False
    return mask.nonzero().flatten(), val.sort().values


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and (population) std of uint8 images ``(N, C, H, W)``, in [0, 1] units.

    Exact, from a 256-bin histogram per channel (no float copy of the whole set).
    """
    x = torch.as_tensor(x)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise ValueError(f"channel_stats needs uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        hist = torch.bincount(x[:, c].reshape(-1).cpu(), minlength=256).double()
        total = hist.sum().clamp_min(1)
        mean = (hist * values).sum() / total
        var = (hist * values.square()).sum() / total - mean.square()
        means.append(float(mean))
        stds.append(float(var.clamp_min(0).sqrt()))
    return tuple(means), tuple(stds)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------------
# BatchLoader
# ------------------------------------------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    # Stable across processes and platforms (unlike hash()): a resumed run at epoch e draws what an
    # uninterrupted one would.
    digest = hashlib.blake2b(f"cifarlab:{int(seed)}:{int(epoch)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def scaling_constants(
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    channels: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(scale, shift) with x_uint8 * scale + shift == (x/255 - mean) / std; (None, None) without mean/std.

    Training (`BatchLoader`) and inference (`inference.to_float`) both scale through this and
    `scale_images`, so the two see bit-identical inputs.
    """
    if mean is None or std is None:
        return None, None
    m = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
    if m.numel() != channels or s.numel() != channels or bool((s <= 0).any()):
        raise ConfigError(f"mean and std need {channels} values each (std > 0), got {mean} and {std}")
    # (x/255 - m)/s == x * (1/(255 s)) + (-m/s): one multiply and one add per element.
    scale = (1.0 / (255.0 * s)).to(device, dtype).reshape(1, -1, 1, 1)
    shift = (-m / s).to(device, dtype).reshape(1, -1, 1, 1)
    return scale, shift


def scale_images(x: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """In place on a float copy of uint8 pixels: /255, then the per-channel normalization if given."""
    if scale is None:
        return x.div_(255.0)
    return x.mul_(scale).add_(shift)


class BatchLoader:
    """Batches from uint8 images held in memory (on `device`), converted to float one batch at a time.

    Per epoch: one ``torch.randperm`` from a CPU ``torch.Generator`` seeded from (seed, epoch). Per batch:
    gather, move to `device`, to `dtype`, ``/255``, ``(x - mean) / std`` when given (one fused multiply-add),
    then ``transform(xb, generator=g, indices=idx, epoch=epoch)`` with that same CPU generator (draw random
    numbers on the CPU, then move them), then channels_last when asked.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        transform: Callable[..., torch.Tensor] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        channels_last: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        x, y = torch.as_tensor(x), torch.as_tensor(y)
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"x must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"y must be ({len(x)},), got {tuple(y.shape)}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if (mean is None) != (std is None):
            raise ConfigError("give both mean and std, or neither")
        self.device = torch.device(device)
        # uint8 is 4x smaller than float: keep the whole set on the device once, not a copy per batch.
        self.x = x.to(self.device).contiguous()
        self.y = y.to(self.device, torch.int64)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(seed)
        self.transform = transform
        self.channels_last = channels_last
        self.dtype = dtype
        self._scale, self._shift = scaling_constants(mean, std, x.shape[1], self.device, dtype)
        self.mean = tuple(float(v) for v in mean) if mean is not None else None
        self.std = tuple(float(v) for v in std) if std is not None else None

    @property
    def num_samples(self) -> int:
        return len(self.x)

    def __len__(self) -> int:
        n, b = len(self.x), self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)

    def generator(self, epoch: int) -> torch.Generator:
        """The CPU generator an epoch uses (fresh, seeded from (seed, epoch))."""
        return torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of an epoch (int64, CPU)."""
        return self._order(self.generator(epoch))

    def _order(self, g: torch.Generator) -> torch.Tensor:
        n = len(self.x)
        return torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (xb float (B, C, H, W) on `device`, yb int64) for one epoch."""
        g = self.generator(epoch)
        order = self._order(g)
        on_cpu = self.device.type == "cpu"
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            dev_idx = idx if on_cpu else idx.to(self.device, non_blocking=True)
            xb = scale_images(self.x.index_select(0, dev_idx).to(self.dtype), self._scale, self._shift)
            if self.transform is not None:
                xb = self.transform(xb, generator=g, indices=idx, epoch=epoch)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, self.y.index_select(0, dev_idx)

    def __repr__(self) -> str:
        return (
            f"BatchLoader(n={len(self.x)}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, seed={self.seed}, device={self.device})"
        )


# ------------------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------------------


def sample_grid_figure(
    x_uint8: torch.Tensor | np.ndarray,
    y: torch.Tensor | np.ndarray,
    classes: Sequence[str],
    per_class: int = 8,
    seed: int = 0,
) -> Figure:
    """A grid of random sample images: one row per class (class name as the row label), `per_class` columns.

    Images are uint8 ``(N, 3, H, W)``; the choice is seeded. Draws one mosaic (fast even for 100 classes).
    Uses matplotlib's object API (no pyplot state); save with ``fig.savefig(path)``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = torch.as_tensor(x_uint8).cpu()
    labels = torch.as_tensor(y).long().cpu()
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"x_uint8 must be uint8 (N, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    if per_class < 1:
        raise ConfigError(f"per_class must be >= 1, got {per_class}")
    n_cls = len(classes)
    h, w = x.shape[2], x.shape[3]
    pad = max(1, h // 16)
    mosaic = np.full((n_cls * (h + pad) - pad, per_class * (w + pad) - pad, 3), 255, dtype=np.uint8)
    g = torch.Generator().manual_seed(int(seed))
    for c in range(n_cls):
        members = (labels == c).nonzero().flatten()
        pick = members[torch.randperm(len(members), generator=g)[:per_class]]
        for j, i in enumerate(pick.tolist()):
            top, left = c * (h + pad), j * (w + pad)
            mosaic[top : top + h, left : left + w] = x[i].expand(3, h, w).permute(1, 2, 0).numpy()
    cell = 0.7 if n_cls <= 20 else max(0.25, 14.0 / n_cls)  # inches per image; tall sets get smaller cells
    label_w = 0.09 * max((len(c) for c in classes), default=4) + 0.3
    fig = Figure(
        figsize=(per_class * cell + label_w + 0.2, n_cls * cell + 0.5), dpi=100, layout="constrained"
    )
    FigureCanvasAgg(fig)  # Agg: renders PNGs without a display, independent of pyplot's backend
    ax = fig.add_subplot()
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_yticks([c * (h + pad) + h / 2 - 0.5 for c in range(n_cls)], labels=list(classes))
    ax.set_xticks([])
    ax.tick_params(axis="y", length=0, labelsize=9 if n_cls <= 20 else 6)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return fig
