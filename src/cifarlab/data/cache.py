"""The cache of decoded datasets: safetensors files of uint8 images and int64 labels, written atomically.

Decoded arrays are cached in ``$CIFARLAB_CACHE`` if set, else ``$XDG_CACHE_HOME/cifarlab``, else
``~/.cache/cifarlab``, never beside the data. Each file is named after the source's checksum (an archive's
MD5, or a folder's fingerprint), the decode settings and a format version, so different sources never share
a file; when that folder is not writable, datasets load without caching and a warning says so once.

A cache file that cannot be read back (truncated, wrong header, wrong shapes or dtypes, or contents that no
longer match the CRC32s stored in its metadata) is rebuilt from the source with a one-line warning. A file
written before those CRC32s existed is rebuilt once, quietly.

The cache does not grow with every edit of a source: ``.sources/`` in the cache folder holds one small JSON per
source (its kind, resolved path and decode settings) naming the cache file it reads now and when it was read.
When a source moves to another file (it was edited), the file it read before is removed, with one log line,
if it is definitely an older version (read from the source before this process read it) and no other source
(a copy of the same data elsewhere, which shares the file: files are keyed by content) reads it. Files of other
decode settings, of other cifarlab cache versions, or written before ``.sources/`` existed are never removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.files import atomic_write_bytes, remove_leftover_temps, write_json

__all__ = [
    "ARRAY_KEYS",
    "CacheSource",
    "cache_source",
    "cached",
    "read_cache",
    "resolve_cache_dir",
    "writable_dir",
    "write_cache",
]

log = logging.getLogger(__name__)

ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")
# Facts about the source stored beside the arrays (JSON in the file's metadata), when a loader gives them:
# native_sizes, {"WxH": count} of an image folder's own sizes (so a cached load can say what was resized).
META_KEYS = ("native_sizes",)
# Metadata key of the contents' CRC32s (JSON: one per array, and "metadata" for the keys above and "classes").
# Damage inside the pixel or label bytes passes every structural check; only a digest notices it. CRC32 reads
# CIFAR-10's 180 MB in ~25 ms (blake2b: ~125 ms, sha256: ~85 ms) and catches any burst of up to 32 flipped
# bits: the cache guards against accidents, not attackers, who could rewrite the digest as well.
DIGEST_KEY = "crc32"
# Metadata key of the file's own name, which says what it was decoded from (source checksum, size, version): a file
# renamed or copied over another's name holds intact arrays of another source, which no digest of them notices.
NAME_KEY = "cache_name"
_WARNED_UNWRITABLE: set[str] = set()
# The folder (in the cache folder) of the per-source records that say which cache file each source reads now.
SOURCES_DIR = ".sources"
# What a cache file cifarlab writes is named like: a record naming anything else is never acted on.
_CACHE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors")


@dataclass(frozen=True)
class CacheSource:
    """The source a cache file is decoded from, to tell its older cache files from other sources' (see the module
    docstring). `identity`: kind, resolved path and decode settings; `read_at`: when this process began reading
    the source (`time.time()`), which orders versions of one source between processes."""

    identity: str
    path: str
    read_at: float = field(default_factory=time.time)


def cache_source(kind: str, path: Path, settings: str, read_at: float | None = None) -> CacheSource:
    """The `CacheSource` of `path` read as `kind` with `settings` (an image size, a format version). `read_at`:
    when the source began to be read, by default now (so call it before reading the source: a later time could
    order this version after a newer one)."""
    resolved = str(Path(path).expanduser().resolve())
    return CacheSource(f"{kind}:{settings}:{resolved}", resolved, time.time() if read_at is None else read_at)


def resolve_cache_dir(cache_dir: Path | str | None = None) -> Path:
    """Where decoded arrays are cached: `cache_dir` when given, else ``$CIFARLAB_CACHE``, else
    ``$XDG_CACHE_HOME/cifarlab``, else ``~/.cache/cifarlab``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("CIFARLAB_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore a relative value
        return Path(xdg) / "cifarlab"
    return Path.home() / ".cache" / "cifarlab"


def writable_dir(path: Path) -> bool:
    """True when `path` is (or can be made) a directory we may write into.

    Root passes ``os.access`` on a ``r-x`` directory, so its mode bits are checked too: a folder marked
    read-only (like a shared data folder) is treated as read-only even when running as root.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        st = path.stat()
    except OSError:
        return False
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    return bool(st.st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:300]


def _digests(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> dict[str, int]:
    """CRC32 of each array's bytes and of the metadata (`DIGEST_KEY`)."""
    out = {k: zlib.crc32(tensors[k].contiguous().numpy().reshape(-1).view(np.uint8).data) for k in ARRAY_KEYS}
    described = {k: meta[k] for k in ("classes", NAME_KEY, *META_KEYS) if k in meta}
    out["metadata"] = zlib.crc32(json.dumps(described, sort_keys=True).encode())
    return out


def _discard(path: Path, judged: os.stat_result) -> None:
    """Remove the damaged cache file `judged` (its stat before it was read), so it is rebuilt.

    Only in a folder cifarlab may write to (`writable_dir`: root could delete from one marked read-only), and
    only while `path` is still that file: another process may have renamed a fresh cache file over it since.
    """
    if not writable_dir(path.parent):
        return
    with contextlib.suppress(OSError):
        now = path.stat()
        if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) == (
            judged.st_dev,
            judged.st_ino,
            judged.st_size,
            judged.st_mtime_ns,
        ):
            path.unlink()


def read_cache(path: Path) -> dict[str, Any] | None:
    """The cached arrays, or None when absent or unusable (an unusable file is removed, to be rebuilt)."""
    try:
        judged = path.stat()  # what is read below, unless replaced meanwhile (then `_discard` leaves it)
    except OSError:
        return None
    if not stat.S_ISREG(judged.st_mode):
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            arrays: dict[str, Any] = {k: f.get_tensor(k) for k in ARRAY_KEYS}
        classes = json.loads(meta["classes"])
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or not classes:
            raise ValueError("bad class list")
        arrays["classes"] = tuple(classes)
        for key in META_KEYS:
            if key in meta:
                arrays[key] = json.loads(meta[key])
        for split in ("train", "test"):
            x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
            if x.dtype != torch.uint8 or x.ndim != 4 or y.dtype != torch.int64 or y.ndim != 1 or len(x) != len(y):
                raise ValueError(f"{split} arrays have the wrong dtype or shape")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
                raise ValueError(f"{split} labels outside 0..{len(classes) - 1}")
        if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
            raise ValueError("train and test images differ in shape")
        if DIGEST_KEY not in meta or NAME_KEY not in meta:  # an older cifarlab wrote it: unverifiable, not damaged
            log.info("cache file %s has no content digest (an older cifarlab wrote it); decoding again", path)
            return None
        if json.loads(meta[DIGEST_KEY]) != _digests(arrays, meta):
            raise ValueError("its pixels, labels or class names do not match the CRC32s stored with them")
        if meta[NAME_KEY] != path.name:
            raise ValueError(f"it was written as {meta[NAME_KEY]}, another source's cache (renamed or copied)")
    except FileNotFoundError:  # removed since the stat above (an older version another process pruned)
        return None
    except Exception as exc:  # noqa: BLE001 (any unusable cache is rebuilt from the source)
        log.warning("ignoring damaged cache file %s (%s); decoding the source again", path, _one_line(exc))
        _discard(path, judged)
        return None
    log.debug("loaded decoded arrays from %s", path)
    return arrays


def write_cache(path: Path, arrays: dict[str, Any]) -> bool:
    """Write atomically (`cifarlab.files`): a reader never sees half a cache file. False on failure."""
    from safetensors.torch import save

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftover_temps(path, older_than_s=600.0)  # another process may be writing a newer one
        tensors = {k: torch.as_tensor(arrays[k]).contiguous() for k in ARRAY_KEYS}
        meta = {"classes": json.dumps(list(arrays["classes"])), NAME_KEY: path.name}
        meta.update({k: json.dumps(arrays[k]) for k in META_KEYS if arrays.get(k) is not None})
        meta[DIGEST_KEY] = json.dumps(_digests(tensors, meta))
        atomic_write_bytes(path, save(tensors, metadata=meta))
    except Exception as exc:  # noqa: BLE001 (a cache we cannot write only costs time next run)
        log.warning("could not write the cache %s (%s); the next load will decode again", path, _one_line(exc))
        return False
    log.info("cached decoded arrays in %s", path)
    return True


def cached(
    cache_file: Path, build: Callable[[], dict[str, Any]], source: CacheSource | None = None
) -> tuple[dict[str, Any], str]:
    """(arrays, cache folder used or "") : from `cache_file` when usable, else `build()` then cache it.

    `build()` raising leaves nothing behind. When the cache folder is not writable the arrays are built and
    not cached, with one warning per folder and process. `source`: what `cache_file` is decoded from; when given,
    the file it read before is removed once superseded (see the module docstring).
    """
    arrays = read_cache(cache_file)
    if arrays is not None:
        if source is not None and writable_dir(cache_file.parent):
            _track(cache_file, source)
        return arrays, str(cache_file.parent)
    folder = cache_file.parent
    can_write = writable_dir(folder)
    if not can_write and str(folder) not in _WARNED_UNWRITABLE:
        _WARNED_UNWRITABLE.add(str(folder))
        log.warning(
            "the cache folder %s %s: loading without caching (set $CIFARLAB_CACHE to a writable folder to make "
            "the next load fast)",
            folder,
            "is a file, not a folder" if folder.is_file() else "is not writable",
        )
    arrays = build()
    if can_write and write_cache(cache_file, arrays):
        if source is not None:
            _track(cache_file, source)
        return arrays, str(folder)
    return arrays, ""


# -- the files each source reads, and removing the ones superseded ------------------------------------------------


def _record_path(folder: Path, source: CacheSource) -> Path:
    digest = hashlib.sha256(source.identity.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return folder / SOURCES_DIR / f"{digest}.json"


def _read_record(path: Path) -> dict[str, Any] | None:
    """A source's record ({"source", "path", "file", "read_at"}), or None when absent or not one (never trusted
    further than to name a cache file in its own folder)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    ok = (
        isinstance(record, dict)
        and isinstance(record.get("source"), str)
        and isinstance(record.get("file"), str)
        and isinstance(record.get("read_at"), (int, float))
    )
    return record if ok else None


def cached_before(folder: Path, source: CacheSource) -> str | None:
    """The cache file `source` was last decoded into in the cache folder `folder` (its record in ``.sources/``),
    None when it never was: a decode now is then not its first one (the source changed, or that file is gone)."""
    try:
        record = _read_record(_record_path(folder, source))
    except Exception:  # noqa: BLE001 (only wording depends on it)
        return None
    return str(record["file"]) if record is not None and record["source"] == source.identity else None


def _track(cache_file: Path, source: CacheSource) -> None:
    """Record that `source` reads `cache_file` now; remove the file it read before when superseded (`_prune`).
    Never fails the load: a cache that cannot be tidied only costs disk space."""
    try:
        record_path = _record_path(cache_file.parent, source)
        old = _read_record(record_path)
        if old is not None and old["source"] != source.identity:
            old = None  # another source's record under the same digest (never in practice): leave its file
        if old is not None and old["file"] == cache_file.name:
            return  # the usual load: nothing changed
        if old is not None and old["read_at"] >= source.read_at:
            # A process that read the source after this one recorded its file: that one is the newer version,
            # and this process's file (an older one) stays until the source's next change.
            return
        record = {"source": source.identity, "path": source.path, "file": cache_file.name, "read_at": source.read_at}
        write_json(record_path, record)
        if old is not None:
            _prune(cache_file.parent, old["file"], source)
    except Exception as exc:  # noqa: BLE001 (tidying the cache must never fail a load)
        log.warning("could not update the cache records in %s (%s)", cache_file.parent, _one_line(exc))


def _prune(folder: Path, name: str, source: CacheSource) -> None:
    """Remove `folder/name`, the cache file `source` read before its current one, unless another source's record
    names it (a copy of the same data shares it) or it is not a cache file cifarlab wrote."""
    if not _CACHE_NAME.fullmatch(name):
        return
    path = folder / name
    for other in (folder / SOURCES_DIR).glob("*.json"):
        record = _read_record(other)
        if record is not None and record["file"] == name and record["source"] != source.identity:
            log.debug("keeping %s: %s reads it too", path, record.get("path"))
            return
    try:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or _written_as(path) != name:
            return
        path.unlink()
    except FileNotFoundError:
        return  # already gone (deleted by hand, or by another process)
    except Exception as exc:  # noqa: BLE001 (a file that cannot be removed only costs disk space)
        log.warning("could not remove the older cache file %s (%s); delete it to free its space", path, _one_line(exc))
        return
    log.info("freed %.1f MB in %s: removed %s, the cache of an earlier version of %s", st.st_size / 1e6, folder, name,
             source.path)  # fmt: skip


def _written_as(path: Path) -> str | None:
    """The name a cache file was written under (`NAME_KEY` in its header), or None when it is no cache file."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(NAME_KEY)
    except Exception:  # noqa: BLE001 (not a safetensors file: not ours to remove)
        return None
