"""A `Dataset` from data already in memory: numpy arrays / torch tensors (`from_arrays`) or any map-style torch
dataset of (image, label) pairs (`from_torch_dataset`).

Images become uint8 ``(N, C, H, W)`` (any C, H, W): uint8 is kept, floats in [0, 1] are scaled to 0..255.
The checksum is the MD5 of the arrays (shapes and bytes), so a run records exactly what it trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from cifarlab.data.dataset import Dataset, arrays_md5, to_dataset
from cifarlab.data.imagefolder import check_classes
from cifarlab.data.images import UnsupportedImageError, pil_to_array
from cifarlab.data.loader import split_indices
from cifarlab.errors import DataError

__all__ = ["arrays_md5", "as_images", "from_arrays", "from_torch_dataset"]

_CHANNELS = (1, 3, 4)


def _numpy(a: Any, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        t = a.detach().cpu()
        # numpy has no bfloat16 (nor float8): such floats widen to float32, which holds every value exactly
        return (
            t.float() if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64) else t
        ).numpy()
    try:
        return np.asarray(a)
    except Exception as exc:  # noqa: BLE001 (anything that is not array-like)
        raise DataError(f"{what} must be a numpy array or torch tensor, got {type(a).__name__}") from exc


def _images(a: Any, what: str) -> np.ndarray:
    """uint8 (N, C, H, W) from NCHW, NHWC or (N, H, W); uint8, integers in 0..255 or floats in [0, 1]."""
    x = _numpy(a, what)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[-1] in _CHANNELS and x.shape[1] not in _CHANNELS:  # NHWC
            x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{what} must be images (N, C, H, W), (N, H, W, C) or grayscale (N, H, W), got shape {x.shape}")
    return np.ascontiguousarray(_to_uint8(x, what))


def as_images(x: Any, what: str = "images") -> torch.Tensor:
    """Images in any layout `from_arrays` accepts as a uint8 ``(N, C, H, W)`` tensor, with the same checks
    (for prediction, where there are no labels and no test set)."""
    a = _images(x, what)
    # A read-only array (a PIL image's buffer, a memory map) would make torch warn: copy it, as torch would need to.
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def _to_uint8(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype == np.uint8:
        return x
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{what} must be uint8 (0..255) or float (0..1) pixels, got dtype {x.dtype}")
    if x.size == 0:
        return x.astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer):
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{what}: integer pixels must be in 0..255, got values from {lo} to {hi}")
        return x.astype(np.uint8)
    if np.isnan(x).any():
        raise DataError(f"{what} contains NaN pixels")
    lo_f, hi_f = float(x.min()), float(x.max())
    if lo_f < 0.0 or hi_f > 1.0:
        raise DataError(
            f"{what}: float pixels must be in [0, 1], got values from {lo_f:g} to {hi_f:g} (pass uint8 0..255 "
            "as uint8, or divide by 255)"
        )
    return np.rint(x.astype(np.float64) * 255.0).astype(np.uint8)


MAX_LABEL = 1_000_000  # class indices beyond this are a mistake (or a label column of other numbers)


def _few(values: np.ndarray, n: int = 6) -> str:
    shown = ", ".join(str(int(v)) for v in values[:n])
    return shown + (f", ... {int(values[-1])}" if len(values) > n else "")


def _labels(a: Any, n: int, what: str) -> np.ndarray:
    y = _numpy(a, what)
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{what} must hold one label per image: expected shape ({n},), got {y.shape}")
    if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{what} must be integer class indices 0..K-1, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if len(bad):
            raise DataError(f"{what} must be integer class indices 0..K-1, but item {bad[0]} is {y[bad[0]].item()!r}")
    if len(y) and np.issubdtype(y.dtype, np.number) and y.max() > MAX_LABEL:
        i = int(np.argmax(y))
        raise DataError(f"{what} must be class indices 0..K-1, but item {i} is {y[i].item()!r}: far beyond any class")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        raise DataError(f"{what}: labels must be >= 0, but item {int(np.argmin(y))} is {int(y.min())}")
    return y


def from_arrays(
    x_train: Any,
    y_train: Any,
    x_test: Any = None,
    y_test: Any = None,
    *,
    classes: Sequence[str] | None = None,
    name: str = "arrays",
    test_fraction: float | None = None,
    seed: int = 0,
) -> Dataset:
    """A `Dataset` from images and labels in memory (numpy arrays or torch tensors).

    Images: ``(N, C, H, W)``, ``(N, H, W, C)`` or grayscale ``(N, H, W)``; channels-last is assumed when the
    last dimension is 1, 3 or 4 and the second is not. Pixels: uint8 0..255 (kept), other integers in
    0..255, or floats in [0, 1] (scaled by 255 and rounded). Labels: integers 0..K-1, one per image, where
    K is ``len(classes)``; `classes` defaults to ``["0", "1", ..., "K-1"]`` with K = the largest label + 1.

    A test set is required: pass `x_test` and `y_test`, or `test_fraction` to split that fraction of the
    training images off as the test set (stratified by label, seeded by `seed`: the same call gives the same
    split, see `split_indices`). Errors raise `cifarlab.errors.DataError`.
    """
    x_tr = _images(x_train, "x_train")
    y_tr = _labels(y_train, len(x_tr), "y_train")
    if (x_test is None) != (y_test is None):
        raise DataError("give both x_test and y_test, or neither (then pass test_fraction to split one off)")
    test = None
    if x_test is not None:
        x_te = _images(x_test, "x_test")
        test = (x_te, _labels(y_test, len(x_te), "y_test"))
    return _from_uint8(x_tr, y_tr, test, classes, name, test_fraction, seed)


def _from_uint8(
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    test: tuple[np.ndarray, np.ndarray] | None,
    classes: Sequence[str] | None,
    name: str,
    test_fraction: float | None,
    seed: int,
) -> Dataset:
    """The checks and test split shared by `from_arrays` and `from_torch_dataset` (images already NCHW uint8)."""
    if test is None:
        if test_fraction is None:
            raise DataError(
                "a test set is needed: pass x_test and y_test, or test_fraction=0.1 (for example) to split "
                "that fraction of the training images off as the test set"
            )
        if not 0.0 < test_fraction < 1.0:
            raise DataError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
        keep, held = split_indices(len(x_tr), test_fraction, seed, labels=torch.from_numpy(y_tr))
        if len(held) == 0 or len(keep) == 0:
            raise DataError(f"test_fraction={test_fraction} of {len(x_tr)} images leaves an empty train or test set")
        x_te, y_te = x_tr[held.numpy()], y_tr[held.numpy()]
        x_tr, y_tr = x_tr[keep.numpy()], y_tr[keep.numpy()]
    else:
        if test_fraction is not None:
            raise DataError("pass either a test set (x_test, y_test) or test_fraction, not both")
        x_te, y_te = test
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise DataError(f"train and test images differ in shape (C, H, W): {x_tr.shape[1:]} vs {x_te.shape[1:]}")
    if len(x_tr) == 0:
        raise DataError("x_train holds no images")
    if len(x_te) == 0:
        raise DataError("the test set holds no images: pass x_test and y_test with images, or test_fraction=0.1")
    top = int(max(y_tr.max(initial=-1), y_te.max(initial=-1)))
    if classes is None:
        used = np.union1d(np.unique(y_tr), np.unique(y_te))
        if top + 1 > 2 * len(used) + 100:  # a stray label: do not name a million empty classes
            raise DataError(
                f"labels go up to {top}, but only {len(used)} distinct labels are used ({_few(used)}): labels are "
                "class indices 0..K-1, each class with training images"
            )
        names = tuple(str(i) for i in range(top + 1))
    else:
        if isinstance(classes, (str, bytes)):  # "cat" would be three classes, c, a and t
            raise DataError(f"classes must be a list of names, got the string {classes!r}")
        names = tuple(str(c) for c in classes)
        if len(set(names)) != len(names):
            raise DataError(f"classes must be distinct, got {list(names)}")
        if top >= len(names):
            raise DataError(f"labels go up to {top}, but there are only {len(names)} classes (labels are 0..K-1)")
    if not names:
        raise DataError("no classes: give at least one label")
    arrays = {"classes": names, "x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}
    check_classes(arrays, name, folder=False)  # two classes at least, each with training images, as for an image folder
    return to_dataset(
        arrays,
        name=name,
        source=name,
        checksum=arrays_md5(x_tr, y_tr, x_te, y_te),
        checksum_kind="md5 of arrays",
        cache_dir="",
    )


def _item_image(img: Any, where: str) -> np.ndarray:
    """One dataset item's image as uint8 (C, H, W): a tensor (CHW), a numpy array (HWC or CHW) or a PIL image."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover (Pillow is a dependency)
        Image = None  # type: ignore[assignment]  # noqa: N806
    if Image is not None and isinstance(img, Image.Image):
        try:
            return pil_to_array(img, channels="keep")
        except UnsupportedImageError as e:  # a float or 32-bit image: no agreed 8-bit meaning
            raise DataError(f"{where}: {e}") from None
    if isinstance(img, torch.Tensor):
        a = img.detach().cpu().numpy()
        if a.ndim == 2:
            a = a[None]
    elif isinstance(img, np.ndarray):
        a = img
        if a.ndim == 2:
            a = a[None]
        elif a.ndim == 3 and a.shape[-1] in _CHANNELS and a.shape[0] not in _CHANNELS:  # HWC
            a = a.transpose(2, 0, 1)
    else:
        raise DataError(f"{where}: the image must be a tensor, numpy array or PIL image, got {type(img).__name__}")
    if a.ndim != 3:
        raise DataError(f"{where}: the image must be (C, H, W), (H, W, C) or (H, W), got shape {a.shape}")
    return _to_uint8(a, where)


def _collect(ds: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        n = len(ds)
    except TypeError:
        raise DataError(f"the {split} dataset must be a map-style torch Dataset (with __len__)") from None
    images: list[np.ndarray] = []
    labels: list[int] = []
    for i in range(n):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise DataError(f"{split} item {i} must be an (image, label) pair, got {type(item).__name__}")
        img = _item_image(item[0], f"{split} item {i}")
        if images and img.shape != images[0].shape:
            raise DataError(
                f"{split} item {i} has image shape {img.shape} (C, H, W), but item 0 has {images[0].shape}: all "
                "images must share one shape (resize them in the dataset's transform)"
            )
        label = item[1]
        if isinstance(label, (torch.Tensor, np.ndarray)) and label.ndim == 0:
            label = label.item()
        if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
            raise DataError(f"{split} item {i}: the label must be an integer class index, got {label!r}")
        images.append(img)
        labels.append(int(label))
    if not images:
        return np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def from_torch_dataset(
    train: Any,
    test: Any,
    *,
    classes: Sequence[str] | None = None,
    name: str | None = None,
    test_fraction: float | None = None,
    seed: int = 0,
) -> Dataset:
    """A `Dataset` from map-style torch datasets whose items are ``(image, label)``.

    An image is a tensor (CHW, float in [0, 1] or uint8), a numpy array (HWC or CHW) or a PIL image (gray
    stays 1 channel, RGB 3, RGBA 4); all images must share one shape. Labels are ints (or 0-d tensors).
    `classes` defaults to the train dataset's ``classes`` attribute (torchvision datasets have one), else to
    ``["0", "1", ...]``. `test` may be None only with `test_fraction` (see `from_arrays`).
    """
    x_tr, y_tr = _collect(train, "train")
    test_arrays = _collect(test, "test") if test is not None else None
    if classes is None:
        found = getattr(train, "classes", None)
        if isinstance(found, (list, tuple)) and found and all(isinstance(c, str) for c in found):
            classes = found
    y_tr = _labels(y_tr, len(x_tr), "train labels")
    if test_arrays is not None:
        test_arrays = (test_arrays[0], _labels(test_arrays[1], len(test_arrays[0]), "test labels"))
    return _from_uint8(x_tr, y_tr, test_arrays, classes, name or type(train).__name__, test_fraction, seed)
