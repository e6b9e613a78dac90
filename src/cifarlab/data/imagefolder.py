"""ImageFolder trees (``root/{train,test}/<class>/<image>``) and tarballs of them, decoded to uint8 arrays.

Images are decoded with `images.decode_image` (RGB, resized to ``image_size`` squares, or kept at their native
size when ``image_size=None``), big ones in a small thread pool. A folder is keyed for the cache by a
fingerprint of its file list, a tarball by its MD5; tarballs are read to the end of their compressed stream
so a damaged one is reported instead of cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.data.archives import iter_tar, tar_stem
from cifarlab.data.cache import cached, resolve_cache_dir
from cifarlab.data.images import IMAGE_SUFFIXES, decode_image, is_regular_file, skip_name
from cifarlab.data.official import file_md5
from cifarlab.errors import ConfigError, DataError

__all__ = ["DEFAULT_IMAGE_SIZE", "load_imagefolder"]

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 32
# Bump when the decoded layout or the decode/resize rule changes: old cache files are then ignored.
# v2: 16-bit images scaled (not clipped) to 8 bits; FIFOs and other non-regular files skipped.
_CACHE_VERSION = 2
_SPLITS = ("train", "test", "val")
TAR_ADVICE = "Delete it and re-create (or re-download) it, or put a good copy there."

_Entry = tuple[str, str, str, "bytes | Path", str]  # split, class, key (sort/report name), source, where
_Decoded = tuple[str, str, str, np.ndarray, str]  # split, class, key, (3, H, W) uint8, where


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
        return [(s, c, k, decode_image(src, where, size), where) for s, c, k, src, where in chunk]

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
    return (
        f"expected {root}/train/<class>/*.png|jpg|jpeg|bmp|webp|gif|tif|tiff and {root}/test/<class>/... "
        "(or val/ instead of test/)"
    )


def _assemble(decoded: list[_Decoded], where: str) -> dict[str, Any]:
    splits = {s for s, *_ in decoded}
    if "train" not in splits:
        raise DataError(f"{where} has no train/ images: {_layout_help(where)}.")
    test_split = "test" if "test" in splits else "val" if "val" in splits else None
    if test_split is None:
        raise DataError(f"{where} has train/ but no test/ (or val/) images: {_layout_help(where)}.")
    if test_split == "test" and "val" in splits:
        log.info("%s: using test/ as the test split; val/ is ignored", where)
    used = [d for d in decoded if d[0] in ("train", test_split)]
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
    out: dict[str, Any] = {"classes": classes}
    for split, key in (("train", "train"), (test_split, "test")):
        # Deterministic order: by class, then file name (never by the arrays themselves).
        items = sorted(((index[c], k, a) for s, c, k, a, _ in used if s == split), key=lambda t: t[:2])
        out[f"x_{key}"] = np.ascontiguousarray(np.stack([a for *_, a in items]))
        out[f"y_{key}"] = np.array([i for i, *_ in items], dtype=np.int64)
    return out


def _scan_folder(root: Path) -> tuple[Path, list[tuple[str, str, Path]]]:
    """(tree root, [(split, class, file)]) for root/<split>/<class>/<image>; descends into a lone subfolder
    that holds the splits (an extracted tarball's top folder). Skips anything that is not a regular file
    (a FIFO named x.png would block the decoder forever)."""
    if not any((root / s).is_dir() for s in _SPLITS):
        subdirs = [p for p in root.iterdir() if p.is_dir() and not skip_name(p.name)]
        if len(subdirs) == 1 and any((subdirs[0] / s).is_dir() for s in _SPLITS):
            root = subdirs[0]
    files: list[tuple[str, str, Path]] = []
    for split in _SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            continue
        for cls_dir in sorted(split_dir.iterdir()):
            if not cls_dir.is_dir() or skip_name(cls_dir.name):
                continue
            for f in sorted(cls_dir.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES and not skip_name(f.name) and is_regular_file(f):
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
    """Image members laid out as [<top>/]<split>/<class>/<image>, streamed from a tarball (whose compressed
    stream is then checked to its end by `iter_tar`)."""
    prefixes: set[str] = set()
    member_of = f"{archive} (member "  # formatted once: 60,000 members made this loop's cost visible

    def image_parts(m: Any) -> tuple[list[str], str] | None:
        """(the name's parts, the name) of an image member, else None."""
        parts = [p for p in m.name.split("/") if p not in ("", ".")]
        if len(parts) < 3 or parts[-3] not in _SPLITS or any(skip_name(p) for p in parts):
            return None
        return (parts, m.name) if os.path.splitext(parts[-1])[1].lower() in IMAGE_SUFFIXES else None

    for (parts, name), raw in iter_tar(archive, TAR_ADVICE, image_parts):
        prefix = "/".join(parts[:-3])
        if prefix not in prefixes:
            prefixes.add(prefix)
            if len(prefixes) > 1:
                raise DataError(
                    f"{archive} holds more than one image tree "
                    f"({', '.join(sorted(p + '/' for p in prefixes))}): {_layout_help('<top>')}, once."
                )
        yield parts[-3], parts[-2], "/".join(parts[-3:]), raw, member_of + name + ")"


def load_imagefolder(
    path: Path, cache_dir: Path | str | None, name: str | None = None, image_size: int | None = DEFAULT_IMAGE_SIZE
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(arrays, Dataset fields) of an ImageFolder tree (a folder, or a tarball of one), cached after the
    first decode. `image_size`: resize to that square size, or None to keep the native size (which must
    then be the same for every image)."""
    size = check_image_size(image_size)
    size_tag = f"{size}px" if size is not None else "native"
    if path.is_dir():
        root, files = _scan_folder(path)
        ds_name = name or root.name
        checksum, kind = "", ""
        key = _folder_fingerprint(root, files)
        entries: Iterable[_Entry] = ((s, c, f"{s}/{c}/{f.name}", f, str(f)) for s, c, f in files)
        total: int | None = len(files)
    else:
        ds_name = name or tar_stem(path)
        checksum, kind = file_md5(path), "md5 of archive"
        key = checksum
        entries, total = _tar_entries(path), None
    cdir = resolve_cache_dir(cache_dir)
    # Keyed by content only, so loading the same tarball by name or by path shares one cache file.
    cache_file = cdir / f"imagefolder-{key}-{size_tag}-v{_CACHE_VERSION}.safetensors"

    def build() -> dict[str, Any]:
        log.info("decoding images in %s (first time only)", path)
        decoded = _decode_entries(entries, total, f"decoding {path.name}", size)
        if not decoded:
            raise DataError(f"no images found in {path}: {_layout_help('<top>')}.")
        return _assemble(decoded, str(path))

    arrays, used_dir = cached(cache_file, build)
    fields = {"name": ds_name, "source": str(path), "checksum": checksum, "checksum_kind": kind}
    return arrays, {**fields, "cache_dir": used_dir}
