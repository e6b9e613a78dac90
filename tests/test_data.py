"""Tests for cifarlab.data and `cifarlab data ...` (tiny synthetic files; no network)."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import json
import logging
import os
import pickle
import re
import stat
import subprocess
import sys
import tarfile
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarlab import data
from cifarlab.data import (
    CIFAR10_CLASSES,
    OFFICIAL,
    BatchLoader,
    Dataset,
    channel_stats,
    download_url,
    load_dataset,
    official,
    resolve_cache_dir,
    sample_grid_figure,
    split_indices,
)
from cifarlab.errors import ConfigError, DataError, UserError
from conftest import (
    CIFAR10_NAMES,
    FOLDER_COLOURS,
    SHARED_DATA,
    official_files,
    planar_rows,
    tar_tree,
    write_cifar_archive,
    write_imagefolder,
)


def _load_quiet(*args, **kwargs) -> Dataset:
    return load_dataset(*args, **kwargs)  # a non-official MD5 is only logged (see test_md5_mismatch_logs_once)


def _cache_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*") if p.is_file()) if d.exists() else []


def _assert_matches(ds: Dataset, t) -> None:
    assert ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert ds.x_train.is_contiguous() and ds.x_test.is_contiguous()
    assert tuple(ds.x_train.shape) == t.x_train.shape and tuple(ds.x_test.shape) == t.x_test.shape
    np.testing.assert_array_equal(ds.x_train.numpy(), t.x_train)
    np.testing.assert_array_equal(ds.y_train.numpy(), t.y_train)
    np.testing.assert_array_equal(ds.x_test.numpy(), t.x_test)
    np.testing.assert_array_equal(ds.y_test.numpy(), t.y_test)


# -- official archives -----------------------------------------------------------------------------


def test_classes_constant() -> None:
    assert CIFAR10_CLASSES == CIFAR10_NAMES and len(CIFAR10_CLASSES) == 10


def test_load_official_archive(tiny_cifar10) -> None:
    ds = load_dataset("cifar10", tiny_cifar10.data_dir)
    _assert_matches(ds, tiny_cifar10)
    assert ds.name == "cifar10" and ds.classes == CIFAR10_CLASSES and ds.num_classes == 10
    assert ds.source == str(tiny_cifar10.path)
    assert ds.checksum == tiny_cifar10.md5 and ds.checksum_kind == "md5 of archive"
    assert ds.expected_checksum == OFFICIAL["cifar10"].md5 and ds.checksum_status == "not official"
    assert "cifar10" in repr(ds) and "tensor" not in repr(ds)


def test_label_and_class_name_mapping(tmp_path) -> None:
    # Class names come from batches.meta, in file order; label k means classes[k].
    files, _ = official_files("cifar10")
    names = [f"thing{i}".encode() for i in range(10)]
    files["batches.meta"] = pickle.dumps({b"label_names": names}, protocol=2)
    t = write_cifar_archive(tmp_path / "d", files=files)
    ds = _load_quiet("cifar10", t.data_dir)
    assert ds.classes == tuple(f"thing{i}" for i in range(10))
    np.testing.assert_array_equal(ds.y_train.numpy(), t.y_train)


def test_pixel_layout_channel_row_column(tmp_path) -> None:
    # One picture with a single marked pixel at (row 3, column 7) = RGB (255, 0, 128).
    pic = np.zeros((1, 32, 32, 3), np.uint8)
    pic[0, 3, 7] = (255, 0, 128)
    row = planar_rows(pic)[0]
    assert row[3 * 32 + 7] == 255 and row[1024 + 3 * 32 + 7] == 0 and row[2048 + 3 * 32 + 7] == 128
    files, _ = official_files("cifar10", n_per_batch=1, n_test=1)
    batch = {b"data": row[None, :], b"labels": [4], b"batch_label": b"x"}
    files["data_batch_1"] = pickle.dumps(batch, protocol=2)
    ds = _load_quiet("cifar10", write_cifar_archive(tmp_path / "d", files=files).data_dir)
    assert ds.x_train[0, :, 3, 7].tolist() == [255, 0, 128]
    assert int(ds.x_train[0].sum()) == 255 + 128  # nothing else lit
    assert ds.y_train[0] == 4


def test_cifar100_fine_labels(tmp_path) -> None:
    t = write_cifar_archive(tmp_path / "d", "cifar100")
    ds = _load_quiet("cifar100", t.data_dir)
    _assert_matches(ds, t)
    assert ds.name == "cifar100" and len(ds.classes) == 100 and ds.classes[5] == "fine05"


def test_extracted_folder_is_preferred(tiny_cifar10_extracted) -> None:
    t = tiny_cifar10_extracted
    (t.data_dir / "cifar-10-python.tar.gz").write_bytes(b"not even gzip")  # must not be touched
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset("cifar10", t.data_dir)
    _assert_matches(ds, t)
    assert ds.source == str(t.path) and ds.checksum_status == "none"  # no official MD5 for loose batches
    # Its checksum is of the decoded arrays: the same on every load, so a resumed run can tell edited batches.
    assert len(ds.checksum) == 32 and load_dataset("cifar10", t.data_dir).checksum == ds.checksum


def test_load_by_path(tiny_cifar10) -> None:
    ds = _load_quiet(tiny_cifar10.path)  # the archive's own path works as a dataset name
    _assert_matches(ds, tiny_cifar10)


def test_data_dir_given_as_dataset_path(tiny_cifar10) -> None:
    _assert_matches(_load_quiet(tiny_cifar10.data_dir), tiny_cifar10)


def test_second_load_comes_from_cache(tiny_cifar10, monkeypatch) -> None:
    cache = Path(os.environ["CIFARLAB_CACHE"])
    ds1 = _load_quiet("cifar10", tiny_cifar10.data_dir)
    assert ds1.cache_dir == str(cache)
    assert [n for n in _cache_files(cache) if n.endswith(".safetensors")] == [
        f"cifar10-{tiny_cifar10.md5}-v1.safetensors"
    ]

    def boom(*a, **k):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr("cifarlab.data.dataset.decode_official_tar", boom)
    _assert_matches(_load_quiet("cifar10", tiny_cifar10.data_dir), tiny_cifar10)


def test_unreadable_cache_is_rebuilt(tiny_cifar10) -> None:
    cache = Path(os.environ["CIFARLAB_CACHE"])
    _load_quiet("cifar10", tiny_cifar10.data_dir)
    (cache_file,) = cache.glob("*.safetensors")
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # as if someone truncated it
    _assert_matches(_load_quiet("cifar10", tiny_cifar10.data_dir), tiny_cifar10)
    assert cache_file.stat().st_size > 100


def test_cache_dir_rule(tiny_cifar10, tmp_path, monkeypatch) -> None:
    # One rule: $CIFARLAB_CACHE, else $XDG_CACHE_HOME/cifarlab, else ~/.cache/cifarlab; never beside the data.
    monkeypatch.delenv("CIFARLAB_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home_cache = tmp_path / "home" / ".cache" / "cifarlab"
    d = tiny_cifar10.data_dir
    assert resolve_cache_dir() == home_cache
    ds = _load_quiet("cifar10", d)
    assert ds.cache_dir == str(home_cache) and _cache_files(home_cache)
    assert not (d / "cifarlab-cache").exists() and sorted(p.name for p in d.iterdir()) == [tiny_cifar10.path.name]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == tmp_path / "xdg" / "cifarlab"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: relative paths are invalid
    assert resolve_cache_dir() == home_cache
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    assert resolve_cache_dir(cache_dir=tmp_path / "x") == tmp_path / "x"  # an explicit folder wins


def test_cache_files_are_keyed_by_source(tmp_path) -> None:
    cache = Path(os.environ["CIFARLAB_CACHE"])
    a = write_cifar_archive(tmp_path / "a", seed=1)
    b = write_cifar_archive(tmp_path / "b", seed=2)
    _assert_matches(_load_quiet("cifar10", a.data_dir), a)
    _assert_matches(_load_quiet("cifar10", b.data_dir), b)
    cached = [n for n in _cache_files(cache) if n.endswith(".safetensors")]  # besides .sources/ (which reads what)
    assert sorted(cached) == sorted(f"cifar10-{t.md5}-v1.safetensors" for t in (a, b))
    _assert_matches(_load_quiet("cifar10", a.data_dir), a)


def test_unwritable_cache_loads_without_caching_and_says_so_once(tiny_cifar10, tmp_path, caplog) -> None:
    ro = tmp_path / "ro-cache"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with caplog.at_level(logging.WARNING, logger="cifarlab"):
            ds1 = load_dataset("cifar10", tiny_cifar10.data_dir, cache_dir=ro)
            ds2 = load_dataset("cifar10", tiny_cifar10.data_dir, cache_dir=ro)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)
    _assert_matches(ds1, tiny_cifar10)
    _assert_matches(ds2, tiny_cifar10)
    assert ds1.cache_dir == ""
    notes = [r.getMessage() for r in caplog.records if "not writable" in r.getMessage()]
    assert len(notes) == 1 and str(ro) in notes[0] and "without caching" in notes[0]


def test_default_data_dir(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "x"))
    assert data.default_data_dir() == tmp_path / "x"
    monkeypatch.delenv("CIFARLAB_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_data_dir() == tmp_path / "home" / ".cache" / "cifarlab"


def test_md5_mismatch_logs_once(tiny_cifar10, caplog, recwarn) -> None:
    official = OFFICIAL["cifar10"].md5
    with caplog.at_level(logging.WARNING, logger="cifarlab.data"):
        load_dataset("cifar10", tiny_cifar10.data_dir)
    lines = [r.getMessage() for r in caplog.records if official in r.getMessage()]
    assert len(lines) == 1 and tiny_cifar10.md5 in lines[0] and "\n" not in lines[0]
    assert len(recwarn) == 0  # not also a Python warning (which printed a second copy with a source line)


def test_md5_mismatch_printed_once_plainly(tiny_cifar10) -> None:
    # Without any logging setup (a script calling load_dataset): one plain line on stderr.
    code = (
        "import sys; from cifarlab.data import load_dataset; "
        f"load_dataset('cifar10', {str(tiny_cifar10.data_dir)!r}, cache_dir={str(tiny_cifar10.path) + '.c'!r})"
    )
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    lines = [line for line in err.splitlines() if OFFICIAL["cifar10"].md5 in line]
    assert len(lines) == 1 and "ChecksumWarning" not in err and ".py:" not in err, err


def test_official_md5_no_warning(tiny_cifar10, monkeypatch) -> None:
    monkeypatch.setitem(OFFICIAL, "cifar10", dataclasses.replace(OFFICIAL["cifar10"], md5=tiny_cifar10.md5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset("cifar10", tiny_cifar10.data_dir)
    assert ds.checksum_status == "official"


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw[: len(raw) // 2], id="truncated"),
        pytest.param(lambda raw: b"<html>404 not found</html>", id="not-gzip"),
        pytest.param(lambda raw: gzip.compress(b"plain text, not a tar"), id="gzip-not-tar"),
    ],
)
def test_corrupt_archive_clear_error_then_recovers(tiny_cifar10, damage) -> None:
    good = tiny_cifar10.path.read_bytes()
    tiny_cifar10.path.write_bytes(damage(good))
    cache = Path(os.environ["CIFARLAB_CACHE"])
    with pytest.raises(DataError, match="cifar-10-python.tar.gz.*[Dd]elete it and re-run"):
        _load_quiet("cifar10", tiny_cifar10.data_dir)
    assert _cache_files(cache) == []  # nothing half-written left behind
    tiny_cifar10.path.write_bytes(good)
    _assert_matches(_load_quiet("cifar10", tiny_cifar10.data_dir), tiny_cifar10)


def test_archive_missing_member(tmp_path) -> None:
    t = write_cifar_archive(tmp_path / "d")
    with tarfile.open(t.path, "w:gz") as tar:  # rewrite without data_batch_3
        files, _ = official_files()
        for name, raw in files.items():
            if name != "data_batch_3":
                info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
                info.size = len(raw)
                tar.addfile(info, io.BytesIO(raw))
    with pytest.raises(DataError, match="lacks cifar-10-batches-py/data_batch_3"):
        _load_quiet("cifar10", t.data_dir)


def test_wrong_batch_contents(tmp_path) -> None:
    files, _ = official_files()
    files["data_batch_2"] = pickle.dumps({b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]})
    t = write_cifar_archive(tmp_path / "d", files=files)
    with pytest.raises(DataError, match=r"data_batch_2.*uint8 N x 3072"):
        _load_quiet("cifar10", t.data_dir)
    files["data_batch_2"] = pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [0, 1, 99]})
    t = write_cifar_archive(tmp_path / "e", files=files)
    with pytest.raises(DataError, match="labels outside"):
        _load_quiet("cifar10", t.data_dir)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_malicious_pickle_is_refused(tmp_path) -> None:
    marker = tmp_path / "pwned"
    files, _ = official_files()
    files["data_batch_1"] = pickle.dumps({b"data": _Evil(marker), b"labels": []}, protocol=2)
    t = write_cifar_archive(tmp_path / "d", files=files)
    with pytest.raises(DataError, match=r"refusing to load .*data_batch_1.*posix\.mkdir"):
        _load_quiet("cifar10", t.data_dir)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_python2_written_archive(tmp_path, kind) -> None:
    # The real archives were pickled by Python 2 + numpy 1: str keys, numpy.core names, raw str data.
    files, _ = official_files(kind, python2=True)
    for raw in files.values():
        assert b"_codecs" not in raw and b"numpy._core" not in raw and b"\x80\x02}(U" in raw[:5]
    t = write_cifar_archive(tmp_path / "d", kind, python2=True)
    ds = _load_quiet(kind, t.data_dir)
    _assert_matches(ds, t)
    assert ds.classes == t.classes


def test_numpy1_pickles_load() -> None:
    # Files written by numpy 1.x name numpy.core.multiarray (the official archive does, too).
    raw = pickle.dumps({b"data": np.arange(6, dtype=np.uint8).reshape(2, 3)}, protocol=2)
    old = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert old != raw
    out = official._unpickle(old, "x")
    np.testing.assert_array_equal(out["data"], np.arange(6).reshape(2, 3))


def test_missing_dataset_without_download(tmp_path) -> None:
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz.*--data-dir") as exc:
        load_dataset("cifar10", tmp_path / "empty", download=False)
    assert str(tmp_path / "empty") in str(exc.value)


def test_unknown_dataset_name(tmp_path) -> None:
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", tmp_path)


# -- download --------------------------------------------------------------------------------------


class _FakeResponse:
    """A server-free stand-in for urlopen's response: serves `payload` in chunks, optionally failing."""

    def __init__(
        self,
        payload: bytes,
        fail_after: int | None = None,
        exc: BaseException | None = None,
        length: int | None = None,
    ) -> None:
        self.buf = io.BytesIO(payload)
        self.fail_after, self.exc, self.served = fail_after, exc, 0
        self.headers = {"Content-Length": str(len(payload) if length is None else length)}
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        if self.fail_after is not None and self.served >= self.fail_after:
            raise self.exc or ConnectionResetError("connection reset by peer")
        chunk = self.buf.read(min(n, 64) if n > 0 else 64)
        self.served += len(chunk)
        return chunk

    def close(self) -> None:
        self.closed = True


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


@pytest.mark.parametrize("exc", [ConnectionResetError("reset"), KeyboardInterrupt()], ids=["reset", "ctrl-c"])
def test_interrupted_download_leaves_nothing(tiny_cifar10, tmp_path, exc) -> None:
    payload = tiny_cifar10.path.read_bytes()
    target = tmp_path / "fresh"
    target.mkdir()  # a named data folder must exist (only ~/.cache/cifarlab is created)
    responses = []

    def opener(url: str) -> _FakeResponse:
        assert url == OFFICIAL["cifar10"].url
        responses.append(_FakeResponse(payload, fail_after=len(payload) // 2, exc=exc))
        return responses[-1]

    expected = KeyboardInterrupt if isinstance(exc, KeyboardInterrupt) else DataError
    with pytest.raises(expected) as info:
        load_dataset("cifar10", target, download=True, opener=opener)
    if expected is DataError:
        assert "nothing was kept" in str(info.value) and "cifar-10-python.tar.gz" in str(info.value)
    assert responses[0].closed
    assert _leftovers(target) == []  # no archive, no .part


def test_download_then_load(tiny_cifar10, tmp_path, monkeypatch) -> None:
    payload = tiny_cifar10.path.read_bytes()
    monkeypatch.setitem(OFFICIAL, "cifar10", dataclasses.replace(OFFICIAL["cifar10"], md5=tiny_cifar10.md5))
    target = tmp_path / "fresh"
    target.mkdir()
    ds = load_dataset("cifar10", target, opener=lambda url: _FakeResponse(payload))
    _assert_matches(ds, tiny_cifar10)
    assert _leftovers(target) == ["cifar-10-python.tar.gz"]
    assert (target / "cifar-10-python.tar.gz").read_bytes() == payload
    assert ds.checksum_status == "official"


def test_download_md5_mismatch_keeps_nothing(tiny_cifar10, tmp_path) -> None:
    payload = tiny_cifar10.path.read_bytes()
    dest = tmp_path / "dl" / "file.tar.gz"
    with pytest.raises(DataError, match=f"MD5 is {tiny_cifar10.md5}, not the expected 0+"):
        download_url("http://x/file.tar.gz", dest, "0" * 32, opener=lambda url: _FakeResponse(payload))
    assert _leftovers(dest.parent) == []
    # A short body (fewer bytes than Content-Length) is an error too.
    short = lambda url: _FakeResponse(payload[:100], length=len(payload))  # noqa: E731
    with pytest.raises(DataError, match=f"stopped after 100 of {len(payload)} bytes"):
        download_url("http://x/file.tar.gz", dest, None, opener=short)
    assert _leftovers(dest.parent) == []
    assert download_url("http://x/f", dest, tiny_cifar10.md5, opener=lambda url: _FakeResponse(payload)) == dest
    assert _leftovers(dest.parent) == ["file.tar.gz"]


def test_default_download_failure_says_where_to_put_the_file(tmp_path) -> None:
    # The autouse fixture makes the default opener fail like a machine without network.
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"network.*Without network: put cifar-10-python\.tar\.gz"):
        load_dataset("cifar10", tmp_path / "d")
    assert _leftovers(tmp_path / "d") == []


# -- ImageFolder -----------------------------------------------------------------------------------


def _check_folder(ds: Dataset, t) -> None:
    assert ds.classes == t.classes == ("cat", "dog", "frog")
    assert tuple(ds.x_train.shape) == (12, 3, 32, 32) and tuple(ds.x_test.shape) == (6, 3, 32, 32)
    assert torch.bincount(ds.y_train).tolist() == [4, 4, 4]
    assert torch.bincount(ds.y_test).tolist() == [2, 2, 2]
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        for img, label in zip(x, y, strict=True):
            want = torch.tensor(t.colours[t.classes[label]]).view(3, 1, 1).expand(3, 32, 32)
            assert (img.int() - want).abs().max() <= 3, t.classes[label]  # JPEG may drift a little


def test_imagefolder_folder(tiny_imagefolder) -> None:
    ds = load_dataset(tiny_imagefolder.root)
    _check_folder(ds, tiny_imagefolder)
    assert ds.name == "tinyfolder" and ds.source == str(tiny_imagefolder.root)
    assert ds.checksum_kind == "md5 of image files (paths and contents)" and len(ds.checksum) == 32
    # Sorted by class then file name: the first train image is cat's a_big.png (64x48, resized).
    assert ds.x_train[0, :, 0, 0].tolist() == list(FOLDER_COLOURS["cat"])


def test_imagefolder_tarball(tiny_imagefolder_tar) -> None:
    ds = load_dataset(tiny_imagefolder_tar.root)
    _check_folder(ds, tiny_imagefolder_tar)
    assert ds.name == "tinyfolder" and ds.checksum_kind == "md5 of archive" and len(ds.checksum) == 32


def test_imagefolder_tar_and_folder_agree(tmp_path) -> None:
    t = write_imagefolder(tmp_path / "tree")
    a = load_dataset(t.root)
    b = load_dataset(tar_tree(t.root, tmp_path / "tree.tar.gz"))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


def test_imagefolder_resize_keeps_colour_and_structure(tmp_path) -> None:
    from PIL import Image

    root = tmp_path / "shapes"
    for split in ("train", "test"):
        for cls in ("half", "other"):  # two classes: one is refused
            (root / split / cls).mkdir(parents=True)
            img = Image.new("RGB", (64, 48), (255, 0, 0))  # left half red, right half blue
            img.paste((0, 0, 255), (32, 0, 64, 48))
            img.save(root / split / cls / "x.png")
    ds = load_dataset(root)
    x = ds.x_train[0]
    assert tuple(x.shape) == (3, 32, 32)
    assert x[:, :, :16].tolist() == torch.tensor([255, 0, 0]).view(3, 1, 1).expand(3, 32, 16).tolist()
    assert x[:, :, 16:].tolist() == torch.tensor([0, 0, 255]).view(3, 1, 1).expand(3, 32, 16).tolist()


def test_imagefolder_modes(tmp_path) -> None:
    from PIL import Image

    root = tmp_path / "modes"
    for split in ("train", "test"):
        d = root / split / "a"
        d.mkdir(parents=True)
        Image.new("L", (32, 32), 77).save(d / "gray.png")
        pal = Image.new("RGB", (8, 8), (10, 20, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
        pal.save(d / "pal.png")
        Image.new("RGBA", (32, 32), (1, 2, 3, 0)).save(d / "clear.png")
        (root / split / "b").mkdir()  # two classes: one is refused
        Image.new("L", (32, 32), 77).save(root / split / "b" / "gray.png")
    ds = load_dataset(root)
    colours = {tuple(img[:, 5, 5].tolist()) for img in ds.x_train[ds.y_train == 0]}
    assert colours == {(77, 77, 77), (10, 20, 30), (1, 2, 3)}


def test_imagefolder_val_as_test_and_lone_subfolder(tmp_path) -> None:
    t = write_imagefolder(tmp_path / "outer" / "inner")
    (t.root / "test").rename(t.root / "val")
    ds = load_dataset(tmp_path / "outer")  # descends into the lone subfolder holding the splits
    assert ds.name == "inner" and len(ds.x_test) == 6


def test_imagefolder_errors(tmp_path) -> None:
    t = write_imagefolder(tmp_path / "t")
    for d in (t.root / "test").iterdir():
        for f in d.iterdir():
            f.unlink()
    with pytest.raises(DataError, match="no test/ .or val/. images"):
        load_dataset(t.root)
    with pytest.raises(DataError, match="no images found"):
        (tmp_path / "empty" / "train").mkdir(parents=True)
        load_dataset(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match="neither a folder nor a tarball"):
        load_dataset(tmp_path / "notes.txt")


def test_imagefolder_corrupt_image_then_fixed(tmp_path) -> None:
    t = write_imagefolder(tmp_path / "t")
    bad = t.root / "train" / "dog" / "a_big.png"
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cannot decode image .*dog/a_big\.png.*Delete or replace"):
        load_dataset(t.root)
    assert _cache_files(Path(os.environ["CIFARLAB_CACHE"])) == []
    bad.write_bytes(good)
    _check_folder(load_dataset(t.root), t)


@pytest.mark.parametrize("source", ["folder", "tarball"])
def test_imagefolder_thread_pool_decodes_the_same_and_reports_a_bad_image(tmp_path, monkeypatch, source) -> None:
    """Small images decode in one thread; big ones go to a thread pool after the first chunk. Forced here (tiny
    chunks, any image counts as big): the same arrays, and a bad image in a later chunk still named."""
    import cifarlab.data.imagefolder as imagefolder

    t = write_imagefolder(tmp_path / "t")
    root = t.root if source == "folder" else tar_tree(t.root, tmp_path / "t.tar.gz")
    serial = load_dataset(root)
    monkeypatch.setattr(imagefolder, "CHUNK", 2)
    monkeypatch.setattr(imagefolder, "POOL_ABOVE_SECONDS", 0.0)
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "other-cache"))
    pooled = load_dataset(root)
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(pooled, key), getattr(serial, key)), key
    (t.root / "train" / "frog" / "zz.jpg").write_bytes(b"not a jpeg")  # sorts last: never in the first chunk
    root = t.root if source == "folder" else tar_tree(t.root, tmp_path / "t2.tar.gz")
    with pytest.raises(DataError, match=r"cannot decode image .*frog/zz\.jpg"):
        load_dataset(root)


def test_imagefolder_tar_corrupt_member(tmp_path) -> None:
    t = write_imagefolder(tmp_path / "t")
    (t.root / "train" / "cat" / "zz.jpg").write_bytes(b"not a jpeg")
    archive = tar_tree(t.root, tmp_path / "t.tar.gz")
    with pytest.raises(DataError, match=r"t\.tar\.gz \(member t/train/cat/zz\.jpg\)"):
        load_dataset(archive)


def test_imagefolder_tar_with_two_trees(tmp_path) -> None:
    a = write_imagefolder(tmp_path / "src" / "a")
    write_imagefolder(tmp_path / "src" / "b")
    archive = tar_tree(a.root.parent, tmp_path / "two.tar.gz", arcname="top")
    with pytest.raises(DataError, match="more than one image tree .top/a/, top/b/."):
        load_dataset(archive)


def test_cifar10_from_jpeg_copy_in_data_dir(tmp_path) -> None:
    colours = {c: (i * 20, 255 - i * 20, 100) for i, c in enumerate(CIFAR10_NAMES)}
    t = write_imagefolder(tmp_path / "src" / "cifar10-jpeg", colours)
    (tmp_path / "d").mkdir()
    tar_tree(t.root, tmp_path / "d" / "cifar10-jpeg.tar.gz")
    ds = load_dataset("cifar10", tmp_path / "d", download=False)
    assert ds.name == "cifar10" and ds.classes == CIFAR10_CLASSES
    assert torch.bincount(ds.y_train).tolist() == [4] * 10
    assert ds.source == str(tmp_path / "d" / "cifar10-jpeg.tar.gz") and ds.checksum_status == "none"
    # The same tarball loaded by path shares the cache (keyed by content, not by name).
    n_cache = len(_cache_files(Path(os.environ["CIFARLAB_CACHE"])))
    assert load_dataset(tmp_path / "d" / "cifar10-jpeg.tar.gz").name == "cifar10-jpeg"
    assert len(_cache_files(Path(os.environ["CIFARLAB_CACHE"]))) == n_cache


def test_cifar10_jpeg_copy_with_wrong_classes(tmp_path) -> None:
    t = write_imagefolder(tmp_path / "d" / "cifar10-jpeg")
    with pytest.raises(DataError, match="does not look like CIFAR-10"):
        load_dataset("cifar10", t.root.parent, download=False)


# -- splits and statistics -------------------------------------------------------------------------


def test_split_sizes_disjoint_deterministic() -> None:
    tr, va = split_indices(103, 0.2, seed=5)
    assert len(va) == round(103 * 0.2) == 21 and len(tr) == 82
    assert tr.dtype == va.dtype == torch.int64
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(103))
    tr2, va2 = split_indices(103, 0.2, seed=5)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert not torch.equal(va, split_indices(103, 0.2, seed=6)[1])
    tr0, va0 = split_indices(10, 0.0, seed=0)
    assert len(va0) == 0 and tr0.tolist() == list(range(10))


def test_split_stratified() -> None:
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[perm]
    tr, va = split_indices(100, 0.2, seed=1, labels=labels)
    assert torch.bincount(labels[va], minlength=3).tolist() == [10, 6, 4]
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(100))
    assert torch.equal(va, split_indices(100, 0.2, seed=1, labels=labels)[1])
    # Uneven quotas: the total is still round(n * f) and each class is within one of its share.
    labels = torch.arange(7).repeat_interleave(torch.tensor([3, 5, 7, 2, 9, 4, 1]))
    tr, va = split_indices(len(labels), 0.3, seed=0, labels=labels)
    assert len(va) == round(31 * 0.3)
    share = torch.bincount(labels, minlength=7).double() * 0.3
    assert ((torch.bincount(labels[va], minlength=7) - share).abs() < 1).all()


def test_split_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        split_indices(10, 1.0, 0)
    with pytest.raises(ConfigError):
        split_indices(10, -0.1, 0)
    with pytest.raises(ConfigError):
        split_indices(10, 0.2, 0, labels=torch.zeros(9, dtype=torch.long))


def test_channel_stats_matches_float_math() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (20, 3, 8, 8), generator=g, dtype=torch.uint8)
    x[:, 2] //= 4
    mean, std = channel_stats(x)
    xf = x.double() / 255
    np.testing.assert_allclose(mean, xf.mean(dim=(0, 2, 3)).tolist(), atol=1e-12)
    np.testing.assert_allclose(std, xf.std(dim=(0, 2, 3), unbiased=False).tolist(), atol=1e-9)


# -- BatchLoader -----------------------------------------------------------------------------------


def _indexed_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Image i holds value i % 256 everywhere and label i: every batch can be traced back to its indices.
    x = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    return x, torch.arange(n)


def test_loader_covers_every_sample_once() -> None:
    x, y = _indexed_images(103)
    loader = BatchLoader(x, y, 10, shuffle=True, seed=3)
    assert len(loader) == 11
    seen = []
    for xb, yb in loader.epoch(0):
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64
        assert torch.allclose(xb[:, 0, 0, 0], (yb % 256).float() / 255)  # images and labels stay paired
        seen += yb.tolist()
    assert sorted(seen) == list(range(103)) and seen != list(range(103))
    dropped = BatchLoader(x, y, 10, shuffle=True, drop_last=True)
    assert len(dropped) == 10 and sum(len(yb) for _, yb in dropped.epoch(0)) == 100
    ordered = [yb.tolist() for _, yb in BatchLoader(x, y, 50).epoch(7)]
    assert ordered == [list(range(50)), list(range(50, 100)), [100, 101, 102]]


def test_loader_order_is_a_function_of_seed_and_epoch() -> None:
    x, y = _indexed_images(64)

    def order(seed: int, epoch: int) -> list[int]:
        return torch.cat([yb for _, yb in BatchLoader(x, y, 16, shuffle=True, seed=seed).epoch(epoch)]).tolist()

    assert order(0, 3) == order(0, 3)  # a fresh loader (a resumed run) sees the same batches
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)
    assert BatchLoader(x, y, 16, shuffle=True).order(3).tolist() == order(0, 3)


def test_loader_normalization_and_layout() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (8, 3, 5, 5), generator=g, dtype=torch.uint8)
    y = torch.zeros(8, dtype=torch.long)
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    [(xb, _)] = list(BatchLoader(x, y, 8, mean=mean, std=std).epoch(0))
    ref = (x.double() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(xb.double(), ref, atol=1e-5)
    [(xb, _)] = list(BatchLoader(x, y, 8).epoch(0))
    assert torch.allclose(xb, x.float() / 255)
    [(xb, _)] = list(BatchLoader(x, y, 8, channels_last=True, dtype=torch.float64).epoch(0))
    assert xb.dtype == torch.float64 and xb.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ConfigError):
        BatchLoader(x, y, 8, mean=mean)
    with pytest.raises(ConfigError):
        BatchLoader(x, y, 0)


def test_loader_transform_gets_generator_and_is_reproducible() -> None:
    x, y = _indexed_images(40)
    calls = []

    def jitter(xb, *, generator, indices, epoch):
        calls.append((indices.clone(), epoch))
        return xb + torch.rand(len(xb), 1, 1, 1, generator=generator)

    def run(epoch: int) -> torch.Tensor:
        loader = BatchLoader(x, y, 8, shuffle=True, seed=2, transform=jitter)
        return torch.cat([xb for xb, _ in loader.epoch(epoch)])

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert calls[0][1] == 1 and len(calls[0][0]) == 8


def test_loader_progressive_resizing_averages_after_the_transform() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 12), generator=g, dtype=torch.uint8)
    y = torch.arange(6)
    seen = []

    def flip(xb, *, generator, indices, epoch):
        seen.append(tuple(xb.shape[-2:]))  # the transform works on full-size images
        return xb.flip(-1)

    loader = BatchLoader(x, y, 6, transform=flip, channels_last=True, scales=(0.5, 0.75, 1.0))
    assert [loader.image_size(e) for e in range(4)] == [(4, 6), (6, 9), (8, 12), (8, 12)]  # the last scale holds
    [(half, _)] = list(loader.epoch(0))
    full = x.float().flip(-1) / 255
    # 0.5: each output pixel is the mean of a 2x2 block of the flipped image
    assert torch.allclose(half, full.unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2)), atol=1e-6)
    assert half.is_contiguous(memory_format=torch.channels_last)
    [(same, _)] = list(loader.epoch(5))
    assert torch.equal(same, full) and seen == [(8, 12), (8, 12)]
    with pytest.raises(ConfigError, match="train_scales"):
        BatchLoader(x, y, 6, scales=(0.5, 0.0))


# -- figure and CLI --------------------------------------------------------------------------------


def test_sample_grid_figure() -> None:
    x, _ = _indexed_images(30)
    x = x.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)  # 32x32
    y = torch.arange(30) % 3
    names = ("a", "b", "$\\notacommand$")  # a folder name, not mathtext (which could not draw it)
    fig = sample_grid_figure(x, y, names, per_class=4, seed=1)
    (ax,) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == list(names)
    mosaic = ax.get_images()[0].get_array()
    assert mosaic.shape == (3 * 34 - 2, 4 * 34 - 2, 3)
    fig.savefig(io.BytesIO(), format="png")


@pytest.fixture
def cli():
    """The `data` commands through the real parser and runner (built without the other commands, so these
    tests do not depend on them)."""
    from cifarlab.cli import build_parser
    from cifarlab.cli.common import run_command

    def main(argv: list[str]) -> int:
        args = build_parser(["data"]).parse_args(argv)
        return run_command(args.func, args)

    return main


def test_cli_info(cli, tiny_cifar10, capsys) -> None:
    assert cli(["data", "info", "--data-dir", str(tiny_cifar10.data_dir)]) == 0
    out, err = capsys.readouterr()
    assert str(tiny_cifar10.path) in out and tiny_cifar10.md5 in out and "NOT the official" in out
    assert "warning:" in err and "MD5" in err  # said once, on stderr
    for name in CIFAR10_CLASSES:
        assert name in out
    assert re.search(r"^total\s+50\s+10$", out, re.M)
    assert "mean" in out and "std" in out
    assert cli(["data", "info", "--json", "--data-dir", str(tiny_cifar10.data_dir)]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["train_counts"]["cat"] == int((tiny_cifar10.y_train == 3).sum())
    assert facts["x_train_shape"] == [50, 3, 32, 32] and facts["checksum_status"] == "not official"
    np.testing.assert_allclose(facts["pixel_mean"], tiny_cifar10.x_train.mean(axis=(0, 2, 3)) / 255, atol=1e-9)


def test_cli_info_uses_env_data_dir_and_reports_errors(cli, tiny_cifar10, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CIFARLAB_DATA", str(tiny_cifar10.data_dir))
    assert cli(["data", "info"]) == 0
    assert str(tiny_cifar10.path) in capsys.readouterr().out
    assert cli(["data", "info", "--no-download", "--data-dir", str(tmp_path / "nowhere")]) == 2
    assert "error: cifar10 not found" in capsys.readouterr().err


def test_cli_preview(cli, tiny_imagefolder, tmp_path, capsys) -> None:
    from PIL import Image

    out = tmp_path / "figs" / "p.png"
    rc = cli(["data", "preview", "--dataset", str(tiny_imagefolder.root), "--out", str(out), "--per-class", "3"])
    assert rc == 0 and "wrote" in capsys.readouterr().out
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100


@pytest.mark.parametrize("cmd", [["data", "info"], ["data", "preview"]])
def test_cli_help_has_example(cli, cmd, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli([*cmd, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"cifarlab {' '.join(cmd)}" in out and "--data-dir" in out


def test_errors_are_user_errors() -> None:
    assert issubclass(DataError, UserError)


# -- real data (slow) ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_DATA / "cifar10-jpeg.tar.gz").is_file(), reason=f"{SHARED_DATA} is absent")
@pytest.mark.long
def test_real_cifar10_both_paths(tmp_path, monkeypatch) -> None:
    # Never pollute the shared folder or ~/.cache.
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    jpeg = load_dataset("cifar10", SHARED_DATA, download=False)
    # The official-layout archive, written by the shared build script from these same pixels: its read_split()
    # would decode the 60,000 JPEGs a second time (the slow half of this test), and its gzip level 9 compresses
    # 180 MB for nothing here: level 0 still writes (and the loader still reads) a real gzip stream, in stored
    # blocks, ~10 s sooner than level 1. What it writes (batches, pickles, layout, shuffle) is the script's own code.
    build = _import_file(SHARED_DATA / "build_cifar10.py")
    nhwc = {s: (getattr(jpeg, f"x_{s}").permute(0, 2, 3, 1).numpy(), getattr(jpeg, f"y_{s}").numpy()) for s in SPLITS}
    monkeypatch.setattr(build, "read_split", lambda src: nhwc)
    fast_gzip = functools.partial(tarfile.open, compresslevel=0)
    monkeypatch.setattr(build, "tarfile", types.SimpleNamespace(open=fast_gzip, TarInfo=tarfile.TarInfo))
    monkeypatch.setattr(sys, "argv", ["build_cifar10.py", str(tmp_path / "built")])
    build.main()
    built = load_dataset("cifar10", tmp_path / "built", download=False)  # logs: MD5 is not the official one
    for ds in (jpeg, built):
        assert ds.classes == CIFAR10_CLASSES
        assert tuple(ds.x_train.shape) == (50000, 3, 32, 32) and tuple(ds.x_test.shape) == (10000, 3, 32, 32)
        assert torch.bincount(ds.y_train).tolist() == [5000] * 10
        assert torch.bincount(ds.y_test).tolist() == [1000] * 10
        mean, _ = channel_stats(ds.x_train)
        np.testing.assert_allclose(mean, (0.491, 0.482, 0.447), atol=0.01)
    # Same pictures, image for image: the script shuffles each split with a fixed seed (0 train, 1 test).
    for split, seed in (("train", 0), ("test", 1)):
        x, y = getattr(jpeg, f"x_{split}"), getattr(jpeg, f"y_{split}")
        perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
        assert torch.equal(getattr(built, f"x_{split}"), x[perm]) and torch.equal(getattr(built, f"y_{split}"), y[perm])
    assert not any((SHARED_DATA / n).exists() for n in ("cifarlab-cache",))


SPLITS = ("train", "test")


def _import_file(path: Path) -> types.ModuleType:
    """The module in `path`, run from its source: an import through the file loader would write a __pycache__
    folder beside it (the test command turns bytecode on), into the shared data folder."""
    module = types.ModuleType(path.stem)
    module.__file__ = str(path)
    exec(compile(path.read_text(), str(path), "exec"), module.__dict__)
    return module


# -- data info / preview (QA session 16) ---------------------------------------------------------------------------


def test_cli_preview_of_a_split_where_a_class_has_no_images(cli, tmp_path, capsys) -> None:
    """A class may lack test images: its row stays blank and the line says which (it was 'per_class must be >= 1,
    got 0', though --per-class was 2)."""
    import shutil

    from PIL import Image

    folder = write_imagefolder(tmp_path / "nf")
    shutil.rmtree(folder.root / "test" / "frog")
    out = tmp_path / "nf.png"
    argv = ["data", "preview", "--dataset", str(folder.root), "--split", "test", "--per-class", "2"]
    assert cli([*argv, "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "3 classes x 2 images" in said and "no test images of frog" in said
    with Image.open(out) as img:
        assert img.format == "PNG"


def test_cli_preview_replaces_only_its_own_kind_of_file(cli, tiny_imagefolder, tmp_path, capsys) -> None:
    """--out may replace an image of the kind it writes (an earlier preview), never a text file that happens to be
    named .png; and a folder marked read-only is not written into, even by root (the cache's `writable_dir`)."""
    argv = ["data", "preview", "--dataset", str(tiny_imagefolder.root), "--per-class", "1", "--out"]
    notes = tmp_path / "notes.png"
    notes.write_text("my notes")
    assert cli([*argv, str(notes)]) == 2
    assert "is not a PNG image; it is left as it is" in capsys.readouterr().err
    assert notes.read_text() == "my notes"
    grid = tmp_path / "grid.png"
    assert cli([*argv, str(grid)]) == 0 and cli([*argv, str(grid)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"replaced {grid}")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for out in (locked / "p.png", locked / "new" / "p.png"):
            assert cli([*argv, str(out)]) == 2
            assert f"{locked} is read-only" in capsys.readouterr().err
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_cli_info_escapes_class_names(cli, tmp_path, capsys) -> None:
    """A class folder named with a terminal escape sequence is shown escaped, as predict and evaluate show it."""
    name = "fr\x1b[31mog"
    write_imagefolder(tmp_path / "uc", {"cat": (200, 30, 40), name: (90, 70, 220)})
    assert cli(["data", "info", "--dataset", str(tmp_path / "uc")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "fr\\x1b[31mog" in out
