"""ImageFolder trees (``root/{train,test}/<class>/<image>``) and tarballs of them, decoded to uint8 arrays.

A class folder is read recursively, as torchvision's ImageFolder reads it (``train/cat/indoor/1.png`` is a cat),
skipping hidden entries and ``__MACOSX``; the image suffixes are `images.IMAGE_SUFFIXES`, the list `cifarlab
predict` searches folders for. Other files, files beside the class folders and image names that are no regular
file (a dangling link) are skipped with one warning that counts them; a folder that cannot be listed is an error
(read as empty, its images would silently go); a linked folder that leads above its class folder or elsewhere
into the tree is skipped with a warning (its images would get the wrong label). A tarball reads like the folder
extracting it leaves: a name stored twice is its last copy, and hard and symbolic links (to files or folders)
are followed as on disk, by the same rules, but only inside the archive. Images are decoded
with `images.decode_image` (RGB, resized to ``image_size`` squares, or kept at their native size when
``image_size=None``), big ones in a small thread pool; when any image was resized, one warning says from which
sizes (their count is stored with the cached arrays, so a cached load says it too). A tarball's checksum is its
MD5; a folder's is an MD5 over every image it uses (its path under the tree, so its label, and its contents), so
a run can tell when the images changed. The checksum keys the decoded-array cache. Tarballs are read to the end of their
compressed stream so a damaged one is reported instead of cached.

Every class must have training images, and there must be at least two classes; with ``test_only`` (a test
set for `cifarlab evaluate --test-data`) only the test split is read and neither rule applies.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.data.archives import TarTree, iter_tar, tar_stem, unreadable_folder
from cifarlab.data.cache import cache_source, cached, cached_before, resolve_cache_dir, writable_dir
from cifarlab.data.images import IMAGE_SUFFIXES, decode_image, is_regular_file, skip_name
from cifarlab.data.official import OFFICIAL, file_md5
from cifarlab.errors import ConfigError, DataError
from cifarlab.text import terminal_safe

__all__ = ["DEFAULT_IMAGE_SIZE", "load_imagefolder"]

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 32
# Bump when the decoded layout or the decode/resize rule changes: old cache files are then ignored.
# v2: 16-bit images scaled (not clipped) to 8 bits; FIFOs and other non-regular files skipped.
# v3: EXIF orientation applied; float and 32-bit images refused (they decoded black).
# v4: class folders read recursively, the suffixes predict reads, the images' native sizes stored with the arrays.
_CACHE_VERSION = 4
_SPLITS = ("train", "test", "val")
TAR_ADVICE = "Delete it and re-create (or re-download) it, or put a good copy there."

# top folder of an official "python version" archive -> its spec
_OFFICIAL_FOLDERS = {spec.folder: spec for spec in OFFICIAL.values()}

_Entry = tuple[str, str, str, "bytes | Path", str]  # split, class, key (sort/report name), source, where
# split, class, key, (3, H, W) uint8, where, the file's own (width, height)
_Decoded = tuple[str, str, str, np.ndarray, str, tuple[int, int]]
# split, class, name under the class folder ("x.png", "sub/x.png"), file
_File = tuple[str, str, str, Path]


def check_image_size(image_size: int | None) -> int | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"image_size must be a positive int or None (keep native size), got {image_size!r}")
    return image_size


def _decode_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _chunks(items: Iterable[_Entry], n: int) -> Iterator[list[_Entry]]:
    chunk: list[_Entry] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# Below this many seconds per image the thread pool is slower than one thread: a small image (CIFAR's 32 x 32
# JPEGs: ~0.03 ms in simplejpeg, ~0.15 ms in Pillow) decodes in less time than the threads take to hand the GIL to
# each other (shared CIFAR-10 copy through Pillow, 2-core Zen 3: 20.5 s pooled, ~17 s serial). Big images spend
# long in Pillow's C code with the GIL released, and gain from the pool.
POOL_ABOVE_SECONDS = 1e-3
CHUNK = 256  # images per unit of work


def _decode_entries(entries: Iterable[_Entry], total: int | None, desc: str, size: int | None) -> list[_Decoded]:
    """Decode the first chunk here, then the rest here too (small images) or in a small thread pool (big
    ones: Pillow releases the GIL while decoding)."""
    from tqdm.auto import tqdm

    def work(chunk: list[_Entry]) -> list[_Decoded]:
        out: list[_Decoded] = []
        for s, c, k, src, where in chunk:
            native: list[tuple[int, int]] = []
            out.append((s, c, k, decode_image(src, where, size, native=native), where, native[0]))
        return out

    workers = _decode_workers()
    chunks = _chunks(entries, CHUNK)
    results: list[_Decoded] = []
    with tqdm(total=total, desc=desc, unit="img", disable=None) as bar:
        first = next(chunks, [])
        t0 = time.perf_counter()
        results.extend(work(first))
        bar.update(len(first))
        pooled = workers > 1 and (time.perf_counter() - t0) / max(1, len(first)) >= POOL_ABOVE_SECONDS
        for done in _in_pool(work, chunks, workers) if pooled else map(work, chunks):
            results.extend(done)
            bar.update(len(done))
    return results


def _in_pool(work: Callable[[list[_Entry]], list[_Decoded]], chunks: Iterator[list[_Entry]], workers: int
             ) -> Iterator[list[_Decoded]]:  # fmt: skip
    """`work` of each chunk, in order, from a thread pool that keeps few chunks in flight (a big tarball is never
    held in memory whole)."""
    pending: deque[Future[list[_Decoded]]] = deque()
    with ThreadPoolExecutor(workers) as pool:
        try:
            for chunk in chunks:
                pending.append(pool.submit(work, chunk))
                if len(pending) > 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


def _layout_help(root: str) -> str:
    return f"expected {root}/train/<class>/*.png|jpg|... and {root}/test/<class>/... (or val/ instead of test/)"


def size_note(native_sizes: dict[str, int], image_size: int | None) -> str | None:
    """One line on the resizing a load did ("images of 5 sizes from 16x16 to 100x20 resized to 32x32 (aspect
    ratio not kept)"), from {"WxH": count} of the images' own sizes; None when nothing was resized."""
    if image_size is None or not native_sizes:
        return None
    target = f"{image_size}x{image_size}"
    resized = {k: n for k, n in native_sizes.items() if k != target}
    if not resized:
        return None
    dims = sorted((tuple(int(v) for v in k.split("x")) for k in resized), key=lambda wh: (wh[0] * wh[1], wh))
    sizes = _wh(dims[0]) if len(dims) == 1 else f"{len(dims)} sizes from {_wh(dims[0])} to {_wh(dims[-1])}"
    n = sum(resized.values())
    of = f"{n} of {sum(native_sizes.values())} images" if n < sum(native_sizes.values()) else f"{n} images"
    kept = " (aspect ratio not kept)" if any(w != h for w, h in dims) else ""
    return f"{of} ({sizes}) resized to {target}{kept}; in Python, load_dataset(path, image_size=None) keeps their size"


def _wh(wh: tuple[int, ...]) -> str:
    return f"{wh[0]}x{wh[1]}"


def _test_split(splits: set[str], where: str, test_only: bool) -> str:
    """The split used as the test set (test/, else val/); an error when a needed split is missing."""
    if not test_only and "train" not in splits:
        raise DataError(f"{where} has no train/ images: {_layout_help(where)}.")
    test_split = "test" if "test" in splits else "val" if "val" in splits else None
    if test_split is None:
        have = "train/ but no" if "train" in splits else "no"
        raise DataError(f"{where} has {have} test/ (or val/) images: {_layout_help(where)}.")
    if test_split == "test" and "val" in splits:
        # A warning, so `cifarlab train` (which shows warnings only) says it as `data info` does.
        log.warning("%s: using test/ as the test split; val/ is ignored", where)
    return test_split


def check_classes(arrays: dict[str, Any], where: str, folder: bool = True, fix: str | None = None) -> None:
    """A dataset to train on needs at least two classes, each with training images: a class with none would never
    be learned and would silently cost test accuracy. `folder`: word the advice for an image folder, else for
    arrays (labels 0..K-1); `fix` replaces that advice on untrained classes."""
    classes = list(arrays["classes"])
    counts = torch.bincount(torch.as_tensor(arrays["y_train"]), minlength=len(classes)).tolist()
    untrained = [c for c, n in zip(classes, counts) if n == 0]
    if untrained:
        many = len(untrained) > 1
        if fix is None:
            fix = (
                "add train/<class>/ images, or remove that class from the test split"
                if folder
                else "each label 0..K-1 must occur in the training labels (and `classes` name only those)"
            )
        # A label byte gone wrong can leave dozens of classes empty: name a few, count the rest (one line).
        shown = ", ".join(untrained[:8]) + (f", ... ({len(untrained)} in all)" if len(untrained) > 8 else "")
        raise DataError(
            f"{where}: {'classes' if many else 'class'} {shown} {'have' if many else 'has'} no "
            f"training images; every class needs some ({fix})."
        )
    if len(classes) < 2:
        fix = f"at least 2 class folders: {_layout_help(where)}" if folder else "labels of at least 2 classes"
        raise DataError(f"{where} has {len(classes)} class ({', '.join(classes)}): a classifier needs {fix}.")


def _assemble(decoded: list[_Decoded], where: str, test_only: bool = False) -> dict[str, Any]:
    test_split = _test_split({s for s, *_ in decoded}, where, test_only)
    wanted = (test_split,) if test_only else ("train", test_split)
    used = [d for d in decoded if d[0] in wanted]
    first = used[0]
    for d in used:
        if d[3].shape != first[3].shape:
            (_, h1, w1), (_, h2, w2) = first[3].shape, d[3].shape
            raise DataError(
                f"{where}: images differ in size ({first[4]} is {w1}x{h1}, {d[4]} is {w2}x{h2}) and "
                "image_size=None keeps native sizes. Pass an image_size to resize every image to one square "
                "size, or make the images the same size."
            )
    classes = tuple(sorted({c for s, c, *_ in used}))
    index = {c: i for i, c in enumerate(classes)}
    native = Counter(f"{w}x{h}" for *_, (w, h) in used)
    out: dict[str, Any] = {"classes": classes, "native_sizes": dict(sorted(native.items()))}
    for split, key in (("train", "train"), (test_split, "test")):
        # Deterministic order: by class, then file name (never by the arrays themselves).
        items = sorted(((index[c], k, a) for s, c, k, a, *_ in used if s == split), key=lambda t: t[:2])
        # A test-only load has no train images: an empty train split shaped like the test images.
        x = np.stack([a for *_, a in items]) if items else np.zeros((0, *first[3].shape), dtype=np.uint8)
        out[f"x_{key}"] = np.ascontiguousarray(x)
        out[f"y_{key}"] = np.array([i for i, *_ in items], dtype=np.int64)
    return out


@dataclass
class _Skipped:
    """What a scan left out, for the one warning that counts it (`_warn_skipped`)."""

    others: list[str] = field(default_factory=list)  # files in class folders that are not images
    loose: list[str] = field(default_factory=list)  # files beside the class folders, so of no class
    broken: list[str] = field(default_factory=list)  # image names that are no regular file (a dangling link, a FIFO)

    def extend(self, other: _Skipped) -> None:
        self.others += other.others
        self.loose += other.loose
        self.broken += other.broken


def _listdir(folder: Path) -> list[Path]:
    """`folder`'s entries, sorted; an unreadable folder is an error (read as empty, its images would silently
    leave the data)."""
    try:
        return sorted(folder.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise unreadable_folder(folder, exc) from exc


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError as exc:  # EACCES: the folder holding it can be listed but not entered
        raise unreadable_folder(path.parent, exc) from exc


def _class_files(cls_dir: Path, tree: Path | None = None) -> tuple[list[tuple[str, Path]], _Skipped]:
    """([(name under `cls_dir`, image file)], what was skipped) of a class folder and every folder below it
    (sorted; hidden entries and __MACOSX skipped; a linked folder is followed once, so a link loop ends). An
    image-named path that is not a regular file (a FIFO named x.png would block the decoder forever) is
    skipped. A linked folder that leads above `cls_dir`, or elsewhere into the dataset `tree`, is skipped with a
    warning: its images (other classes', or the test split's) would all get this class's label."""
    images: list[tuple[str, Path]] = []
    skipped = _Skipped()
    seen: set[tuple[int, int]] = set()
    cls_real = cls_dir.resolve()
    tree_real = tree.resolve() if tree is not None else None

    def leads_back(link: Path) -> str | None:
        real = link.resolve()
        if real != cls_real and cls_real.is_relative_to(real):
            return f"{real}, a folder above its class folder"
        if tree_real is not None and real.is_relative_to(tree_real) and not real.is_relative_to(cls_real):
            return f"{real}, elsewhere in the dataset tree"
        return None

    def walk(folder: Path, prefix: str) -> None:
        try:
            st = folder.stat()
        except OSError as exc:
            raise unreadable_folder(folder, exc) from exc
        if (st.st_dev, st.st_ino) in seen:
            return
        seen.add((st.st_dev, st.st_ino))
        for entry in _listdir(folder):
            if skip_name(entry.name):
                continue
            if _is_dir(entry):
                where = leads_back(entry) if entry.is_symlink() else None
                if where is not None:
                    log.warning(
                        "%s: skipped a linked folder that leads to %s (its images would all be labelled %s)",
                        entry,
                        where,
                        cls_dir.name,
                    )
                    continue
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.suffix.lower() in IMAGE_SUFFIXES:
                if is_regular_file(entry):
                    images.append((prefix + entry.name, entry))
                else:
                    skipped.broken.append(str(entry))
            elif is_regular_file(entry):
                skipped.others.append(str(entry))

    walk(cls_dir, "")
    return images, skipped


def _holds_images(folder: Path) -> bool:
    return bool(_class_files(folder)[0])


def _nothing_found(root: Path, test_only: bool) -> DataError:
    """The error for a tree where no image was found, saying what is wrong with its layout."""
    layout = _layout_help(str(root))
    present = [s for s in _SPLITS if _is_dir(root / s)]
    if test_only and "train" in present and not any(s in present for s in _SPLITS[1:]):
        return DataError(
            f"{root} has train/ but no test/ (or val/) folder: a test set is read from {root}/test/<class>/... "
            "(or val/); pass a tree that has one."
        )
    if not present:
        entries = [p for p in _listdir(root) if not skip_name(p.name)]
        flat = [p.name for p in entries if _is_dir(p) and _holds_images(p)]
        if flat:
            shown = ", ".join(f"{n}/" for n in flat[:3]) + (", ..." if len(flat) > 3 else "")
            return DataError(
                f"{root} has no train/ or test/ folder: its images seem to be directly in class folders ({shown}). "
                f"Move them to {root}/train/<class>/ and hold some out in {root}/test/<class>/ ({layout})."
            )
        loose = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES and is_regular_file(p)]
        if loose:
            # Images with no class folder: the label would be unknown, so say where they must go.
            n = f"{len(loose)} image{'s' * (len(loose) != 1)}"
            if test_only:
                return DataError(
                    f"{root} holds {n} directly, not in class folders: a test set needs {root}/<class>/ folders "
                    f"(or {root}/test/<class>/), one per class of the run."
                )
            return DataError(
                f"{root} holds {n} directly, not in class folders: put them in {root}/train/<class>/ and "
                f"{root}/test/<class>/ ({layout})."
            )
        return DataError(f"{root} has no train/ or test/ folder and no images: {layout}.")
    return DataError(f"no images found in {', '.join(f'{root}/{s}/' for s in present)}: {layout}.")


def _split_entries(split_dir: Path, tree: Path) -> tuple[list[tuple[str, str, Path]], _Skipped]:
    """([(class, name under the class folder, file)], skipped) of one split folder (or a test set's own folder)."""
    files: list[tuple[str, str, Path]] = []
    skipped = _Skipped()
    for entry in _listdir(split_dir):
        if skip_name(entry.name):
            continue
        if not _is_dir(entry):
            skipped.loose.append(str(entry))  # no class folder: no label
            continue
        images, also = _class_files(entry, tree)
        files += [(entry.name, name, f) for name, f in images]
        skipped.extend(also)
    return files, skipped


def _scan_folder(root: Path, test_only: bool = False) -> tuple[Path, list[_File]]:
    """(tree root, [(split, class, name under the class folder, file)]) for root/<split>/<class>/.../<image>, only
    of the splits used (train/, and test/ else val/; with `test_only` no train/); descends into a lone subfolder
    that holds the splits (an extracted tarball's top folder). Files of other suffixes in the splits used, files
    beside the class folders and image names that are no regular file are counted in one warning; a folder that
    cannot be read is an error."""
    if not any(_is_dir(root / s) for s in _SPLITS):
        subdirs = [p for p in _listdir(root) if _is_dir(p) and not skip_name(p.name)]
        if len(subdirs) == 1 and any(_is_dir(subdirs[0] / s) for s in _SPLITS):
            root = subdirs[0]
    files: list[_File] = []
    skipped: dict[str, _Skipped] = {}
    if test_only and not any(_is_dir(root / s) for s in _SPLITS):
        # A test set may be named by its own folder (`evaluate --test-data photos/`): <class>/<image> is test/.
        found, skipped["test"] = _split_entries(root, root)
        files += [("test", c, name, f) for c, name, f in found]
    for split in _SPLITS[1:] if test_only else _SPLITS:
        split_dir = root / split
        if not _is_dir(split_dir):
            continue
        found, skipped[split] = _split_entries(split_dir, root)
        files += [(split, c, name, f) for c, name, f in found]
    if not files:
        raise _nothing_found(root, test_only)
    # Only the splits used are decoded and fingerprinted: an ignored val/ changing does not change the data.
    wanted = ("train", _test_split({s for s, *_ in files}, str(root), test_only))
    used = _Skipped()
    for split in wanted:
        used.extend(skipped.get(split, _Skipped()))
    _warn_skipped(str(root), used)
    return root, [entry for entry in files if entry[0] in wanted]


def _files_that(n: int) -> str:
    return "1 file that is" if n == 1 else f"{n} files that are"


def _warn_skipped(root: str, skipped: _Skipped) -> None:
    """One warning for what the splits used hold besides images in class folders (folder or tarball)."""
    parts: list[str] = []
    if skipped.others:
        others = skipped.others
        kinds = Counter(os.path.splitext(f)[1].lower() or "(no suffix)" for f in others)
        parts.append(
            f"{_files_that(len(others))} not {'an image' if len(others) == 1 else 'images'} of a known type "
            f"({', '.join(f'{k} {n}' for k, n in kinds.most_common())}; e.g. {others[0]}); images are "
            f"{' '.join(sorted(IMAGE_SUFFIXES))}"
        )
    if skipped.loose:
        parts.append(
            f"{_files_that(len(skipped.loose))} outside the class folders, so of no class (e.g. "
            f"{skipped.loose[0]}); images go in <split>/<class>/"
        )
    if skipped.broken:
        n = len(skipped.broken)
        parts.append(
            f"{n} image name{'s' * (n != 1)} that {'is' if n == 1 else 'are'} not a regular file (a link that leads "
            f"nowhere, a FIFO or a device; e.g. {skipped.broken[0]})"
        )
    if parts:  # file names escaped: a newline or an escape sequence in one must not break the one-line warning
        log.warning("%s: skipped %s", terminal_safe(root), terminal_safe("; and ".join(parts)))


def _file_digest(path: Path) -> tuple[int, bytes]:
    """(size, MD5) of one image file."""
    try:
        with open(path, "rb", buffering=0) as f:  # a regular file (see _scan_folder): small, read whole
            data = f.read()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return len(data), hashlib.md5(data).digest()


def folder_fingerprint(files: list[_File]) -> str:
    """MD5 over every image's path under the tree (split/class/name, sorted: so its label) with its size and
    content MD5: renaming, moving between classes or editing any image changes it; moving the tree does not.

    Costs one read of every file (60,000 CIFAR-sized PNGs, 190 MB: ~0.7-1 s warm on 2 busy cores, beside ~0.7 s for
    the scan); reads release the GIL, so a few threads help where there are cores."""
    by_name = sorted((f"{s}/{c}/{name}", f) for s, c, name, f in files)
    paths = [f for _, f in by_name]
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    workers = min(_decode_workers(), len(chunks))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            digests = [d for chunk in pool.map(lambda c: [_file_digest(p) for p in c], chunks) for d in chunk]
    else:
        digests = [_file_digest(p) for p in paths]
    h = hashlib.md5()
    for (name, _), (size, digest) in zip(by_name, digests):
        h.update(f"{name}\0{size}\0".encode())  # names cannot hold NUL: each record is unambiguous
        h.update(digest)
    return h.hexdigest()


def _split_at(parts: list[str], splits: tuple[str, ...], prefix: list[str] | None) -> int | None:
    """Where the split folder is in an image member's path parts ([<top>/]<split>/<class>/.../<image>), else
    None. Once the tree's top (`prefix`) is known it decides; before that, the shallowest split-named folder
    whose next folder is not also split-named (so a tree whose top folder is called test/ still reads right)."""
    if prefix is not None:
        i = len(prefix)
        return i if len(parts) >= i + 3 and parts[:i] == prefix and parts[i] in splits else None
    found = [i for i in range(len(parts) - 2) if parts[i] in splits]
    if not found:
        return None
    return next((i for i in found if parts[i + 1] not in _SPLITS), found[0])


def _tar_entries(archive: Path, test_only: bool = False, withdrawn: dict[str, int] | None = None) -> Iterator[_Entry]:
    """Image members laid out as [<top>/]<split>/<class>/.../<image> (class folders read recursively, as on
    disk; links to files and folders read as on disk, see `_tar_walk`), streamed from a tarball (whose compressed
    stream is then checked to its end by `iter_tar`).

    An entry may come again (a name stored twice: the later one is the one extraction keeps) or be withdrawn (a
    path the extracted folder does not hold as first read): `withdrawn` gets {key: how many entries came before
    its withdrawal}, and `_latest` keeps what the folder holds."""
    splits = _SPLITS[1:] if test_only else _SPLITS  # test_only: train members are read past, not decoded
    member_of = f"{archive} (member "  # formatted once: 60,000 members made this loop's cost visible
    top: list[list[str]] = []  # the tree's top folder's parts, once the first image member set it
    others: dict[str, tuple[str, str]] = {}  # path -> (split, name) of files in class folders that are not images
    beside: dict[str, tuple[list[str], str]] = {}  # path -> (parts, name) of files in a split folder, not a class's
    official: list[str] = []  # official CIFAR folders seen (a renamed official archive holds no image tree)
    seen: set[str] = set()  # the splits images came from
    withdrawn = {} if withdrawn is None else withdrawn

    def image_parts(m: Any) -> tuple[tuple[str, ...], int, str] | None:
        """(the name's parts, where its split is, the name) of an image member, else None."""
        parts = [p for p in m.name.split("/") if p not in ("", ".")]
        if any(skip_name(p) for p in parts):
            return None
        if len(parts) >= 2 and parts[-2] in _SPLITS:
            beside["/".join(parts)] = (parts, m.name)  # decided at the end, once the tree's top is known
        if not official and parts[0] in _OFFICIAL_FOLDERS:
            official.append(parts[0])
        if len(parts) < 3:
            return None
        if os.path.splitext(parts[-1])[1].lower() not in IMAGE_SUFFIXES:
            at = _split_at(parts, _SPLITS, top[0] if top else None)
            if at is not None and parts[at] in splits and len(parts) > at + 2:
                others["/".join(parts)] = (parts[at], m.name)
            return None
        at = _split_at(parts, _SPLITS, top[0] if top else None)
        if at is None and top:
            other = _split_at(parts, _SPLITS, None)
            if other is not None:
                where = sorted({"/".join(top[0]) + "/", "/".join(parts[:other]) + "/"})
                raise DataError(
                    f"{archive} holds more than one image tree ({', '.join(where)}): {_layout_help('<top>')}, once."
                )
            return None
        if at is None:
            return None
        if not top:
            top.append(parts[:at])
        return (tuple(parts), at, m.name) if parts[at] in splits else None

    def walk(tree: TarTree) -> list[str]:
        return _tar_walk(tree, "/".join(top[0]) if top else None, archive)

    n = 0
    for (parts, at, name), raw in iter_tar(archive, TAR_ADVICE, image_parts, walk):
        key = "/".join(parts[at:])
        if raw is None:
            withdrawn[key] = n
            continue
        seen.add(parts[at])
        n += 1
        yield parts[at], parts[at + 1], key, raw, member_of + name + ")"
    if not seen and not top and official:
        spec = _OFFICIAL_FOLDERS[official[0]]
        raise DataError(
            f"{archive} looks like the official {spec.name} archive ({spec.folder}/ inside) under another name: "
            f"rename it {spec.filename} and load it again (by path, or as {spec.name} from its folder with --data-dir)."
        )
    ignored = "val" if "test" in seen else ""  # val/ is not read when test/ is there (`_test_split`)
    used = [s for s in splits if s != ignored]
    loose = [name for parts, name in beside.values() if top and parts[:-2] == top[0] and parts[-2] in used]
    skipped = _Skipped(others=[name for split, name in others.values() if split != ignored], loose=loose)
    _warn_skipped(str(archive), skipped)


def _latest(decoded: list[_Decoded], withdrawn: dict[str, int]) -> list[_Decoded]:
    """Each image path once, as the extracted folder holds it: the last copy read, unless withdrawn after it (see
    `_tar_entries`; `decoded` is in the order the entries came)."""
    out: dict[str, _Decoded] = {}
    for i, d in enumerate(decoded):
        if i >= withdrawn.get(d[2], 0):
            out[d[2]] = d
    return list(out.values())


def _under(path: str, folder: str) -> bool:
    """`path` is `folder` or inside it (paths in an archive, "" its top)."""
    return not folder or path == folder or path.startswith(folder + "/")


def _tar_top(tree: TarTree) -> str | None:
    """The tree's top in an archive with no image member at a split/class path (every class folder a link), found
    as `_scan_folder` finds it: the archive's top, or its one folder, when it holds a split folder."""

    def has_splits(folder: str) -> bool:
        return any(tree.is_dir(tree.resolve(f"{folder}/{s}" if folder else s)) for s in _SPLITS)

    if has_splits(""):
        return ""
    folders = [n for n in tree.listdir("") if not skip_name(n) and tree.is_dir(tree.resolve(n))]
    return folders[0] if len(folders) == 1 and has_splits(folders[0]) else None


def _tar_walk(tree: TarTree, top: str | None, archive: Path) -> list[str]:
    """Every file path (as read, through linked folders) of the archive's image tree, as `_scan_folder` reads the
    extracted folder: each split folder's class folders (linked ones followed) and everything below them, where
    `_class_files`'s rules hold: a folder is read once per class folder (a link loop ends), and a linked folder
    that leads above its class folder or elsewhere into the tree is skipped with a warning."""
    top = _tar_top(tree) if top is None else top
    tree_real = tree.resolve(top) if top is not None else None
    if top is None or tree_real is None:
        return []
    files: list[str] = []
    for split in _SPLITS:
        split_path = f"{top}/{split}" if top else split
        split_real = tree.resolve(split_path)
        if split_real is None or not tree.is_dir(split_real):
            continue
        for entry in tree.listdir(split_real):
            if skip_name(entry):
                continue
            cls_path = f"{split_path}/{entry}"
            cls_real = tree.resolve(cls_path)
            if cls_real is not None and tree.is_dir(cls_real):
                files += _tar_class_files(tree, cls_path, cls_real, tree_real, archive)
            else:
                files.append(cls_path)  # beside the class folders: `image_parts` counts it
    return files


def _tar_class_files(tree: TarTree, cls_path: str, cls_real: str, tree_real: str, archive: Path) -> list[str]:
    """The file paths below one class folder of an archive, in `_class_files`'s order and by its rules."""

    def leads_back(real: str) -> str | None:
        if real != cls_real and _under(cls_real, real):
            return f"{real or '.'}/ in the archive, a folder above its class folder"
        if _under(real, tree_real) and not _under(real, cls_real):
            return f"{real}/ in the archive, elsewhere in the dataset tree"
        return None

    def listing(path: str, real: str) -> Iterator[tuple[str, str]]:
        return ((f"{path}/{n}", f"{real}/{n}") for n in tree.listdir(real) if not skip_name(n))

    files: list[str] = []
    seen = {cls_real}  # folders read (by their path with no link in it): each once
    stack = [listing(cls_path, cls_real)]  # depth first, in name order, as `_class_files` recurses
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        path, real = item
        kind = tree.kind(real)
        if kind in ("s", "h"):
            target = tree.resolve(real)
            if target is None or not tree.is_dir(target):
                files.append(path)  # a link to a file, or to nothing (`iter_tar` counts those)
                continue
            where = leads_back(target)
            if where is not None:
                log.warning(
                    "%s: skipped a linked folder that leads to %s (its images would all be labelled %s)",
                    terminal_safe(f"{archive} (member {path})"),
                    terminal_safe(where),
                    terminal_safe(cls_path.rpartition("/")[2]),
                )
                continue
            real = target
        elif kind == "f":
            files.append(path)
            continue
        elif kind != "d":
            continue  # a FIFO or device member: never read
        if real not in seen:
            seen.add(real)
            stack.append(listing(path, real))
    return files


def load_imagefolder(
    path: Path,
    cache_dir: Path | str | None,
    name: str | None = None,
    image_size: int | None = DEFAULT_IMAGE_SIZE,
    test_only: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arrays, Dataset fields) of an ImageFolder tree (a folder, or a tarball of one), cached after the
    first decode. `image_size`: resize to that square size, or None to keep the native size (which must
    then be the same for every image). `test_only`: read only the test split (test/, else val/); the train
    arrays are then empty, train/ may be missing, and the class rules of `check_classes` do not apply."""
    size = check_image_size(image_size)
    size_tag = f"{size}px" if size is not None else "native"
    withdrawn: dict[str, int] = {}  # a tarball's entries withdrawn (see `_tar_entries`)
    if test_only:
        size_tag += "-testonly"  # a tarball's key is the whole archive's: keep its test-only arrays apart
    source = cache_source("imagefolder", path, f"{size_tag}-v{_CACHE_VERSION}")  # before the source is read
    if path.is_dir():
        root, files = _scan_folder(path, test_only)
        ds_name = name or root.name
        checksum, kind = folder_fingerprint(files), "md5 of image files (paths and contents)"
        entries: Iterable[_Entry] = ((s, c, f"{s}/{c}/{name}", f, str(f)) for s, c, name, f in files)
        total: int | None = len(files)
    else:
        ds_name = name or tar_stem(path)
        checksum, kind = file_md5(path), "md5 of archive"
        entries, total = _tar_entries(path, test_only, withdrawn), None
    cdir = resolve_cache_dir(cache_dir)
    # Keyed by content only, so the same tree or tarball loaded by another name or path shares one cache file.
    cache_file = cdir / f"imagefolder-{checksum}-{size_tag}-v{_CACHE_VERSION}.safetensors"

    def build() -> dict[str, Any]:
        # "first time only" holds where the result can be cached (an unwritable cache folder decodes every time),
        # and only the first time: a source cached before has changed since (or its cache file is gone)
        once, before = "", cached_before(cdir, source)
        if writable_dir(cdir) and before is None:
            once = " (first time only)"
        elif writable_dir(cdir) and before != cache_file.name:
            once = " (again: it changed since it was cached)"
        log.info("decoding images in %s%s", path, once)
        decoded = _latest(_decode_entries(entries, total, f"decoding {path.name}", size), withdrawn)
        if not decoded:
            what = "test/ (or val/) images" if test_only else "images"
            raise DataError(f"no {what} found in {path}: {_layout_help('<top>')}.")
        arrays = _assemble(decoded, str(path), test_only)
        if not test_only:
            check_classes(arrays, str(path))  # before caching: nothing is left behind
        return arrays

    arrays, used_dir = cached(cache_file, build, source)
    if not test_only:
        check_classes(arrays, str(path))  # again: a cache file written before this rule existed
    native_sizes = dict(arrays.pop("native_sizes", None) or {})
    note = size_note(native_sizes, size)
    if note:
        # A warning, so `cifarlab train` (which shows warnings only) says it; the sizes come with a cached load too.
        log.warning("%s: %s", path, note)
    fields = {"name": ds_name, "source": str(path), "checksum": checksum, "checksum_kind": kind}
    return arrays, {**fields, "cache_dir": used_dir, "native_sizes": native_sizes}
