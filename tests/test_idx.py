"""IDX files and Fashion-MNIST: parsing (gz and raw), every broken-file error, checksums, where the files are
found, the cache, and tiny 1x28x28 data trained end to end through the CLI with a report."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarlab import cli
from cifarlab.config import resolve_recipe
from cifarlab.data import idx, load_dataset
from cifarlab.data.idx import FASHION_MNIST_CLASSES, IDX_FILES, parse_idx, read_idx
from cifarlab.errors import DataError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(a: np.ndarray, type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, a.ndim]) + b"".join(struct.pack(">I", d) for d in a.shape) + a.tobytes()


def fake_arrays(n_train: int = 40, n_test: int = 20, size: int = 28, seed: int = 0) -> dict[str, np.ndarray]:
    """Learnable grey images: class k has a bright bar at row 2k (plus noise); every class present."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(y)
        x = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
        for i, k in enumerate(y):
            x[i, 2 * k % size : 2 * k % size + 3, 4:-4] = 230
        out[f"{split}_images"], out[f"{split}_labels"] = x, y
    return out


def write_fashion(folder: Path, arrays: dict[str, np.ndarray], gz: bool | dict[str, bool] = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for role, stem in IDX_FILES.items():
        zipped = gz if isinstance(gz, bool) else gz[role]
        raw = idx_bytes(arrays[role])
        path = folder / (f"{stem}.gz" if zipped else stem)
        path.write_bytes(gzip.compress(raw, mtime=0) if zipped else raw)
    return folder


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    monkeypatch.setattr(idx, "FASHION_MNIST_DIRS", (tmp_path / "no-debian-here",))


# -- parsing --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_raw_and_gzip(tmp_path, gz):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / ("x.gz" if gz else "x")
    p.write_bytes(gzip.compress(idx_bytes(a)) if gz else idx_bytes(a))
    got = read_idx(p)
    assert got.dtype == np.uint8 and got.shape == (2, 3, 4) and np.array_equal(got, a)


def test_read_idx_other_types_are_native_endian():
    a = np.array([[1, -2], [300000, 4]], dtype=">i4")
    got = parse_idx(idx_bytes(a, 0x0C), "x")
    assert got.dtype == np.dtype("int32") and got.dtype.isnative and got.tolist() == [[1, -2], [300000, 4]]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00\x00", "too short"),
        (b"\x08\x03\x00\x00" + b"\x00" * 20, "bad magic number 0x08030000"),
        (b"\x00\x00\x07\x01\x00\x00\x00\x01\x00", "bad magic number"),  # no such type code
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated in its header"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02\x03", "truncated: the header declares 5 values"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x02\x01\x02\x03", "longer than its header says"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
    ],
)
def test_parse_idx_refuses_broken_files_clearly(raw, message):
    with pytest.raises(DataError, match="where.idx") as e:
        parse_idx(raw, "where.idx")
    assert message in str(e.value)


def test_damaged_gzip_is_a_clear_error(tmp_path):
    data = gzip.compress(idx_bytes(np.zeros((50, 28, 28), np.uint8)))
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="damaged gzip file"):
        read_idx(p)


# -- Fashion-MNIST from a data dir ------------------------------------------------------------------------------


def test_fashion_mnist_loads_from_a_fake_data_dir(tmp_path, no_debian, caplog):
    arrays = fake_arrays()
    write_fashion(
        tmp_path / "data",
        arrays,
        gz={"train_images": True, "train_labels": False, "test_images": False, "test_labels": True},
    )
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("fashion_mnist", tmp_path / "data")
    assert ds.name == "fashion_mnist" and ds.classes == FASHION_MNIST_CLASSES
    assert ds.x_train.shape == (40, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28) and ds.input_shape == (1, 28, 28)
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(arrays["train_images"]))
    assert torch.equal(ds.y_test, torch.from_numpy(arrays["test_labels"]).long())
    # Not the official files: it loads, says so once, and the run records it.
    assert ds.checksum_status == "not official" and ds.checksum_kind == "md5 of IDX contents"
    assert "not the official Fashion-MNIST files" in caplog.text and "train-images-idx3-ubyte.gz" in caplog.text
    # Any spelling, a fashion-mnist/ sub-folder, and the second load comes from the cache.
    write_fashion(tmp_path / "other" / "fashion-mnist", arrays, gz=False)
    again = load_dataset("Fashion-MNIST", tmp_path / "other")
    assert again.checksum == ds.checksum  # the checksum is of the contents: .gz or not is the same data
    assert again.cache_dir and any(Path(again.cache_dir).glob(f"idx-{ds.checksum}-*.safetensors"))


def test_fashion_mnist_is_found_where_debian_puts_it(tmp_path, monkeypatch):
    write_fashion(tmp_path / "debian", fake_arrays())
    monkeypatch.setattr(idx, "FASHION_MNIST_DIRS", (tmp_path / "debian",))
    ds = load_dataset("fashion_mnist", tmp_path / "empty-data-dir")
    assert ds.source == str(tmp_path / "debian") and len(ds.y_train) == 40


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, no_debian):
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", tmp_path / "data")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and str(tmp_path / "data") in msg
    assert "train-images-idx3-ubyte[.gz]" in msg


def test_mismatched_files_are_clear_errors(tmp_path, no_debian):
    arrays = fake_arrays()
    arrays["train_labels"] = arrays["train_labels"][:-1]
    write_fashion(tmp_path / "a", arrays)
    with pytest.raises(DataError, match="holds 40 images but .*train-labels-idx1-ubyte.gz holds 39 labels"):
        load_dataset("fashion_mnist", tmp_path / "a")
    arrays = fake_arrays()
    arrays["test_labels"] = arrays["test_labels"].reshape(2, 10)  # an idx2 file where labels belong
    write_fashion(tmp_path / "b", arrays)
    with pytest.raises(DataError, match=r"declares 2 dimensions of uint8; this file should hold uint8 values in 1"):
        load_dataset("fashion_mnist", tmp_path / "b")
    arrays = fake_arrays()
    arrays["test_labels"][0] = 12
    write_fashion(tmp_path / "c", arrays)
    with pytest.raises(DataError, match="label 12 is outside Fashion-MNIST's 0..9"):
        load_dataset("fashion_mnist", tmp_path / "c")
    # A damaged dimension count (0x99) is named as such, not read as 153 dimensions of sizes from pixel bytes.
    write_fashion(tmp_path / "d", fake_arrays())
    images = next((tmp_path / "d").glob("t10k-images*"))
    raw = bytearray(gzip.decompress(images.read_bytes()) if images.suffix == ".gz" else images.read_bytes())
    raw[3] = 0x99
    images.write_bytes(gzip.compress(bytes(raw)) if images.suffix == ".gz" else bytes(raw))
    with pytest.raises(DataError) as info:
        load_dataset("fashion_mnist", tmp_path / "d")
    assert "declares 153 dimensions of uint8; this file should hold uint8 values in 3 dimensions" in str(info.value)
    assert len(str(info.value)) < 400


def test_labels_with_a_gap_are_refused_before_caching(tmp_path, no_debian):
    """One damaged label byte (42) would make 43 classes, 33 never seen in training: refused as for image folders,
    with the Debian hint only for Fashion-MNIST, and nothing cached."""
    arrays = fake_arrays()
    arrays["train_labels"][0] = 42
    folder = write_fashion(tmp_path / "i4", arrays, gz=False)
    with pytest.raises(DataError) as info:
        load_dataset(folder)
    msg = str(info.value)
    assert msg.startswith(f"{folder}: classes 10, 11, 12, 13, 14, 15, 16, 17, ... (32 in all) have no training images")
    assert "train-labels-idx1-ubyte" in msg and "damaged byte" in msg and "Debian" not in msg and "\n" not in msg
    assert not list(Path(os.environ["CIFARLAB_CACHE"]).glob("idx-*"))
    arrays["train_labels"][0] = 0
    arrays["train_labels"][arrays["train_labels"] == 9] = 8  # no 9 in training, but 9 in the test labels
    write_fashion(tmp_path / "c", arrays)
    with pytest.raises(DataError, match=r"class Ankle boot has no training images.* \(on Debian: apt-get install"):
        load_dataset("fashion_mnist", tmp_path / "c")


def test_a_partial_set_in_the_named_folder_is_named_not_replaced(tmp_path, monkeypatch):
    write_fashion(tmp_path / "debian", fake_arrays())  # a whole copy where Debian puts it: must not be used
    monkeypatch.setattr(idx, "FASHION_MNIST_DIRS", (tmp_path / "debian",))
    partial = write_fashion(tmp_path / "i2", fake_arrays(), gz=False)
    (partial / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(
        DataError, match=r"i2 has 3 of the 4 Fashion-MNIST files \(missing t10k-labels-idx1-ubyte\[\.gz"
    ):
        load_dataset("fashion_mnist", partial)
    with pytest.raises(DataError, match=r"i2 has 3 of the 4 MNIST-format IDX files \(missing t10k-labels-idx1-ubyte"):
        load_dataset(partial)  # by path: not "no train/ or test/ folder"


# -- the same file both raw and .gz ---------------------------------------------------------------------------------


def _both_copies(folder: Path, arrays: dict[str, np.ndarray], raw_images: bytes) -> Path:
    """Every file .gz, plus a raw train-images-idx3-ubyte beside its .gz holding `raw_images`."""
    write_fashion(folder, arrays)
    (folder / IDX_FILES["train_images"]).write_bytes(raw_images)
    return folder


@pytest.mark.parametrize("change", ["pixel", "shorter", "longer"])
def test_raw_and_gz_copies_that_differ_are_refused_naming_both(tmp_path, no_debian, change):
    """train-images-idx3-ubyte beside train-images-idx3-ubyte.gz: the raw one was read silently, whichever the
    user meant. Different contents are an error naming both files; no cache file is written."""
    arrays = fake_arrays()
    raw = idx_bytes(arrays["train_images"])
    other = {"pixel": raw[:100] + bytes([raw[100] ^ 1]) + raw[101:], "shorter": raw[:-7], "longer": raw + b"\0"}
    folder = _both_copies(tmp_path / "both", arrays, other[change])
    for load in (lambda: load_dataset(folder), lambda: load_dataset("fashion_mnist", folder)):
        with pytest.raises(DataError) as info:
            load()
        msg = str(info.value)
        assert "holds both train-images-idx3-ubyte and train-images-idx3-ubyte.gz, and their contents differ" in msg
        assert str(folder / "train-images-idx3-ubyte") in msg and str(folder / "train-images-idx3-ubyte.gz") in msg
        assert "remove the one that is not the copy you mean to use" in msg and "\n" not in msg
        assert ("from byte 100" in msg) == (change == "pixel")
    assert not list(Path(os.environ["CIFARLAB_CACHE"]).glob("idx-*.safetensors"))


def test_a_damaged_gz_beside_its_raw_copy_is_named(tmp_path, no_debian):
    arrays = fake_arrays()
    folder = _both_copies(tmp_path / "dmg", arrays, idx_bytes(arrays["train_images"]))
    gz = folder / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-9])  # truncated: its CRC and length are gone
    with pytest.raises(DataError, match=r"their contents differ \(train-images-idx3-ubyte\.gz is a damaged gzip file"):
        load_dataset(folder)


def test_raw_and_gz_copies_with_the_same_content_load_silently(tmp_path, no_debian, caplog):
    arrays = fake_arrays()
    folder = _both_copies(tmp_path / "same", arrays, idx_bytes(arrays["train_images"]))
    with caplog.at_level(logging.WARNING):
        ds = load_dataset(folder)
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(arrays["train_images"])) and not caplog.records
    assert load_dataset("fashion_mnist", folder).checksum == ds.checksum


def test_errors_of_a_folder_loaded_by_path_do_not_point_at_debian(tmp_path, no_debian):
    arrays = fake_arrays()
    arrays["test_images"] = arrays["test_images"][:, :27, :27]  # MNIST-format, but not Fashion-MNIST's sizes
    write_fashion(tmp_path / "i7", arrays)
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path / "i7")
    assert "train images are" in str(info.value) and "Debian" not in str(info.value)
    with pytest.raises(DataError, match=r"on Debian: apt-get install --reinstall dataset-fashion-mnist"):
        load_dataset("fashion_mnist", tmp_path / "i7")


def test_checksums_accept_the_published_gz_and_raw_and_recompressed_copies(tmp_path, monkeypatch, no_debian, caplog):
    """Pretend the tiny files are the official ones: a .gz with the published MD5, the raw files, and a copy
    recompressed differently (like Debian's) are all official; one changed byte is not, and is named."""
    arrays = fake_arrays()
    official = {}
    for role in IDX_FILES:
        raw = idx_bytes(arrays[role])
        gz_md5 = hashlib.md5(gzip.compress(raw, mtime=0)).hexdigest()
        official[role] = idx._Official(gz=gz_md5, raw=hashlib.md5(raw).hexdigest(), debian_gz="0" * 32)
    monkeypatch.setattr(idx, "_FASHION_MD5", official)
    want = hashlib.md5("".join(official[r].raw for r in IDX_FILES).encode()).hexdigest()
    monkeypatch.setattr(idx, "FASHION_MNIST_MD5", want)
    monkeypatch.setattr("cifarlab.data.dataset.FASHION_MNIST_MD5", want)

    gz_dir = write_fashion(tmp_path / "gz", arrays, gz=True)
    raw_dir = write_fashion(tmp_path / "raw", arrays, gz=False)
    recompressed = tmp_path / "recompressed"
    recompressed.mkdir()
    for role, stem in IDX_FILES.items():
        (recompressed / f"{stem}.gz").write_bytes(gzip.compress(idx_bytes(arrays[role]), compresslevel=1, mtime=7))
    with caplog.at_level(logging.WARNING):
        for folder in (gz_dir, raw_dir, recompressed):
            ds = load_dataset("fashion_mnist", folder)
            assert ds.checksum == want and ds.checksum_status == "official", folder
    assert "not the official" not in caplog.text

    arrays["test_images"][3, 5, 5] ^= 1
    changed = write_fashion(tmp_path / "changed", arrays)
    with caplog.at_level(logging.WARNING):
        ds = load_dataset("fashion_mnist", changed)
    assert ds.checksum_status == "not official"
    assert "t10k-images-idx3-ubyte.gz (content MD5" in caplog.text and "is not the official" in caplog.text
    assert "train-images" not in caplog.text
    # A folder given by path is Fashion-MNIST only when official; else an MNIST-format set with numeric classes.
    assert load_dataset(raw_dir).name == "fashion_mnist"
    other = load_dataset(changed)
    assert other.name == "changed" and other.classes == tuple(str(i) for i in range(10))


def test_the_dataset_name_is_canonical_in_recipes(tmp_path):
    assert resolve_recipe("fast", sets=["dataset=Fashion-MNIST"]).dataset == "fashion_mnist"


@pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").exists(), reason="apt-get install dataset-fashion-mnist"
)
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    ds = load_dataset("fashion_mnist", tmp_path / "empty")
    assert ds.checksum_status == "official" and ds.classes == FASHION_MNIST_CLASSES
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10 and torch.bincount(ds.y_test).tolist() == [1000] * 10


# -- a 1x28x28 dataset through the CLI, with a report --------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--recipe", "reference", "--set", "widths=8,16,16", "--set", "dense_width=32", "--set", "epochs=2"],
        ["--recipe", "fast", "--set", "widths=8,16,16", "--set", "epochs=2", "--set", "ema_start_epochs=1"],
    ],
    ids=["reference", "fast"],
)
def test_grey_28px_data_trains_end_to_end_with_a_report(tmp_path, no_debian, one_thread, argv, undrawn_figures):
    # Figures built, not rasterized: grey images become RGB arrays before matplotlib sees them.
    write_fashion(tmp_path / "data", fake_arrays(n_train=60, n_test=20))
    runs = tmp_path / "runs"
    common = ["--set", "dataset=fashion_mnist", "--set", "batch_size=16", "--set", "precision=fp32"]
    code = cli.main(["train", *argv, *common, "--data-dir", str(tmp_path / "data"), "--runs-dir", str(runs), "--quiet"])
    assert code == 0
    (run,) = runs.iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["dataset"]["name"] == "fashion_mnist" and config["dataset"]["input_shape"] == [1, 28, 28]
    assert config["dataset"]["classes"] == list(FASHION_MNIST_CLASSES)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "finished" and 0.0 <= metrics["test_accuracy"] <= 1.0
    html = (run / "report.html").read_text()
    assert "Ankle boot" in html and "fashion_mnist" in html
    assert (run / "plots").is_dir() and any((run / "plots").glob("*.png"))
