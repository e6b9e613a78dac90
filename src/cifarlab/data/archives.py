"""Reading tarballs (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz) so that damage is always detected.

`iter_tar` reads the archive once in stream mode (twice when a wanted file is reached through a hard or
symbolic link), and then reads the compressed stream to its very end, so the compressor's own check (gzip CRC32
and length trailer, bzip2 CRCs, xz check) is verified before the caller is told the read succeeded. A caller
builds its result while iterating and trusts (or caches) it only after the iterator is exhausted without an error.

An archive reads like the folder extracting it leaves (`TarTree`): a name stored twice is the last one stored,
and links (to files or folders, and through linked folders) lead where they would on disk, within the archive
only.
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
from collections.abc import Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple, TypeVar

from cifarlab.errors import DataError
from cifarlab.files import require_regular_file
from cifarlab.text import terminal_safe

__all__ = [
    "TAR_SUFFIXES",
    "ArchiveDamaged",
    "TarTree",
    "damaged",
    "iter_tar",
    "require_regular",
    "tar_stem",
    "unreadable_folder",
]

T = TypeVar("T", bound=Hashable)
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


_MAX_LINKS = 40  # links followed in one path, as the kernel's limit: a loop ends


class _Node(NamedTuple):
    kind: str  # "f" a file, "s" a symbolic link, "h" a hard link by name, "d" a folder, "o" other (FIFO, device)
    ref: int | str = -1  # "f": the member's index in the archive; "s": the link text; "h": the name it links to


_FOLDER = _Node("d")


class TarTree:
    """The tree extracting an archive leaves, from its members' headers (their contents are not kept).

    The last member stored under a name is the one there, as extraction replaces a file. A hard link is the file
    its target name held when the link was stored (tar stores a file's second name as a link to its first). A
    symbolic link resolves as the kernel resolves it on disk (relative to its folder, through linked folders, at
    most 40 links), but only inside the archive: an absolute target, or one above the archive's top, leads
    nowhere, so nothing outside the archive is ever named.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, _Node | int] = {}  # name -> what is there (an int: the member index of a file)
        self.link_text: dict[str, str] = {}  # link member -> its target as stored (for messages)
        self.repeated = False  # a name stored more than once
        self.links = False  # any hard or symbolic link
        self._children: dict[str, set[str]] | None = None

    def add(self, index: int, name: str, m: tarfile.TarInfo) -> str:
        """Member number `index` (in archive order), stored as `name` (`_member_name`). Returns "f" for a regular
        file, "l" for a hard or symbolic link, "" for anything else (a folder, a FIFO, a device)."""
        self._children = None
        if name in self.nodes:
            self.repeated = True
            self.link_text.pop(name, None)
        if m.isfile():
            self.nodes[name] = index  # the usual member, kept cheap: an archive may hold 60,000
            return "f"
        if not (m.issym() or m.islnk()):
            self.nodes[name] = _FOLDER if m.isdir() else _Node("o")
            return ""
        self.links = True
        self.link_text[name] = m.linkname
        if m.issym():
            self.nodes[name] = _Node("s", m.linkname)
            return "l"
        # tar stores a file's second name as a hard link to its first: it is what that name held then
        target = _member_name(m.linkname)
        held = self.nodes.get(target)
        same = isinstance(held, int) or (held is not None and held.kind in "sh")
        self.nodes[name] = held if same and held is not None else _Node("h", target)
        return "l"

    def _index(self) -> dict[str, set[str]]:
        """folder -> the names in it; folders no member names exist as the members below them need them."""
        if self._children is None:
            children: dict[str, set[str]] = {"": set()}
            for name in self.nodes:
                parent, _, base = name.rpartition("/")
                while True:
                    kids = children.setdefault(parent, set())
                    if base in kids:
                        break  # its parent folders are in already
                    kids.add(base)
                    if not parent:
                        break
                    parent, _, base = parent.rpartition("/")
            self._children = children
        return self._children

    def _node(self, path: str) -> _Node | None:
        node = self.nodes.get(path)
        if isinstance(node, int):
            return _Node("f", node)
        if node is None and path in self._index():
            return _FOLDER
        return node

    def kind(self, real: str) -> str | None:
        """What is at `real` (a path with no link in it, as `resolve` returns): see `_Node.kind`; None if nothing."""
        node = self._node(real)
        return node.kind if node is not None else None

    def listdir(self, real: str) -> list[str]:
        """The names in the folder `real`, sorted (as the folder reader lists them)."""
        return sorted(self._index().get(real, ()))

    def resolve(self, path: str) -> str | None:
        """The path with no link in it that `path` leads to, or None: nothing there, a file used as a folder, more
        than 40 links (a loop), or a target outside the archive."""
        todo = [p for p in reversed(path.split("/")) if p not in ("", ".")]
        real: list[str] = []
        hops = 0
        while todo:
            part = todo.pop()
            if part == "..":
                if not real:
                    return None  # above the archive's top
                real.pop()
                continue
            node = self._node("/".join((*real, part)))
            if node is None:
                return None
            if node.kind in "sh":
                hops += 1
                text = str(node.ref)
                if hops > _MAX_LINKS or (node.kind == "s" and text.startswith("/")):
                    return None
                if node.kind == "h":
                    real = []  # a hard link names its target from the archive's top
                todo.extend(p for p in reversed(text.split("/")) if p not in ("", "."))
                continue
            if todo and node.kind != "d":
                return None
            real.append(part)
        return "/".join(real)

    def is_dir(self, real: str | None) -> bool:
        return real is not None and self.kind(real) == "d"

    def file(self, path: str) -> tuple[str, int] | None:
        """(its path with no link in it, the member's index) of the file `path` leads to, else None."""
        real = self.resolve(path)
        node = self._node(real) if real is not None else None
        return (real, int(node.ref)) if real is not None and node is not None and node.kind == "f" else None

    def link_of(self, path: str) -> str:
        """`path`'s link text as stored, for a message ("?" when `path` is no link)."""
        parent, _, base = path.rpartition("/")
        where = self.resolve(parent) if parent else ""
        return self.link_text.get(f"{where}/{base}" if where else base, "?")


def iter_tar(
    path: Path,
    advice: str,
    select: Callable[[tarfile.TarInfo], T | None],
    walk: Callable[[TarTree], Iterable[str]] | None = None,
) -> Iterator[tuple[T, bytes | None]]:
    """Yield ``(select(member), bytes)`` for every file of the archive that `select` does not map to None, as the
    folder extracting it holds them (`TarTree`). `select` returns what the caller derived from the member's name,
    so it is not derived twice; it sees every regular, hard-link and symlink member in archive order (a name stored
    twice, twice), then any path `walk` adds (as a `TarInfo` of that name).

    Regular members come as they are read, so nothing is held in memory in the usual case. What that first pass
    cannot know is settled at the end (only where the archive holds links or a name stored twice):

    - A later pair with an equal key replaces an earlier one, and ``(key, None)`` withdraws it (and every earlier
      pair of its path): a name stored again (extraction keeps the last), stored again as a link or a folder, or
      not part of the tree `walk` reads. A caller may keep the last pair per key or per path: both read the same.
    - Files reached through links follow with their target's bytes (read in a second pass over the archive):
      `tar` stores the second name of a hard-linked file as a link, so dropping links would drop real images.
      `walk(tree)`, when given, lists every path the caller's reader would see in the extracted folder (through
      linked folders, as it follows them); without it, the links the archive stores are the paths added.

    A selected path that leads to no file (outside the archive, missing, a folder, a loop) is skipped with one
    warning that counts them. After the last member the rest of the compressed stream is read, so its checksum is
    verified: damage anywhere raises `ArchiveDamaged` (with `advice` on what to do) before the iterator ends.
    """
    tree = TarTree()
    keys: dict[str, T] = {}  # name -> `select` of its last member (a regular file or a link)
    sent: dict[str, tuple[T, int]] = {}  # name -> (key, member index) of its last regular member yielded
    replaced: list[T] = []  # keys yielded for a name stored again under another key ("./a.png", then "a.png")
    respelled: set[str] = set()  # those names: their last copy is withdrawn and sent again, whatever the caller keys by
    for index, (m, read) in enumerate(_members(path, advice)):
        name = _member_name(m.name)
        if not name:
            continue
        kind = tree.add(index, name, m)
        key = select(m) if kind in ("f", "l") else None
        if key is None:
            keys.pop(name, None)
            continue
        keys[name] = key
        if kind == "f":
            if name in sent and sent[name][0] != key:
                replaced.append(sent[name][0])
                respelled.add(name)
            sent[name] = (key, index)
            yield key, read()
    if not (tree.links or tree.repeated):
        return
    final: dict[str, T] = {}  # path as read -> its key, for every selected path of the extracted tree
    for p in walk(tree) if walk is not None and tree.links else list(keys):
        key = keys.get(p) if p in tree.nodes else select(tarfile.TarInfo(p))
        if key is not None and p not in final:
            final[p] = key
    kept: set[T] = set()  # keys the first pass yielded as the extracted tree holds them
    wanted: dict[int, list[T]] = {}  # member index -> keys of the paths that read it (second pass)
    lost: list[str] = []
    for p, key in final.items():
        target = tree.file(p)
        if target is None:
            lost.append(p)
        elif target[0] == p and sent.get(p) == (key, target[1]) and p not in respelled:
            kept.add(key)
        else:
            wanted.setdefault(target[1], []).append(key)
    stale = replaced + [key for key, _ in sent.values()]
    for key in dict.fromkeys(k for k in stale if k not in kept):  # before anything is sent again
        yield key, None
    if wanted:
        for index, (_, read) in enumerate(_members(path, advice)):
            if index in wanted:
                data = read()
                for key in wanted[index]:
                    yield key, data
    if lost:
        log.warning(
            "%s: skipped %s that %s to no file in the archive (e.g. %s); store the files themselves (tar "
            "--dereference) or extract the archive and load the folder",
            path,
            "1 link member" if len(lost) == 1 else f"{len(lost)} link members",
            "leads" if len(lost) == 1 else "lead",
            terminal_safe(f"{lost[0]} -> {tree.link_of(lost[0])}"),  # one line, whatever the member's name holds
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
