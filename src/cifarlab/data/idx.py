"""IDX files (the MNIST file format) and Fashion-MNIST, read from its four official files.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of dimensions), the dimensions
as big-endian int32, then the values row-major. Fashion-MNIST ships four of them, gzipped or not:
``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``.

Checksums: the dataset's README publishes the MD5 of each ``.gz`` file. Debian's ``dataset-fashion-mnist``
package ships recompressed ``.gz`` files whose MD5s differ but whose contents are byte-identical to the
official ones, so a file counts as official when its MD5 is the published ``.gz`` one, Debian's ``.gz`` one,
or that of the uncompressed official content; any other ``.gz`` is decompressed and its content checked.
A copy that is not official still loads, with one warning, and runs record that (like CIFAR archives).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from cifarlab.data.archives import require_regular, unreadable_folder
from cifarlab.data.official import file_md5
from cifarlab.errors import DataError

__all__ = [
    "FASHION_ADVICE",
    "IDX_ADVICE",
    "FASHION_MNIST",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "IDX_FILES",
    "IdxFiles",
    "check_complete",
    "find_idx_files",
    "parse_idx",
    "read_idx",
    "fingerprint",
    "load_idx_arrays",
    "locate_fashion_mnist",
    "read_idx_dataset",
    "warn_unofficial",
]

log = logging.getLogger(__name__)

FASHION_MNIST = "fashion_mnist"
# The official label order (the README's label table).
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Where Debian's (and Ubuntu's) `apt-get install dataset-fashion-mnist` puts the four .gz files. Searched after
# the data dir; a module constant so tests can point it elsewhere.
FASHION_MNIST_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
# Sub-folders of a data dir that may hold the files (besides the data dir itself).
_SUBDIRS = ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "fashion")

# role -> file name without .gz
IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True)
class _Official:
    gz: str  # published in zalandoresearch/fashion-mnist's README
    raw: str  # of the uncompressed file; computed from Debian's copy and matching other published lists
    debian_gz: str  # dataset-fashion-mnist 0.0~git20200523.55506a9-1 (recompressed, same content)


_FASHION_MD5: dict[str, _Official] = {
    "train_images": _Official(
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a", "cf8536b0aa1a6ac5fa3f23001093305c"
    ),
    "train_labels": _Official(
        "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9", "10bea18fdb374794d4bb42e356e600c9"
    ),
    "test_images": _Official(
        "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a", "f78720b4224f21cce2f2ccf2d7a94c9a"
    ),
    "test_labels": _Official(
        "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965", "0d30e22e447f3c33dab9ed536400ac01"
    ),
}
# The dataset's checksum: the MD5 of the four content MD5s in IDX_FILES order, the same for .gz and raw copies.
FASHION_MNIST_MD5 = hashlib.md5("".join(_FASHION_MD5[r].raw for r in IDX_FILES).encode()).hexdigest()

# type code -> (numpy dtype, big-endian), per the IDX format
_IDX_TYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
IDX_ADVICE = "Put a good copy there."
# Only for Fashion-MNIST: Debian's package holds no other MNIST-format data.
FASHION_ADVICE = "Put a good copy there (on Debian: apt-get install --reinstall dataset-fashion-mnist)."


def parse_idx(raw: bytes, where: str, expect_ndim: int | None = None, advice: str = IDX_ADVICE) -> np.ndarray:
    """The array an IDX file's bytes hold; every way they can be wrong is a `DataError` naming `where`.
    `expect_ndim`: a uint8 file of that many dimensions is expected (MNIST's images 3, labels 1): a header that
    says otherwise is named as such, before its dimensions are read as sizes. `advice`: what to do, ending each
    error."""
    if len(raw) < 4:
        raise DataError(f"{where}: {len(raw)} bytes is too short for an IDX file (4-byte header). {advice}")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(
            f"{where}: bad magic number 0x{raw[:4].hex()}: not an IDX file (expected 0x0000 then a type code "
            f"{', '.join(f'0x{t:02x}' for t in _IDX_TYPES)} and the number of dimensions). {advice}"
        )
    ndim = raw[3]
    if ndim == 0:
        raise DataError(f"{where}: the IDX header declares 0 dimensions. {advice}")
    if expect_ndim is not None and (ndim != expect_ndim or raw[2] != 0x08):
        kind = np.dtype(_IDX_TYPES[raw[2]]).name
        raise DataError(
            f"{where}: the IDX header declares {ndim} dimension{'s' * (ndim != 1)} of {kind}; this file should "
            f"hold uint8 values in {expect_ndim} dimension{'s' * (expect_ndim != 1)} (idx{expect_ndim}-ubyte): it "
            f"is damaged or another kind of IDX file. {advice}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{where}: truncated in its header ({len(raw)} of {header} bytes). {advice}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    want = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != want:
        what = "truncated" if len(raw) < want else "longer than its header says"
        raise DataError(
            f"{where}: {what}: the header declares {' x '.join(map(str, dims))} values ({want:,} bytes with "
            f"the header), the file holds {len(raw):,}. {advice}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _read_bytes(path: Path, advice: str = IDX_ADVICE) -> bytes:
    """The file's content, gunzipped when it is gzip (by its magic bytes, whatever its name)."""
    try:
        require_regular(path, "IDX file")
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)  # checks the gzip CRC and length: a damaged file raises here
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: damaged gzip file ({type(exc).__name__}: {exc}). {advice}") from exc


def read_idx(path: Path | str, expect_ndim: int | None = None, advice: str = IDX_ADVICE) -> np.ndarray:
    """An IDX file (``.gz`` or not) as a numpy array, validated (magic number, dimensions, size)."""
    path = Path(path)
    return parse_idx(_read_bytes(path, advice), str(path), expect_ndim, advice)


@dataclass(frozen=True)
class IdxFiles:
    """The four files of an MNIST-format dataset found in one folder."""

    folder: Path
    paths: dict[str, Path]  # role (IDX_FILES keys) -> path


def _candidates(data_dir: Path, extra: Sequence[Path]) -> list[Path]:
    return [data_dir, *(data_dir / s for s in _SUBDIRS), *extra]


def _present(folder: Path) -> dict[str, Path]:
    """{role: path} of the IDX files in `folder` (each raw or ``.gz``; raw first, as it reads faster)."""
    paths: dict[str, Path] = {}
    try:
        for role, stem in IDX_FILES.items():
            for name in (stem, f"{stem}.gz"):
                p = folder / name
                if p.exists() or p.is_symlink():
                    paths[role] = p
                    break
    except OSError as exc:  # EACCES on the folder: say so, not that one of its files is unreadable
        raise unreadable_folder(folder, exc) from exc
    return paths


def find_idx_files(folder: Path) -> IdxFiles | None:
    """The four files in `folder` (each raw or ``.gz``; raw first, as it reads faster), or None if any is missing.
    A file present both raw and as ``.gz`` must hold the same content in both (`_check_one_content`)."""
    paths = _present(folder)
    if len(paths) != len(IDX_FILES):
        return None
    for path in paths.values():
        twin = path.with_name(f"{path.name}.gz")
        if path.suffix != ".gz" and (twin.exists() or twin.is_symlink()):
            _check_one_content(path, twin)
    return IdxFiles(folder, paths)


_CHUNK = 1 << 20


def _open_content(path: Path) -> BinaryIO:
    """The file's content as a stream: gunzipped when it is gzip (by its magic bytes, as `_read_bytes` reads it)."""
    require_regular(path, "IDX file")
    with open(path, "rb") as f:
        zipped = f.read(2) == _GZIP_MAGIC
    return gzip.open(path, "rb") if zipped else open(path, "rb")  # type: ignore[return-value]


def _first_difference(raw: Path, gz: Path) -> str | None:
    """Why the two files' contents differ, or None when they are the same. Streams both (one decompression, 1 MiB
    at a time, stopping at the first difference), so nothing is held whole."""
    with _open_content(raw) as a, _open_content(gz) as b:
        at = 0
        while True:
            # Buffered reads return whole chunks until the end: equal contents give equal chunks.
            x, y = _chunk(a, raw), _chunk(b, gz)
            if isinstance(x, str) or isinstance(y, str):
                return x if isinstance(x, str) else str(y)
            if x != y:
                if x.startswith(y) or y.startswith(x):
                    return f"{raw.name if len(x) > len(y) else gz.name} holds more bytes than the other"
                i = next(i for i, (u, v) in enumerate(zip(x, y, strict=False)) if u != v)
                return f"they differ from byte {at + i:,} on"
            if not x:
                return None
            at += len(x)


def _chunk(stream: BinaryIO, path: Path) -> bytes | str:
    """The next chunk of `stream`, or why it cannot be read (a damaged gzip file)."""
    try:
        return stream.read(_CHUNK)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:  # its CRC and length are checked at its end
        return f"{path.name} is a damaged gzip file ({type(exc).__name__}: {exc})"


def _check_one_content(raw: Path, gz: Path) -> None:
    """A `DataError` naming both files when `raw` and `gz` (the same IDX file, raw and gzipped) hold different
    contents: which one is meant cannot be guessed, and silently reading the raw one would train on what the user
    may have replaced. The same content is fine (either is read)."""
    try:
        why = _first_difference(raw, gz)
    except OSError as exc:
        raise DataError(f"cannot read {exc.filename or raw}: {exc.strerror or exc}") from exc
    if why is not None:
        raise DataError(
            f"{raw.parent} holds both {raw.name} and {gz.name}, and their contents differ ({why}): remove the one "
            f"that is not the copy you mean to use ({raw} or {gz}), then load again."
        )


def check_complete(folder: Path, what: str = "MNIST-format IDX") -> None:
    """An error naming the missing files when `folder` holds some but not all four: a user who named a folder
    meant that one, and silently loading another copy (or none) would hide that."""
    paths = _present(folder)
    if 0 < len(paths) < len(IDX_FILES):
        missing = ", ".join(f"{stem}[.gz]" for role, stem in IDX_FILES.items() if role not in paths)
        raise DataError(
            f"{folder} has {len(paths)} of the 4 {what} files (missing {missing}): put the missing "
            f"{'ones' if len(paths) < 3 else 'one'} there, or pass a folder that holds all four."
        )


def locate_fashion_mnist(data_dir: Path) -> IdxFiles:
    """The Fashion-MNIST files: in `data_dir` (or a fashion-mnist/ folder in it), else where Debian puts them."""
    looked = _candidates(data_dir, FASHION_MNIST_DIRS)
    for folder in looked:
        if folder.is_dir():
            check_complete(folder, "Fashion-MNIST")
        found = find_idx_files(folder) if folder.is_dir() else None
        if found is not None:
            return found
    names = ", ".join(f"{s}[.gz]" for s in IDX_FILES.values())
    raise DataError(
        f"fashion_mnist not found: looked in {', '.join(str(p) for p in looked)}. Install the Debian/Ubuntu package "
        f"(apt-get install dataset-fashion-mnist, which puts the files in {FASHION_MNIST_DIRS[0]}), or put the four "
        f"official files ({names}; https://github.com/zalandoresearch/fashion-mnist) in {data_dir} and pass "
        "--data-dir (or set $CIFARLAB_DATA)."
    )


def _content_md5(role: str, path: Path, advice: str = IDX_ADVICE) -> tuple[str, bytes | None]:
    """(MD5 of the uncompressed content, the content when it had to be read to know). Known official files are
    recognised by their file MD5 alone, so the usual load reads nothing twice."""
    md5 = file_md5(path)
    spec = _FASHION_MD5[role]
    if md5 in (spec.gz, spec.debian_gz, spec.raw):
        return spec.raw, None
    raw = _read_bytes(path, advice)
    return hashlib.md5(raw).hexdigest(), raw


def fingerprint(files: IdxFiles, advice: str = IDX_ADVICE) -> tuple[str, dict[str, str], dict[str, bytes]]:
    """(the dataset checksum, {role: content MD5}, {role: content that had to be read to know it})."""
    content: dict[str, str] = {}
    read: dict[str, bytes] = {}
    for role, path in files.paths.items():
        content[role], raw = _content_md5(role, path, advice)
        if raw is not None:
            read[role] = raw
    checksum = hashlib.md5("".join(content[r] for r in IDX_FILES).encode()).hexdigest()
    return checksum, content, read


def read_idx_dataset(
    files: IdxFiles, preread: dict[str, bytes] | None = None, advice: str = IDX_ADVICE
) -> dict[str, Any]:
    """The arrays of the four files: uint8 ``(N, 1, H, W)`` images, int64 labels, checked against each other."""
    preread = preread or {}
    arrays: dict[str, np.ndarray] = {}
    for role, path in files.paths.items():
        raw = preread.get(role)
        ndim = 3 if role.endswith("images") else 1
        arrays[role] = parse_idx(raw, str(path), ndim, advice) if raw is not None else read_idx(path, ndim, advice)
    out: dict[str, Any] = {}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        xp, yp = files.paths[f"{split}_images"], files.paths[f"{split}_labels"]
        if x.ndim != 3 or x.dtype != np.uint8:
            raise DataError(f"{xp}: images must be uint8 N x H x W (idx3-ubyte), got {x.dtype} {x.shape}. {advice}")
        if y.ndim != 1 or y.dtype != np.uint8:
            raise DataError(f"{yp}: labels must be uint8 N (idx1-ubyte), got {y.dtype} {y.shape}. {advice}")
        if len(x) != len(y):
            raise DataError(f"{xp} holds {len(x):,} images but {yp} holds {len(y):,} labels. {advice}")
        if len(x) == 0:
            raise DataError(f"{xp} holds no images. {advice}")
        out[f"x_{split}"] = np.ascontiguousarray(x[:, None])  # one grey channel: (N, 1, H, W)
        out[f"y_{split}"] = y.astype(np.int64)
    if out["x_train"].shape[1:] != out["x_test"].shape[1:]:
        raise DataError(
            f"{files.folder}: train images are {out['x_train'].shape[2:]}, test images {out['x_test'].shape[2:]}. "
            f"{advice}"
        )
    return out


def warn_unofficial(files: IdxFiles, content: dict[str, str]) -> None:
    """One warning naming the files whose content is not the official Fashion-MNIST file's."""
    bad = [f"{files.paths[r].name} (content MD5 {content[r]})" for r in IDX_FILES if content[r] != _FASHION_MD5[r].raw]
    if bad:
        log.warning(
            "%s: %s %s not the official Fashion-MNIST file%s; loading anyway (put the official files there to "
            "train on the real dataset)",
            files.folder,
            ", ".join(bad),
            "are" if len(bad) > 1 else "is",
            "s" if len(bad) > 1 else "",
        )


def load_idx_arrays(files: IdxFiles, fashion: bool = True, preread: dict[str, bytes] | None = None) -> dict[str, Any]:
    """The four files' arrays with class names: Fashion-MNIST's when `fashion`, else "0".."K-1".

    `preread`: contents already read by `fingerprint` (not read twice)."""
    advice = FASHION_ADVICE if fashion else IDX_ADVICE
    arrays = read_idx_dataset(files, preread, advice)
    top = max(int(arrays["y_train"].max()), int(arrays["y_test"].max()))
    if fashion:
        if top >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{files.folder}: label {top} is outside Fashion-MNIST's 0..9. {advice}")
        arrays["classes"] = FASHION_MNIST_CLASSES
    else:
        arrays["classes"] = tuple(str(i) for i in range(top + 1))
    return arrays
