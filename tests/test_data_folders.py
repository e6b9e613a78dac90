"""ImageFolder trees as data a run depends on: their checksum (a fingerprint of paths and contents, so a resume or
an evaluation notices changed images), the class rules (every class trained, at least two), test-only trees for
`evaluate --test-data`, and data folders named by --data-dir / $CIFARLAB_DATA that must exist."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from _synth import TINY_ARGS, write_image_folder
from cifarlab.data import OFFICIAL, load_dataset
from cifarlab.errors import DataError, UserError
from conftest import tar_tree

FOLDER_KIND = "md5 of image files (paths and contents)"


def _tree(root: Path, n_train: int = 3, n_test: int = 2, n_classes: int = 3) -> Path:
    return write_image_folder(root, n_train, n_test, n_classes)


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name(a.name + ".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr("cifarlab.data.imagefolder._decode_entries", boom)


def _cache_files() -> list[str]:
    import os

    cache = Path(os.environ["CIFARLAB_CACHE"])
    return sorted(p.name for p in cache.glob("*.safetensors")) if cache.is_dir() else []


# -- the checksum of a folder ----------------------------------------------------------------------------------------


def test_folder_checksum_follows_labels_and_pixels_not_location(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    root = _tree(tmp_path / "a" / "tree")
    ds = load_dataset(root)
    assert ds.checksum_kind == FOLDER_KIND and len(ds.checksum) == 32

    # The same images elsewhere, under another name: the same checksum, and the cache (keyed by it) still hits.
    moved = tmp_path / "b" / "renamed"
    shutil.copytree(root, moved)
    with monkeypatch.context() as m:
        _no_decoding(m)
        again = load_dataset(moved)
    assert again.checksum == ds.checksum and again.name == "renamed" and torch.equal(again.x_train, ds.x_train)
    # An ignored val/ beside test/ is not part of the data.
    shutil.copytree(moved / "test", moved / "val")
    assert load_dataset(moved).checksum == ds.checksum

    # Two classes' training images swapped: same counts, same file names, other labels.
    _swap(moved / "train" / "class0", moved / "train" / "class1")
    swapped = load_dataset(moved)
    assert swapped.checksum != ds.checksum and not torch.equal(swapped.x_train, ds.x_train)
    _swap(moved / "train" / "class0", moved / "train" / "class1")
    assert load_dataset(moved).checksum == ds.checksum

    # One image redrawn in place (same name, same size on disk): another checksum, and it is decoded afresh.
    img = moved / "test" / "class2" / sorted(p.name for p in (moved / "test" / "class2").iterdir())[0]
    pixels = np.asarray(Image.open(img)).copy()
    pixels[0, 0] ^= 0xFF
    Image.fromarray(pixels).save(img)
    edited = load_dataset(moved)
    assert edited.checksum != ds.checksum and not torch.equal(edited.x_test, ds.x_test)
    # The original (a/tree reads it too, so it stays) and the edited tree: the swapped tree's file was removed
    # when `moved` went back to the original's.
    assert _cache_files() == sorted(f"imagefolder-{c}-32px-v4.safetensors" for c in (ds.checksum, edited.checksum))


# -- resume and evaluate notice a changed folder ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """(run folder, its ImageFolder): one finished 1-epoch run (it keeps its checkpoint, so it can be prepared for
    a resume). The module's tests change the folder only inside `_changed`, which puts it back."""
    from cifarlab import cli

    base = tmp_path_factory.mktemp("folder-run")
    folder = write_image_folder(base / "tree", 12, 4, 3)
    with pytest.MonkeyPatch.context() as m:  # the autouse isolation is function-scoped: isolate this one too
        m.setenv("CIFARLAB_CACHE", str(base / "cache"))
        m.setenv("CIFARLAB_DATA", str(base / "data"))
        argv = ["train", *TINY_ARGS, "--set", "epochs=1", "--set", f"dataset={folder}"]
        assert cli.main([*argv, "--runs-dir", str(base / "runs"), "--no-report"]) == 0
    (run,) = (base / "runs").iterdir()
    yield run, folder


@contextlib.contextmanager
def _changed(folder: Path) -> Iterator[None]:
    """The folder with class0's and class1's training images swapped, then as it was."""
    _swap(folder / "train" / "class0", folder / "train" / "class1")
    try:
        yield
    finally:
        _swap(folder / "train" / "class0", folder / "train" / "class1")


def test_resume_and_evaluate_notice_a_changed_folder(folder_run) -> None:
    from cifarlab.evaluate import check_dataset
    from cifarlab.experiment import prepare
    from cifarlab.runs import load_run

    run, folder = folder_run
    saved = json.loads((run / "config.json").read_text())["dataset"]
    assert saved["checksum"] == load_dataset(folder).checksum != ""
    prepare(resume=run)  # the same images: accepted
    assert check_dataset(load_run(run), load_dataset(folder)).checksum_matches_run is True
    with _changed(folder):
        with pytest.raises(UserError, match=r"cannot resume .*dataset checksum"):
            prepare(resume=run)
        assert check_dataset(load_run(run), load_dataset(folder)).mismatch  # evaluate and report warn


def test_a_run_from_before_folder_checksums_still_resumes(folder_run, tmp_path) -> None:
    from cifarlab.experiment import prepare

    run, _ = folder_run
    old = shutil.copytree(run, tmp_path / "old-run")
    config = json.loads((old / "config.json").read_text())
    config["dataset"]["checksum"] = ""  # what an ImageFolder run stored before
    (old / "config.json").write_text(json.dumps(config))
    prepare(resume=old)


def test_evaluate_test_data_reads_a_folder_with_only_test(folder_run, tmp_path) -> None:
    from cifarlab.evaluate import load_test_data
    from cifarlab.runs import load_run

    run, folder = folder_run
    only = tmp_path / "only-test"
    shutil.copytree(folder / "test", only / "test")
    ds = load_test_data(load_run(run), only)
    assert len(ds.y_test) == 12 and len(ds.y_train) == 0


# -- every class trained, at least two -------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["folder", "tarball"])
def test_a_class_without_training_images_is_refused(tmp_path: Path, source: str) -> None:
    root = _tree(tmp_path / "t")  # class0..class2
    shutil.rmtree(root / "train" / "class2")
    (root / "test" / "class1").rename(root / "test" / "zebra")  # test/ has class0, class2, zebra
    path = root if source == "folder" else tar_tree(root, tmp_path / "t.tar.gz")
    with pytest.raises(DataError, match=r"classes class2, zebra have no training images") as info:
        load_dataset(path)
    assert "\n" not in str(info.value)
    assert _cache_files() == []  # nothing was cached
    # As a test set only, the same tree is fine: its test classes, no train split.
    ds = load_dataset(path, test_only=True)
    assert ds.classes == ("class0", "class2", "zebra") and len(ds.y_train) == 0 and len(ds.y_test) == 6


def test_a_single_class_is_refused(tmp_path: Path) -> None:
    root = _tree(tmp_path / "one", n_classes=1)
    with pytest.raises(DataError, match=r"has 1 class \(class0\): a classifier needs at least 2 class folders"):
        load_dataset(root)


def test_a_cache_written_before_the_class_rules_is_checked_too(tmp_path: Path) -> None:
    from cifarlab.data import imagefolder
    from cifarlab.data.cache import resolve_cache_dir, write_cache

    root = _tree(tmp_path / "t")
    shutil.rmtree(root / "train" / "class2")
    # The tree's cache file as an older cifarlab could have written it (class2 untrained), under today's key.
    test_set = load_dataset(root, test_only=True)
    key = imagefolder.folder_fingerprint(imagefolder._scan_folder(root)[1])
    old = {
        "classes": test_set.classes,
        "x_train": test_set.x_test[:2].clone(),
        "y_train": torch.tensor([0, 1]),
        "x_test": test_set.x_test,
        "y_test": test_set.y_test,
    }
    assert write_cache(resolve_cache_dir() / f"imagefolder-{key}-32px-v{imagefolder._CACHE_VERSION}.safetensors", old)
    with pytest.raises(DataError, match="class class2 has no training images"):
        load_dataset(root)


# -- test-only trees (evaluate --test-data) --------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["folder", "tarball"])
def test_test_only_needs_no_train_folder_and_decodes_no_training_image(tmp_path: Path, source: str) -> None:
    root = _tree(tmp_path / "t")
    full = load_dataset(root)
    (root / "train" / "class0" / "zz.png").write_bytes(b"not a png")  # would fail if train/ were decoded
    path = root if source == "folder" else tar_tree(root, tmp_path / "t.tar.gz")
    ds = load_dataset(path, test_only=True)
    assert ds.classes == full.classes and torch.equal(ds.x_test, full.x_test) and torch.equal(ds.y_test, full.y_test)
    assert tuple(ds.x_train.shape) == (0, 3, 32, 32) and ds.y_train.dtype == torch.int64
    again = load_dataset(path, test_only=True)  # from its own cache file
    assert torch.equal(again.x_test, full.x_test) and len(again.y_train) == 0

    shutil.rmtree(root / "train")
    path = root if source == "folder" else tar_tree(root, tmp_path / "t2.tar.gz")
    assert torch.equal(load_dataset(path, test_only=True).x_test, full.x_test)
    with pytest.raises(DataError, match="has no train/ images"):
        load_dataset(path)  # to train on, train/ is still needed
    if source == "folder":  # the test folder itself, <class>/<image>, is a test set too
        alone = load_dataset(root / "test", test_only=True)
        assert alone.classes == full.classes and torch.equal(alone.x_test, full.x_test)
    shutil.rmtree(root / "test")
    if source == "folder":
        (root / "val" / "a").mkdir(parents=True)
        with pytest.raises(DataError, match=r"no images found"):
            load_dataset(root, test_only=True)


# -- data folders named by --data-dir / $CIFARLAB_DATA ---------------------------------------------------------------


class _Payload:
    def __init__(self, data: bytes) -> None:
        self.data, self.headers = data, {"Content-Length": str(len(data))}

    def read(self, n: int = -1) -> bytes:
        out, self.data = (self.data, b"") if n < 0 else (self.data[:n], self.data[n:])
        return out


def test_a_named_data_folder_that_does_not_exist_is_an_error(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    opener = calls.append
    missing = tmp_path / "typo"
    with pytest.raises(DataError, match=r"no such folder: .*typo \(--data-dir\); create it first to download cifar10"):
        load_dataset("cifar10", missing, opener=opener)
    monkeypatch.setenv("CIFARLAB_DATA", str(missing))
    with pytest.raises(DataError, match=r"no such folder: .*typo \(\$CIFARLAB_DATA\)"):
        load_dataset("cifar10", opener=opener)
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    with pytest.raises(DataError, match=r"afile \(--data-dir\) is a file, not a folder"):
        load_dataset("cifar10", a_file, opener=opener)
    with pytest.raises(DataError, match=r"afile is not a folder"):
        load_dataset("cifar10", a_file, download=False)
    assert not missing.exists() and calls == []  # nothing created, nothing downloaded


def test_the_default_data_folder_is_created_for_a_download(tiny_cifar10, tmp_path: Path, monkeypatch) -> None:
    payload = tiny_cifar10.path.read_bytes()
    monkeypatch.setitem(OFFICIAL, "cifar10", dataclasses.replace(OFFICIAL["cifar10"], md5=tiny_cifar10.md5))
    monkeypatch.delenv("CIFARLAB_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    home_data = tmp_path / "home" / ".cache" / "cifarlab"
    ds = load_dataset("cifar10", opener=lambda url: _Payload(payload))
    assert ds.source == str(home_data / "cifar-10-python.tar.gz") and ds.checksum_status == "official"
    # Named explicitly, as a resumed run passes the data folder it stored (resolved): still the default.
    shutil.rmtree(tmp_path / "home")
    ds = load_dataset("cifar10", home_data.resolve(), opener=lambda url: _Payload(payload))
    assert ds.source == str(home_data.resolve() / "cifar-10-python.tar.gz")


def test_cli_names_the_missing_data_folder_in_one_line(tmp_path: Path, capsys) -> None:
    from cifarlab.cli import build_parser
    from cifarlab.cli.common import run_command

    args = build_parser(["data"]).parse_args(["data", "info", "--data-dir", str(tmp_path / "nowhere")])
    assert run_command(args.func, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no such folder: ") and err.count("\n") == 1
    assert not (tmp_path / "nowhere").exists()
