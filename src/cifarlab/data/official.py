"""Official CIFAR-10/100 "python version" archives: what they are, downloading them, decoding their batches.

Downloads stream into a ``.part`` file renamed into place only once complete and MD5-checked. Batch files
are unpickled with a restricted unpickler that can only rebuild numpy arrays (a malicious file is refused).
The archive is read to its end so its gzip checksum is verified before anything is decoded or cached.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import logging
import os
import pickle
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab import __version__
from cifarlab.data.archives import iter_tar, require_regular
from cifarlab.errors import DataError
from cifarlab.files import new_file_mode

__all__ = [
    "CIFAR10_CLASSES",
    "OFFICIAL",
    "ChecksumWarning",
    "OfficialArchive",
    "decode_official_tar",
    "download_url",
    "file_md5",
    "read_official_folder",
    "check_md5",
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
CIFAR_IMAGE_SIZE = 32  # official rows: 3 planes of 32x32
_ROW_BYTES = 3 * CIFAR_IMAGE_SIZE * CIFAR_IMAGE_SIZE
ARCHIVE_ADVICE = "Delete it and re-run to download it again, or put a good copy there."


class ChecksumWarning(UserWarning):
    """Kept for compatibility: a non-official MD5 is now reported once through logging, not `warnings`."""


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


# (path, size, mtime_ns) -> md5: a second load in the same process skips re-hashing
_MD5_MEMO: dict[tuple[str, int, int], str] = {}


def file_md5(path: Path | str, chunk_size: int = 1 << 20) -> str:
    """MD5 hex digest of a file (memoized per process on path, size and mtime)."""
    path = require_regular(Path(path))
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
        raise DataError(f"cannot read {path}: {exc.strerror or exc}. Check that it exists and is readable.") from exc
    _MD5_MEMO[key] = h.hexdigest()
    return _MD5_MEMO[key]


def _open_url(url: str) -> Any:
    """Default opener for `download_url` (tests replace it: they never touch the network)."""
    req = urllib.request.Request(url, headers={"User-Agent": f"cifarlab/{__version__}"})
    return urllib.request.urlopen(req, timeout=60)  # noqa: S310 (fixed https URLs)


_OPEN_URL = _open_url


def _default_opener() -> Callable[[str], Any]:
    """`_open_url` as replaced by a test: on this module, or on the `cifarlab.data` package (the name that
    package re-exports, which tests/conftest.py patches to keep every test off the network)."""
    pkg = sys.modules.get("cifarlab.data")
    patched = getattr(pkg, "_open_url", _OPEN_URL)
    return patched if patched is not _OPEN_URL else _open_url


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
    open_fn = opener if opener is not None else _default_opener()
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
        os.chmod(tmp, new_file_mode(dest))  # mkstemp makes it 0600
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
        raise DataError(f"{where} holds a {type(obj).__name__}, not a CIFAR batch dict: put a good copy there.")
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _field(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise DataError(
            f"{where} has no {key!r} entry (keys: {sorted(d)}): not the expected CIFAR file. Put a good copy there."
        )
    return d[key]


def _batch_arrays(d: dict[str, Any], label_key: str, num_classes: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    data = _field(d, "data", where)
    labels = _field(d, label_key, where)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_BYTES:
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
    return data.reshape(len(data), 3, CIFAR_IMAGE_SIZE, CIFAR_IMAGE_SIZE), y


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


def decode_official_tar(spec: OfficialArchive, archive: Path) -> dict[str, Any]:
    """The arrays of an official archive (uint8 ``(N, 3, 32, 32)`` images, int64 labels, class names).

    The whole archive is read first, to the end of its compressed stream, so a damaged file raises
    `DataError` before anything is decoded: no changed pixel can reach the cache.
    """
    wanted = {f"{spec.folder}/{n}": n for n in (*spec.train_files, *spec.test_files, spec.meta_file)}
    blobs: dict[str, bytes] = {}
    for name, raw in iter_tar(archive, ARCHIVE_ADVICE, lambda m: wanted.get(m.name.removeprefix("./"))):
        if raw is None:  # withdrawn: that name was stored again as something else (see `iter_tar`)
            blobs.pop(name, None)
        else:
            blobs[name] = raw  # a name stored twice comes twice: the last is the one extraction keeps
    missing = [n for n in wanted.values() if n not in blobs]
    if missing:
        raise DataError(
            f"{archive} lacks {', '.join(f'{spec.folder}/{n}' for n in missing)}: it is not the "
            f"{spec.name} python archive ({spec.url}). Delete it and re-run to download it again, or put "
            "a good copy there."
        )
    return _arrays_from_batches(spec, blobs.__getitem__, str(archive))


def read_official_folder(spec: OfficialArchive, folder: Path) -> dict[str, Any]:
    """The arrays of an extracted ``cifar-10-batches-py/`` (or ``cifar-100-python/``) folder."""

    def read(name: str) -> bytes:
        path = folder / name
        try:
            if path.exists():
                require_regular(path, "CIFAR batch file")
            return path.read_bytes()
        except OSError as exc:
            raise DataError(
                f"cannot read {path} ({exc.strerror or exc}): the extracted {spec.folder}/ folder is "
                f"incomplete. Delete {folder} (a {spec.filename} beside it is then used, or downloaded), "
                "or put a good copy there."
            ) from exc

    return _arrays_from_batches(spec, read, str(folder))


def check_md5(spec: OfficialArchive, archive: Path) -> str:
    """The archive's MD5; logs one warning when it is not the official one (the archive still loads)."""
    md5 = file_md5(archive)
    if md5 != spec.md5:
        msg = (
            f"{archive}: MD5 {md5} is not the official {spec.md5}; loading it anyway (a re-packed copy "
            "is fine; if loading fails, delete the file and re-run to download it again)"
        )
        log.warning(msg)  # once, as a plain log line (no `warnings` copy with a source line)
    return md5
