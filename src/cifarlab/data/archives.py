"""Reading tarballs (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz) so that damage is always detected.

`iter_tar` reads the archive once, in stream mode, and then reads the compressed stream to its very end, so
the compressor's own check (gzip CRC32 and length trailer, bzip2 CRCs, xz check) is verified before the
caller is told the read succeeded. A caller builds its result while iterating and trusts (or caches) it only
after the iterator is exhausted without an error.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from cifarlab.errors import DataError
from cifarlab.files import require_regular_file

__all__ = ["TAR_SUFFIXES", "ArchiveDamaged", "damaged", "iter_tar", "require_regular", "tar_stem"]

T = TypeVar("T")

TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")

# What reading a damaged or wrong file can raise, from tarfile and the three decompressors.
_READ_ERRORS: tuple[type[BaseException], ...] = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)


class ArchiveDamaged(DataError):
    """A tarball is corrupt, truncated or not a tarball."""


def require_regular(path: Path, what: str = "file") -> Path:
    """`path` if it is a regular file, else a `DataError` (a FIFO or device would block or read garbage)."""
    try:
        return require_regular_file(path, what)
    except DataError:
        raise
    except Exception as exc:  # UserError from cifarlab.files: same message, dataset error type
        raise DataError(str(exc)) from None


def tar_stem(path: Path) -> str:
    name = path.name
    for suffix in TAR_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _open_decompressed(path: Path) -> tuple[io.BufferedIOBase, str]:
    """The file's decompressed byte stream, chosen by its magic bytes (not its name), and the format name."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb"), "gzip"
    if head[:3] == b"BZh":
        return bz2.open(path, "rb"), "bzip2"
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb"), "xz"
    return open(path, "rb"), "tar"


def _drain(stream: io.BufferedIOBase) -> None:
    while stream.read(1 << 20):
        pass


def _why(path: Path, exc: BaseException, fmt: str) -> str:
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        head = b""
    text = " ".join(str(exc).split())  # tarfile lists every method it tried on separate lines: keep one
    if not head:
        return "it is empty"
    if head.lstrip()[:1] == b"<":
        return "it looks like an HTML page, not an archive (a failed download?)"
    if "CRC check failed" in text or "Incorrect length" in text or "Invalid data stream" in text:
        return f"its {fmt} checksum does not match its contents: a changed byte or a bad copy"
    if isinstance(exc, zlib.error) or "Corrupt input data" in text:
        return f"its {fmt} data is invalid: a changed byte or a bad copy"
    if isinstance(exc, EOFError):
        return f"the {fmt} stream ends early: the file is truncated"
    return f"{type(exc).__name__}: {text[:200]}"


def damaged(path: Path, exc: BaseException, advice: str, fmt: str = "tar") -> ArchiveDamaged:
    return ArchiveDamaged(
        f"{path} is damaged, truncated or not a tar archive ({_why(path, exc, fmt)}); nothing was cached. {advice}"
    )


def iter_tar(path: Path, advice: str, select: Callable[[tarfile.TarInfo], T | None]) -> Iterator[tuple[T, bytes]]:
    """Yield ``(select(member), bytes)`` for every regular member that `select` does not map to None, in archive
    order (`select` returns what the caller derived from the member's name, so it is not derived twice).

    After the last member the rest of the compressed stream is read, so its checksum is verified: damage
    anywhere raises `ArchiveDamaged` (with `advice` on what to do) from the iterator before it ends.
    """
    require_regular(path, "archive")
    try:
        stream, fmt = _open_decompressed(path)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}. Check that it is readable.") from exc
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for m in tar:
                key = select(m) if m.isfile() else None
                if key is not None:
                    f = tar.extractfile(m)
                    if f is None:  # pragma: no cover (isfile() members always have a reader)
                        continue
                    yield key, f.read()
            _drain(stream)
    except _READ_ERRORS as exc:
        raise damaged(path, exc, advice, fmt) from exc
