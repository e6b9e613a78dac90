"""Reading tarballs (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz) so that damage is always detected.

`iter_tar` reads the archive once in stream mode (twice when a wanted member is a hard or symbolic link),
and then reads the compressed stream to its very end, so the compressor's own check (gzip CRC32 and length
trailer, bzip2 CRCs, xz check) is verified before the caller is told the read succeeded. A caller builds its
result while iterating and trusts (or caches) it only after the iterator is exhausted without an error.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import posixpath
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from cifarlab.errors import DataError
from cifarlab.files import require_regular_file
from cifarlab.text import terminal_safe

__all__ = ["TAR_SUFFIXES", "ArchiveDamaged", "damaged", "iter_tar", "require_regular", "tar_stem", "unreadable_folder"]

T = TypeVar("T")
log = logging.getLogger(__name__)

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


def unreadable_folder(folder: Path, exc: OSError) -> DataError:
    """The error for a dataset folder that cannot be listed: a folder read as empty would silently drop its
    images (and a message would then blame the data)."""
    why = exc.strerror or str(exc)
    return DataError(f"cannot read {folder}: {why}; make it readable (chmod -R u+rX {folder}) and load again")


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


def _member_name(name: str) -> str:
    """A member's name as a path inside the archive ("./top/a.png" and "top//a.png" are "top/a.png")."""
    return posixpath.normpath(name.lstrip("/")) if name.strip("/.") else ""


def _link_target(m: tarfile.TarInfo) -> str | None:
    """The archive name a link member points to, or None when it points outside the archive. A hard link names
    its target from the archive's top; a symbolic link relative to its own folder."""
    if m.islnk():
        return _member_name(m.linkname)
    if m.linkname.startswith("/"):
        return None
    target = posixpath.normpath(posixpath.join(posixpath.dirname(_member_name(m.name)), m.linkname))
    return None if target == ".." or target.startswith("../") else target


def _resolve(name: str, files: set[str], links: dict[str, str | None]) -> str | None:
    """The regular member a link member leads to (through other links), or None (outside, missing, a loop)."""
    for _ in range(40):  # as the kernel's limit on nested links: a loop ends
        target = links.get(name)
        if target is None:
            return None
        if target in files:
            return target
        name = target
    return None


def iter_tar(path: Path, advice: str, select: Callable[[tarfile.TarInfo], T | None]) -> Iterator[tuple[T, bytes]]:
    """Yield ``(select(member), bytes)`` for every file member that `select` does not map to None (`select`
    returns what the caller derived from the member's name, so it is not derived twice; it sees every regular,
    hard-link and symlink member once, in archive order).

    Regular members come in archive order. Link members follow at the end with their target's bytes: `tar`
    stores the second name of a hard-linked file as a link, so dropping links would drop real images (the target
    is read in a second pass over the archive, only when a selected link exists, so nothing is held in memory in
    the usual case). A link that leads to no regular member (outside the archive, missing, a folder, a loop) is
    skipped with one warning that counts them.

    After the last member the rest of the compressed stream is read, so its checksum is verified: damage
    anywhere raises `ArchiveDamaged` (with `advice` on what to do) from the iterator before it ends.
    """
    files: set[str] = set()  # names of the regular members
    links: dict[str, str | None] = {}  # link member -> the name it points to (None: outside the archive)
    wanted: list[tuple[T, str, str]] = []  # (key, name, link text) of the selected link members
    for m, read in _members(path, advice):
        if m.isfile():
            files.add(_member_name(m.name))
        elif m.islnk() or m.issym():
            links[_member_name(m.name)] = _link_target(m)
        else:
            continue
        key = select(m)
        if key is None:
            continue
        if m.isfile():
            yield key, read()
        else:
            wanted.append((key, _member_name(m.name), m.linkname))
    if not wanted:
        return
    resolved = {name: _resolve(name, files, links) for _, name, _ in wanted}
    needed = {t for t in resolved.values() if t is not None}
    data: dict[str, bytes] = {}
    if needed:
        for m, read in _members(path, advice):
            if m.isfile() and _member_name(m.name) in needed:
                data[_member_name(m.name)] = read()
    for key, name, _ in wanted:
        target = resolved[name]
        if target is not None:
            yield key, data[target]
    lost = [f"{name} -> {text}" for _, name, text in wanted if resolved[name] is None]
    if lost:
        log.warning(
            "%s: skipped %s that %s to no file in the archive (e.g. %s); store the files themselves (tar "
            "--dereference) or extract the archive and load the folder",
            path,
            "1 link member" if len(lost) == 1 else f"{len(lost)} link members",
            "leads" if len(lost) == 1 else "lead",
            terminal_safe(lost[0]),  # one line, whatever the member's name holds
        )


def _members(path: Path, advice: str) -> Iterator[tuple[tarfile.TarInfo, Callable[[], bytes]]]:
    """(member, read its bytes) for every member, in one stream-mode pass that ends by reading the compressed
    stream to its end (so its checksum is verified); damage raises `ArchiveDamaged`."""
    require_regular(path, "archive")
    try:
        stream, fmt = _open_decompressed(path)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}. Check that it is readable.") from exc
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for m in tar:

                def read(m: tarfile.TarInfo = m) -> bytes:
                    # Called by the consumer, outside this generator's frame: damage must be converted here too.
                    try:
                        f = tar.extractfile(m)
                        return f.read() if f is not None else b""
                    except _READ_ERRORS as exc:
                        raise damaged(path, exc, advice, fmt) from exc

                yield m, read
            _drain(stream)
    except _READ_ERRORS as exc:
        raise damaged(path, exc, advice, fmt) from exc
