"""Datasets of any size and channel count: `from_arrays`, `from_torch_dataset`, ImageFolder `image_size`,
and the loader/statistics on such images (tiny synthetic data, no files unless needed)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarlab.data import (
    BatchLoader,
    Dataset,
    as_images,
    channel_stats,
    from_arrays,
    from_torch_dataset,
    load_dataset,
    split_indices,
)
from cifarlab.errors import ConfigError, DataError
from conftest import write_cifar_archive


def _rgb(n: int, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, h, w), dtype=np.uint8)


def _labels(n: int, k: int = 3) -> np.ndarray:
    return np.arange(n) % k


# -- from_arrays -----------------------------------------------------------------------------------


def test_from_arrays_64x64_rgb() -> None:
    x_tr, x_te = _rgb(12), _rgb(6, seed=1)
    ds = from_arrays(x_tr, _labels(12), x_te, _labels(6))
    assert isinstance(ds, Dataset) and ds.input_shape == (3, 64, 64)
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    np.testing.assert_array_equal(ds.x_train.numpy(), x_tr)
    assert ds.classes == ("0", "1", "2") and ds.num_classes == 3
    assert ds.checksum_kind == "md5 of arrays" and len(ds.checksum) == 32 and ds.checksum_status == "none"
    assert ds.name == "arrays" and ds.cache_dir == ""
    # The checksum follows the content.
    assert from_arrays(x_tr, _labels(12), x_te, _labels(6)).checksum == ds.checksum
    x_tr[0, 0, 0, 0] ^= 1
    assert from_arrays(x_tr, _labels(12), x_te, _labels(6)).checksum != ds.checksum


def test_as_images_for_prediction() -> None:
    x = _rgb(2, 8, 8)
    assert torch.equal(as_images(x.transpose(0, 2, 3, 1)), torch.from_numpy(x))
    assert as_images(np.ones((1, 5, 5), np.float32)).tolist() == [[[[255] * 5] * 5]]
    with pytest.raises(DataError, match=r"images: float pixels"):
        as_images(np.full((1, 3, 4, 4), 2.0))


def test_nhwc_nchw_and_tensors_give_the_same_dataset() -> None:
    x_tr, x_te = _rgb(8, 16, 20), _rgb(4, 16, 20, seed=1)
    a = from_arrays(x_tr, _labels(8), x_te, _labels(4), classes=["a", "b", "c"])
    b = from_arrays(
        x_tr.transpose(0, 2, 3, 1), _labels(8), x_te.transpose(0, 2, 3, 1), _labels(4), classes=("a", "b", "c")
    )
    c = from_arrays(torch.from_numpy(x_tr), torch.tensor(_labels(8)), torch.from_numpy(x_te), list(_labels(4)))
    for other in (b, c):
        assert torch.equal(a.x_train, other.x_train) and torch.equal(a.x_test, other.x_test)
        assert torch.equal(a.y_train, other.y_train) and a.checksum == other.checksum
    assert a.classes == b.classes == ("a", "b", "c") and a.input_shape == (3, 16, 20)


@pytest.mark.parametrize("layout", ["NHW", "NCHW", "NHWC"])
def test_one_channel_arrays(layout) -> None:
    gray = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    x = {"NHW": gray, "NCHW": gray[:, None], "NHWC": gray[..., None]}[layout]
    ds = from_arrays(x, _labels(10, 2), x[:4], _labels(4, 2))
    assert ds.input_shape == (1, 28, 28)
    np.testing.assert_array_equal(ds.x_train[:, 0].numpy(), gray)


def test_float_input_is_scaled_to_uint8() -> None:
    x = np.array([0.0, 1 / 255, 0.5, 1.0], dtype=np.float32).reshape(1, 1, 2, 2).repeat(3, axis=0)
    ds = from_arrays(x, [0, 1, 0], torch.from_numpy(x.astype(np.float64)), [1, 0, 1])
    assert ds.x_train[0, 0].flatten().tolist() == [0, 1, 128, 255]
    assert torch.equal(ds.x_train, ds.x_test)
    ints = from_arrays(np.full((2, 3, 4, 4), 7, dtype=np.int64), [0, 1], np.zeros((1, 3, 4, 4), np.int32), [0])
    assert int(ints.x_train.max()) == 7 and ints.x_train.dtype == torch.uint8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"x_train": np.full((2, 3, 4, 4), 1.5)}, r"float pixels must be in \[0, 1\].*1\.5"),
        ({"x_train": np.full((2, 3, 4, 4), -0.1)}, r"float pixels must be in \[0, 1\]"),
        ({"x_train": np.full((2, 3, 4, 4), np.nan)}, "NaN"),
        ({"x_train": np.full((2, 3, 4, 4), 300)}, r"integer pixels must be in 0\.\.255"),
        ({"x_train": np.zeros((2, 3, 4, 4), bool)}, "dtype bool"),
        ({"x_train": np.zeros((2, 4), np.uint8)}, r"got shape \(2, 4\)"),
        ({"y_train": [0, 1, 2]}, r"one label per image: expected shape \(2,\), got \(3,\)"),
        ({"y_train": [0, -1]}, r"labels must be >= 0, but item 1 is -1"),
        ({"y_train": [0.0, 1.5]}, r"integer class indices.*item 1 is 1\.5"),
        ({"y_train": ["cat", "dog"]}, "integer class indices"),
        ({"y_test": None}, "give both x_test and y_test"),
        ({"x_test": np.zeros((1, 3, 5, 5), np.uint8)}, r"train and test images differ in shape"),
        ({"classes": ["only"]}, r"labels go up to 1, but there are only 1 classes"),
        ({"x_test": None, "y_test": None}, "a test set is needed.*test_fraction"),
    ],
)
def test_from_arrays_errors(kwargs, message) -> None:
    args = {
        "x_train": np.zeros((2, 3, 4, 4), np.uint8),
        "y_train": [0, 1],
        "x_test": np.zeros((1, 3, 4, 4), np.uint8),
        "y_test": [0],
    }
    classes = kwargs.pop("classes", None)
    args.update(kwargs)
    with pytest.raises(DataError, match=message):
        from_arrays(**args, classes=classes)


def test_test_fraction_splits_a_seeded_stratified_test_set() -> None:
    x, y = _rgb(30, 8, 8), _labels(30, 3)
    ds = from_arrays(x, y, test_fraction=0.2, seed=4)
    assert len(ds.x_test) == 6 and len(ds.x_train) == 24
    assert torch.bincount(ds.y_test).tolist() == [2, 2, 2]
    again = from_arrays(x, y, test_fraction=0.2, seed=4)
    assert torch.equal(ds.x_test, again.x_test) and ds.checksum == again.checksum
    _, held = split_indices(30, 0.2, 4, labels=torch.from_numpy(y))
    np.testing.assert_array_equal(ds.x_test.numpy(), x[held.numpy()])
    with pytest.raises(DataError, match="not both"):
        from_arrays(x, y, x[:2], y[:2], test_fraction=0.2)


# -- from_torch_dataset ----------------------------------------------------------------------------


class _Items(torch.utils.data.Dataset):
    def __init__(self, items, classes=None) -> None:
        self.items = items
        if classes is not None:
            self.classes = classes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_from_torch_dataset_tensors_arrays_and_pil() -> None:
    from PIL import Image

    rgb = _rgb(3, 10, 12)
    train = _Items(
        [
            (torch.from_numpy(rgb[0]).float() / 255, 0),  # CHW float in [0, 1]
            (torch.from_numpy(rgb[1]), torch.tensor(1)),  # CHW uint8, 0-d tensor label
            (rgb[2].transpose(1, 2, 0).copy(), np.int64(2)),  # HWC numpy
            (Image.fromarray(rgb[0].transpose(1, 2, 0)), 0),  # PIL RGB
        ],
        classes=["a", "b", "c"],
    )
    test = _Items([(rgb[1], 1)])  # CHW numpy
    ds = from_torch_dataset(train, test)
    assert ds.classes == ("a", "b", "c") and ds.input_shape == (3, 10, 12) and ds.name == "_Items"
    np.testing.assert_array_equal(ds.x_train.numpy(), np.stack([rgb[0], rgb[1], rgb[2], rgb[0]]))
    assert ds.y_train.tolist() == [0, 1, 2, 0] and ds.x_test[0].numpy().tolist() == rgb[1].tolist()
    grays = [(Image.new("L", (5, 5), 9), 0), (Image.new("L", (5, 5), 7), 1)]
    gray = from_torch_dataset(_Items(grays), _Items([(Image.new("L", (5, 5), 1), 0)]))
    assert gray.input_shape == (1, 5, 5) and gray.classes == ("0", "1")


def test_a_task_with_one_class_a_class_never_trained_or_no_test_images_is_refused() -> None:
    """Each would train to the end and then fail, or never learn a class: refused before any work."""
    x = np.zeros((10, 3, 8, 8), dtype=np.uint8)
    y = np.arange(10) % 2
    with pytest.raises(DataError, match=r"has 1 class \(0\): a classifier needs labels of at least 2 classes"):
        from_arrays(x, np.zeros(10, dtype=np.int64), x[:2], np.zeros(2, dtype=np.int64))
    with pytest.raises(DataError, match=r"class 0 has no training images"):  # labels 1..2: class 0 empty
        from_arrays(x, y + 1, x[:2], np.array([1, 2]))
    with pytest.raises(DataError, match=r"class 2 has no training images"):  # a class in the test set only
        from_arrays(x, y, x[:2], np.array([0, 2]))
    with pytest.raises(DataError, match=r"the test set holds no images"):
        from_arrays(x, y, x[:0], y[:0])


@pytest.mark.parametrize(
    "label,message",
    [
        (100_000_000, "item 0 is 100000000: far beyond any class"),
        (np.uint64(2**63 + 5), "item 0 is 9223372036854775813: far beyond any class"),  # not wrapped negative
        (5000, "labels go up to 5000, but only 4 distinct labels are used (0, 1, 2, 5000)"),
    ],
)
def test_a_stray_label_is_one_short_error_at_once(label, message) -> None:
    """One mistaken label must not build a class list up to it (5.5 GB and a MemoryError at 1e8, an 8 MB message
    listing the empty classes at 1e6): a short error, right away."""
    rng = np.random.default_rng(0)
    x, xt = rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8), rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    y = (np.arange(60) % 3).astype(np.uint64 if isinstance(label, np.uint64) else np.int64)
    y[0] = label
    with pytest.raises(DataError) as e:
        from_arrays(x, y, xt, np.arange(30) % 3)
    assert message in str(e.value) and len(str(e.value)) < 300


def test_from_torch_dataset_shape_mismatch_names_the_item() -> None:
    items = [(torch.zeros(3, 8, 8), 0)] * 3 + [(torch.zeros(3, 9, 8), 1)]
    with pytest.raises(DataError, match=r"train item 3 has image shape \(3, 9, 8\).*item 0 has \(3, 8, 8\)"):
        from_torch_dataset(_Items(items), _Items(items[:1]))
    with pytest.raises(DataError, match=r"train item 0: the label must be an integer"):
        from_torch_dataset(_Items([(torch.zeros(3, 8, 8), "cat")]), _Items(items[:1]))
    with pytest.raises(DataError, match=r"test item 0: float pixels must be in \[0, 1\]"):
        from_torch_dataset(_Items(items[:1]), _Items([(torch.full((3, 8, 8), 2.0), 0)]))
    # A float PIL image (mode F) has no agreed 0-255 scale: refused by name, not turned black.
    from PIL import Image

    float_image = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), "F")
    with pytest.raises(DataError, match=r"train item 1: floating-point image \(Pillow mode F\)"):
        from_torch_dataset(_Items([items[0], (float_image, 0)]), _Items(items[:1]))


# -- loader and statistics on other shapes ---------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 64, 64), (4, 8, 8)])
def test_batch_loader_any_channels_and_size(shape) -> None:
    c = shape[0]
    x = torch.randint(0, 256, (10, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10) % 2
    mean, std = channel_stats(x)
    assert len(mean) == len(std) == c
    loader = BatchLoader(x, y, 4, shuffle=True, mean=mean, std=std)
    batches = list(loader.epoch(0))
    assert [tuple(xb.shape) for xb, _ in batches] == [(4, *shape), (4, *shape), (2, *shape)]
    assert all(xb.dtype == torch.float32 for xb, _ in batches)
    full = torch.cat([xb for xb, _ in BatchLoader(x, y, 10, mean=mean, std=std).epoch(0)])
    assert torch.allclose(full.mean(dim=(0, 2, 3)), torch.zeros(c), atol=1e-5)
    with pytest.raises(ConfigError, match=f"need {c} values"):
        BatchLoader(x, y, 4, mean=(0.5,) * (c + 1), std=(0.5,) * (c + 1))


# -- ImageFolder image_size ------------------------------------------------------------------------


def _png_tree(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for cls, colour in (("a", (200, 10, 10)), ("b", (10, 10, 200))):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for name, size in sizes.items():
                Image.new("RGB", size, colour).save(d / name)
    return root


def test_imagefolder_native_size_kept(tmp_path) -> None:
    root = _png_tree(tmp_path / "tree48", {"x.png": (48, 48), "y.png": (48, 48)})
    ds = load_dataset(root, image_size=None)
    assert ds.input_shape == (3, 48, 48) and tuple(ds.x_train.shape) == (4, 3, 48, 48)
    assert ds.x_train[0, :, 20, 20].tolist() == [200, 10, 10]
    assert load_dataset(root).input_shape == (3, 32, 32)  # the default stays 32
    assert load_dataset(root, image_size=64).input_shape == (3, 64, 64)
    names = sorted(p.name for p in Path(os.environ["CIFARLAB_CACHE"]).glob("*.safetensors"))
    assert len(names) == 3 and any("-native-" in n for n in names) and any("-64px-" in n for n in names)
    assert load_dataset(root, image_size=None).input_shape == (3, 48, 48)  # from its own cache file


def test_imagefolder_native_size_must_agree(tmp_path) -> None:
    root = _png_tree(tmp_path / "mixed", {"x.png": (48, 48), "y.png": (40, 48)})
    with pytest.raises(DataError, match=r"differ in size \(.*a/x\.png is 48x48, .*a/y\.png is 40x48\)"):
        load_dataset(root, image_size=None)
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset(root, image_size=0)


def test_official_archives_refuse_other_sizes(tmp_path) -> None:
    t = write_cifar_archive(tmp_path / "d")
    with pytest.raises(ConfigError, match="32x32"):
        load_dataset("cifar10", t.data_dir, image_size=64)
    assert load_dataset("cifar10", t.data_dir, image_size=None).input_shape == (3, 32, 32)


def test_as_images_of_a_read_only_array_warns_nothing_and_copies() -> None:
    import warnings

    a = np.zeros((2, 3, 8, 8), dtype=np.uint8)
    a.setflags(write=False)  # as a PIL image's buffer or a memory map is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = as_images(a)
    x[0, 0, 0, 0] = 1  # writable, and the caller's array is untouched
    assert a[0, 0, 0, 0] == 0


def test_bfloat16_images_and_a_string_of_classes() -> None:
    """bf16 tensors (numpy has no bfloat16) are read like float32 ones; classes="cat" is not three classes."""
    rng = np.random.default_rng(1)
    x, xt = rng.integers(0, 256, (30, 3, 8, 8), dtype=np.uint8), rng.integers(0, 256, (9, 3, 8, 8), dtype=np.uint8)
    y, yt = np.arange(30) % 3, np.arange(9) % 3
    half = from_arrays(torch.tensor(x / 255.0, dtype=torch.bfloat16), y, xt, yt)
    full = from_arrays(torch.tensor(x / 255.0, dtype=torch.bfloat16).float(), y, xt, yt)
    assert torch.equal(half.x_train, full.x_train)
    assert (half.x_train.int() - torch.from_numpy(x).int()).abs().max() <= 1  # bf16 keeps 8 bits of each pixel
    with pytest.raises(DataError, match="classes must be a list of names, got the string 'abc'"):
        from_arrays(x, y, xt, yt, classes="abc")
