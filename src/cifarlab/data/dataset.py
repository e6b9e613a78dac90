"""The in-memory `Dataset` and `load_dataset`, which finds a named or given dataset and dispatches to the
official-archive, extracted-batches or ImageFolder loader.

Where ``load_dataset("cifar10", data_dir)`` looks, in order: ``cifar-10-batches-py/`` (extracted official
batches), ``cifar-10-python.tar.gz`` (official archive), ``cifar10-jpeg.tar.gz`` / ``cifar10-jpeg/`` (JPEG
ImageFolder copy), else it downloads the official archive (when ``download=True``) into `data_dir`
(default ``$CIFARLAB_DATA``, else ``~/.cache/cifarlab``); a `data_dir` that is itself a dataset (an image-folder
tree, IDX files) is refused instead, as the user meant to load that. Only that default location is created when missing:
a data folder named by --data-dir or $CIFARLAB_DATA must exist, so a mistyped one is an error instead of a new
folder that CIFAR-10 gets downloaded into.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifarlab.data.archives import TAR_SUFFIXES, require_regular
from cifarlab.data.cache import cache_source, cached, resolve_cache_dir, writable_dir
from cifarlab.data.idx import (
    FASHION_ADVICE,
    FASHION_MNIST,
    FASHION_MNIST_MD5,
    IDX_ADVICE,
    IDX_FILES,
    IdxFiles,
    check_complete,
    find_idx_files,
    load_idx_arrays,
    locate_fashion_mnist,
    warn_unofficial,
)
from cifarlab.data.idx import fingerprint as idx_fingerprint
from cifarlab.data.imagefolder import DEFAULT_IMAGE_SIZE, check_classes, check_image_size, load_imagefolder
from cifarlab.data.official import (
    CIFAR10_CLASSES,
    CIFAR_IMAGE_SIZE,
    OFFICIAL,
    OfficialArchive,
    check_md5,
    decode_official_tar,
    download_url,
    read_official_folder,
)
from cifarlab.errors import ConfigError, DataError

__all__ = ["NAMED_DATASETS", "Dataset", "arrays_md5", "canonical_dataset_name", "default_data_dir", "load_dataset"]

# Official archives: bump when their decoded layout changes (old cache files are then ignored).
_OFFICIAL_CACHE_VERSION = 1
_IDX_CACHE_VERSION = 1
# The datasets known by name (`--set dataset=NAME`), as runs record them.
NAMED_DATASETS: tuple[str, ...] = (*OFFICIAL, FASHION_MNIST)


@dataclass(frozen=True, eq=False)
class Dataset:
    """A whole dataset in memory: uint8 images ``(N, C, H, W)`` (any C, H, W; the same for train and test)
    and int64 labels ``(N,)``, plus where it came from."""

    name: str
    classes: tuple[str, ...]
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str
    checksum: str  # see checksum_kind
    cache_dir: str  # the cache folder it was read from or written to; "" when not cached
    # "md5 of archive", "md5 of arrays" (data in memory, extracted official batches), "md5 of image files (paths
    # and contents)", "md5 of IDX contents", or ""
    checksum_kind: str = ""
    expected_checksum: str = ""  # the official MD5 for this kind of source; "" when there is none
    # An image folder's images by their own size before resizing, {"WxH": count}; None for other sources.
    native_sizes: dict[str, int] | None = None

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.ndim != 4:
                raise ValueError(f"x_{split} must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.dtype != torch.int64 or y.ndim != 1 or len(y) != len(x):
                raise ValueError(f"y_{split} must be int64 ({len(x)},), got {y.dtype} {tuple(y.shape)}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"train and test images differ in shape: {tuple(self.x_train.shape[1:])} vs "
                f"{tuple(self.x_test.shape[1:])}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        c, h, w = self.x_train.shape[1:]
        return int(c), int(h), int(w)

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


def _home_data_dir() -> Path:
    return Path.home() / ".cache" / "cifarlab"


def default_data_dir() -> Path:
    """``$CIFARLAB_DATA``, else ``~/.cache/cifarlab`` (where official archives are looked for and downloaded)."""
    env = os.environ.get("CIFARLAB_DATA")
    return Path(env).expanduser() if env else _home_data_dir()


def _named_by(data_dir: Path | str | None) -> str:
    """What named the data folder, for messages: the CLI passes $CIFARLAB_DATA on as its --data-dir."""
    env = os.environ.get("CIFARLAB_DATA")
    if data_dir is None:
        return "$CIFARLAB_DATA" if env else "default"
    if env and Path(data_dir).expanduser() == Path(env).expanduser():
        return "--data-dir or $CIFARLAB_DATA"
    return "--data-dir"


def _check_download_dir(spec: OfficialArchive, data_dir: Path, named_by: str) -> None:
    """The folder a download goes into must be a folder that exists, unless it is the default
    ~/.cache/cifarlab (created then): a mistyped --data-dir must not become a new folder holding a download."""
    if data_dir.is_dir():
        return
    if data_dir.exists() or data_dir.is_symlink():
        what = "a file" if data_dir.is_file() else "a broken link" if not data_dir.exists() else "a special file"
        raise DataError(
            f"the data folder {data_dir} ({named_by}) is {what}, not a folder: pass the folder that holds "
            f"{spec.filename}, or an existing folder to download it into"
        )
    if data_dir.resolve() == _home_data_dir().resolve():  # resolved: a run stores its data folder resolved
        return
    raise DataError(
        f"no such folder: {data_dir} ({named_by}); create it first to download {spec.name} into it, or pass the "
        f"folder that holds {spec.filename}"
    )


def to_dataset(arrays: dict[str, Any], **fields: Any) -> Dataset:
    """A `Dataset` from arrays (numpy or torch) and the remaining `Dataset` fields."""

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


def _load_official_archive(spec: OfficialArchive, archive: Path, cache_dir: Path | str | None) -> Dataset:
    source = cache_source(spec.name, archive, f"v{_OFFICIAL_CACHE_VERSION}")  # before the archive is read
    md5 = check_md5(spec, archive)
    cache_file = resolve_cache_dir(cache_dir) / f"{spec.name}-{md5}-v{_OFFICIAL_CACHE_VERSION}.safetensors"
    arrays, used_dir = cached(cache_file, lambda: decode_official_tar(spec, archive), source)
    return to_dataset(
        arrays,
        name=spec.name,
        source=str(archive),
        checksum=md5,
        checksum_kind="md5 of archive",
        expected_checksum=spec.md5,
        cache_dir=used_dir,
    )


def arrays_md5(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray) -> str:
    """MD5 of the four arrays' shapes and bytes (uint8 images, int64 labels)."""
    h = hashlib.md5()
    for a in (x_train, y_train, x_test, y_test):
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def _load_official_folder(spec: OfficialArchive, folder: Path) -> Dataset:
    arrays = read_official_folder(spec, folder)  # plain pickles load in well under a second: no cache needed
    # No archive to take the MD5 of: hash what is trained and tested on, so a resumed run notices edited batches.
    checksum = arrays_md5(*(arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")))
    kind = "md5 of arrays"
    # cache_dir "": nothing is cached (the source folder is not a cache, and caches are never beside the data).
    return to_dataset(arrays, name=spec.name, source=str(folder), checksum=checksum, checksum_kind=kind, cache_dir="")


def _load_imagefolder(
    path: Path,
    cache_dir: Path | str | None,
    name: str | None = None,
    image_size: int | None = DEFAULT_IMAGE_SIZE,
    test_only: bool = False,
) -> Dataset:
    arrays, fields = load_imagefolder(path, cache_dir, name, image_size, test_only)
    return to_dataset(arrays, **fields)


def _check_official_size(spec: OfficialArchive, image_size: int | None) -> None:
    if image_size not in (None, CIFAR_IMAGE_SIZE):
        raise ConfigError(
            f"image_size={image_size}: the official {spec.name} images are {CIFAR_IMAGE_SIZE}x{CIFAR_IMAGE_SIZE}; "
            f"use image_size={CIFAR_IMAGE_SIZE} or None (only ImageFolder sources are resized)"
        )


def _load_official(
    spec: OfficialArchive,
    data_dir: Path,
    download: bool,
    cache_dir: Path | str | None,
    opener: Callable[[str], Any] | None,
    image_size: int | None = DEFAULT_IMAGE_SIZE,
    named_by: str = "--data-dir",
) -> Dataset:
    folder = data_dir / spec.folder
    if folder.is_dir():
        _check_official_size(spec, image_size)
        return _load_official_folder(spec, folder)
    archive = data_dir / spec.filename
    if archive.exists() or archive.is_symlink():
        _check_official_size(spec, image_size)
        return _load_official_archive(spec, require_regular(archive, "archive"), cache_dir)
    for jpeg_name in spec.jpeg_names:
        path = data_dir / jpeg_name
        if path.exists():
            if not path.is_dir():
                require_regular(path, "archive")
            ds = _load_imagefolder(path, cache_dir, name=spec.name, image_size=image_size)
            if spec.name == "cifar10" and ds.classes != CIFAR10_CLASSES:
                raise DataError(
                    f"{path} does not look like CIFAR-10: its class folders are {list(ds.classes)}, expected "
                    f"{list(CIFAR10_CLASSES)}. Put a good copy there, or load it as a path instead of "
                    "'cifar10'."
                )
            return ds
    _refuse_dataset_as_data_dir(spec, data_dir, named_by)
    where = f"put {spec.filename} ({spec.url}) or its extracted {spec.folder}/ folder"
    if spec.jpeg_names:
        where += f" or {spec.jpeg_names[0]}"
    if not download:
        state = "is empty of it" if data_dir.is_dir() else "is not a folder" if data_dir.exists() else "does not exist"
        raise DataError(
            f"{spec.name} not found: {data_dir} {state}. {where[0].upper()}{where[1:]} in {data_dir}, pass "
            "--data-dir (or set $CIFARLAB_DATA) to where it is, or allow downloading (no --no-download)."
        )
    _check_download_dir(spec, data_dir, named_by)
    if not writable_dir(data_dir):
        raise DataError(
            f"{spec.name} not found in {data_dir}, and that folder is not writable, so it cannot be "
            f"downloaded there: {where} in it, or pass a writable --data-dir (data_dir= in Python) or set "
            "$CIFARLAB_DATA."
        )
    _check_official_size(spec, image_size)
    try:
        download_url(spec.url, archive, spec.md5, opener=opener)
    except DataError as exc:
        raise DataError(f"{exc} (Without network: {where} in {data_dir}.)") from exc
    return _load_official_archive(spec, archive, cache_dir)


def _refuse_dataset_as_data_dir(spec: OfficialArchive, data_dir: Path, named_by: str) -> None:
    """An error when the data folder is itself a dataset (an image-folder tree, or IDX files) without `spec`'s
    files: the user meant to train on it, and downloading CIFAR into it would train on something else."""
    try:
        if not data_dir.is_dir():
            return
        if find_idx_files(data_dir) is not None:
            what, fashion = "MNIST-format IDX files", " (Fashion-MNIST's by its name: dataset=fashion_mnist)"
        elif (data_dir / "train").is_dir() and any((data_dir / s).is_dir() for s in ("test", "val")):
            what, fashion = "an image-folder tree (train/ and test/ class folders)", ""
        else:
            return
    except OSError:
        return  # an unreadable folder: the usual messages say what is wrong with it
    raise DataError(
        f"{data_dir} ({named_by}) holds {what}, not {spec.name}: the data folder is where named datasets are looked "
        f"for. To load this folder, pass it as the dataset: --set dataset={data_dir} (train), --dataset {data_dir} "
        f"(data commands){fashion}."
    )


def _canonical(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


def canonical_dataset_name(name: str) -> str | None:
    """The recorded name of a dataset known by name under any spelling (CIFAR-10, Fashion-MNIST), else None."""
    by_key = {_canonical(n): n for n in NAMED_DATASETS}
    return by_key.get(_canonical(name))


def _load_idx(files: IdxFiles, cache_dir: Path | str | None, image_size: int | None, fashion: bool) -> Dataset:
    """`fashion`: loaded by the name fashion_mnist (its class names, a warning when a file is not official); a
    folder given by path is Fashion-MNIST only when its files are the official ones."""
    read_at = time.time()  # before the files are read (see `CacheSource`)
    checksum, content, preread = idx_fingerprint(files, FASHION_ADVICE if fashion else IDX_ADVICE)
    fashion = fashion or checksum == FASHION_MNIST_MD5
    if fashion:
        warn_unofficial(files, content)
    name = FASHION_MNIST if fashion else files.folder.name
    cache_file = resolve_cache_dir(cache_dir) / f"idx-{checksum}-{int(fashion)}-v{_IDX_CACHE_VERSION}.safetensors"
    advice = FASHION_ADVICE if fashion else IDX_ADVICE
    # A label the training set never shows (one changed byte) would add classes never learned: refuse it, as
    # for image folders, before anything is cached.
    fix = (
        f"each label 0..K-1 must occur in {IDX_FILES['train_labels']}: a label no training image has is usually a "
        f"damaged byte; {advice[0].lower()}{advice[1:].rstrip('.')}"
    )

    def build() -> dict[str, Any]:
        arrays = load_idx_arrays(files, fashion, preread)
        check_classes(arrays, str(files.folder), folder=False, fix=fix)
        return arrays

    source = cache_source("idx", files.folder, f"{int(fashion)}-v{_IDX_CACHE_VERSION}", read_at)
    arrays, used_dir = cached(cache_file, build, source)
    check_classes(arrays, str(files.folder), folder=False, fix=fix)  # again: a cache written before this rule
    _, _, h, w = torch.as_tensor(arrays["x_train"]).shape
    if image_size not in (None, DEFAULT_IMAGE_SIZE) and (image_size != h or h != w):
        # IDX images keep their native size; the default image_size is ImageFolder's and does not apply here.
        raise ConfigError(f"image_size={image_size}: {name} images are {h}x{w} and are not resized; pass None")
    return to_dataset(
        arrays,
        name=name,
        source=str(files.folder),
        checksum=checksum,
        checksum_kind="md5 of IDX contents",
        expected_checksum=FASHION_MNIST_MD5 if fashion else "",
        cache_dir=used_dir,
    )


def _load_path(path: Path, cache_dir: Path | str | None, image_size: int | None, test_only: bool = False) -> Dataset:
    if path.is_dir():
        check_complete(path)  # 1-3 of the four IDX files: name the missing ones, not the image-folder layout
        idx_files = find_idx_files(path)
        if idx_files is not None:  # an MNIST-format folder (Fashion-MNIST's four IDX files, say)
            return _load_idx(idx_files, cache_dir, image_size, fashion=False)
    for spec in OFFICIAL.values():
        if path.name == spec.folder and path.is_dir():
            _check_official_size(spec, image_size)
            return _load_official_folder(spec, path)
        if path.name == spec.filename and not path.is_dir():
            _check_official_size(spec, image_size)
            return _load_official_archive(spec, require_regular(path, "archive"), cache_dir)
    if path.is_dir():
        for spec in OFFICIAL.values():  # a data dir passed as the dataset: use what it holds
            if (path / spec.folder).is_dir() or (path / spec.filename).exists():
                return _load_official(spec, path, False, cache_dir, None, image_size)
        return _load_imagefolder(path, cache_dir, image_size=image_size, test_only=test_only)
    require_regular(path, "dataset file")
    if not path.name.endswith(TAR_SUFFIXES):
        raise DataError(
            f"{path} is neither a folder nor a tarball (.tar.gz, .tgz, .tar): pass an ImageFolder tree "
            "(root/train/<class>/*.png, root/test/<class>/*.png) or a tarball of one."
        )
    return _load_imagefolder(path, cache_dir, image_size=image_size, test_only=test_only)


def data_dir_candidates(path: Path, data_dir: Path) -> list[Path]:
    """Where a relative dataset path is looked for in the data folder: as given, or with a tarball suffix."""
    return [data_dir / path, *(data_dir / f"{path}{s}" for s in TAR_SUFFIXES)]


def load_dataset(
    name: str | os.PathLike[str] = "cifar10",
    data_dir: Path | str | None = None,
    download: bool = True,
    *,
    cache_dir: Path | str | None = None,
    opener: Callable[[str], Any] | None = None,
    image_size: int | None = DEFAULT_IMAGE_SIZE,
    test_only: bool = False,
) -> Dataset:
    """Load a dataset as uint8 tensors.

    `name` is "cifar10", "cifar100" (looked up in `data_dir`, default `default_data_dir()`, downloaded when
    missing and `download`), "fashion_mnist" (its four IDX files, ``.gz`` or not, in `data_dir`, else in
    Debian's ``/usr/share/datasets/fashion-mnist``; 1x28x28 grey images), or a path: a folder of MNIST-format
    IDX files, an ImageFolder tree (``root/{train,test}/<class>/*.png|jpg|...``), a
    tarball of one, or an official archive / extracted batch folder. A relative path that does not exist is
    also tried inside `data_dir`. `image_size` applies to ImageFolder sources: resize every image to that
    square size (default 32), or None to keep their native size (it must be the same for all); official
    archives are 32x32 and accept only 32 or None. Decoded arrays are cached (see `cifarlab.data.cache`);
    `cache_dir` overrides where. Bad input raises `cifarlab.errors.DataError` with what to do.

    An ImageFolder dataset needs at least two classes, each with train/ images. `test_only` (a test set to
    evaluate on): only an ImageFolder tree's test/ (else val/) split is read, train/ may be missing, any
    classes are accepted, and the train split is empty; other sources load whole.

    `data_dir` (or $CIFARLAB_DATA) must be an existing folder for a download into it; only the default
    ~/.cache/cifarlab is created.
    """
    image_size = check_image_size(image_size)
    data_path = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    key = _canonical(os.fspath(name))
    if key in OFFICIAL and not isinstance(name, Path):
        spec = OFFICIAL[key]
        return _load_official(spec, data_path, download, cache_dir, opener, image_size, _named_by(data_dir))
    if key == _canonical(FASHION_MNIST) and not isinstance(name, Path):
        return _load_idx(locate_fashion_mnist(data_path), cache_dir, image_size, fashion=True)
    path = Path(name).expanduser()
    if not path.exists() and not path.is_absolute():
        path = next((c for c in data_dir_candidates(path, data_path) if c.exists()), path)
    if path.exists() or path.is_symlink():
        return _load_path(path, cache_dir, image_size, test_only)
    missing = "" if data_path.is_dir() else " (which is not a folder)"
    raise DataError(
        f"unknown dataset {os.fspath(name)!r}: use cifar10, cifar100, fashion_mnist, or the path of an ImageFolder "
        f"tree (folder or .tar.gz) or IDX folder; no such file or folder here or in {data_path}{missing}."
    )
