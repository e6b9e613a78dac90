"""The one way cifarlab writes files: atomically (temp file in the same folder, fsync, rename).

A crash, a kill or a full disk leaves either the old file or the new one, never half of one. Every file a
run writes (config, history, metrics, weights, checkpoint, report, figures, exports) goes through here.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from cifarlab.errors import UserError

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "new_file_mode",
    "read_json",
    "require_regular_file",
    "write_json",
]


def new_file_mode(path: Path | str) -> int:
    """The permissions a rewrite of `path` should get: those it has, else what `open()` would create under the
    process's umask (mkstemp's 0600 would hide run folders and caches from everyone else on a shared machine)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


_TEMP_SUFFIX = ".tmp"


def remove_leftover_temps(path: Path, older_than_s: float = 0.0) -> None:
    """Delete the temp files `atomic_write` left beside `path` when its process was killed mid-write (no exception
    ran to clean up), those not written to for `older_than_s` seconds: 0 where no other process can be writing."""
    now = time.time()
    for tmp in path.parent.glob(f".{path.name}.*{_TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime >= older_than_s:
                tmp.unlink()


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], Any]) -> None:
    """Call `write(f)` on a temp file beside `path`, fsync it, then rename it over `path`.

    On any error (ENOSPC included) the temp file is removed and the old `path`, if any, is untouched. The file
    keeps the permissions it had, or gets those of a newly created file (see `new_file_mode`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = new_file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: name the one being written
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # torch tensors, numpy arrays and scalars
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(path: Path | str, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def require_regular_file(path: Path | str, what: str = "file") -> Path:
    """`path` if it is a regular file; a clear error for a FIFO, device, socket or folder (reading those
    can hang forever or read garbage)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
        raise UserError(f"{path}: is {kind}; expected a {what}")
    return path


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        require_regular_file(path, "JSON file")
        return json.loads(path.read_text(encoding="utf-8"))
    except UserError:
        if not path.exists():
            raise UserError(f"{path} is missing: is this a cifarlab run folder?") from None
        raise
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); the run folder is damaged") from None
