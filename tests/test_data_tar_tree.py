"""An ImageFolder tarball reads like the folder extracting it leaves: a name stored twice is its last copy, counted
once, and linked class folders (or links through linked folders) are followed inside the archive as the folder
reader follows them on disk, with its guards (a folder read once per class, links back into the tree skipped, and
nothing outside the archive). Each test fails on the code before the fix."""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from cifarlab.data import load_dataset
from cifarlab.data.archives import iter_tar
from conftest import tar_tree, write_imagefolder

SYM, LNK, DIR = tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE


def _png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, "PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, what: bytes | tuple[bytes, str]) -> None:
    """A regular member (bytes), a link member ((SYMTYPE or LNKTYPE, target)) or a folder ((DIRTYPE, ""))."""
    info = tarfile.TarInfo(name)
    if isinstance(what, tuple):
        info.type, info.linkname = what
        tar.addfile(info)
    else:
        info.size = len(what)
        tar.addfile(info, io.BytesIO(what))


def _extracted(archive: Path, dest: Path) -> Path:
    """What extracting the archive leaves (the later of two same-named members replaces the earlier)."""
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="tar")
    return dest


def _same(a, b) -> None:
    assert a.classes == b.classes
    for split in ("train", "test"):
        assert torch.equal(getattr(a, f"x_{split}"), getattr(b, f"x_{split}"))
        assert torch.equal(getattr(a, f"y_{split}"), getattr(b, f"y_{split}"))


def _counts(ds) -> dict[str, int]:
    return dict(zip(ds.classes, torch.bincount(ds.y_train, minlength=len(ds.classes)).tolist(), strict=True))


def _skipped_links(caplog: pytest.LogCaptureFixture, prefix: str) -> list[str]:
    """The links the "skipped a linked folder" warnings name, under `prefix` (the tree's top)."""
    said = [r.getMessage() for r in caplog.records if "skipped a linked folder" in r.getMessage()]
    assert all(m.startswith(prefix) and "its images would all be labelled" in m for m in said)
    return sorted(m.removeprefix(prefix).partition(": skipped")[0].removesuffix(")") for m in said)


# -- 1. a name stored twice ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("again", ["file", "symlink", "hardlink"])
def test_a_name_stored_twice_reads_as_its_last_copy_counted_once(tmp_path: Path, again: str) -> None:
    """`tar -rf` (append) or a careless packer stores one name twice; extraction keeps the last. It was decoded
    twice (one image counted twice, under one label) and the first copy's pixels used too."""
    t = write_imagefolder(tmp_path / "src" / "d")
    archive = tmp_path / "d.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(t.root, arcname="d")
        later = {
            "file": _png((1, 2, 3)),
            "symlink": (SYM, "b_small.png"),
            "hardlink": (LNK, "d/train/dog/b_small.png"),
        }[again]
        _add(tar, "./d/train/cat/a_big.png", later)  # another spelling of the same name, too
    folder = load_dataset(_extracted(archive, tmp_path / "x") / "d")
    tarred = load_dataset(archive)
    assert _counts(tarred) == _counts(folder) == {"cat": 4, "dog": 4, "frog": 4}
    _same(tarred, folder)


def test_a_file_stored_again_as_a_folder_or_a_dangling_link_is_gone(tmp_path: Path, caplog) -> None:
    archive = tmp_path / "g.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        _add(tar, "top/a.png", b"A")
        _add(tar, "top/b.png", b"B")
        _add(tar, "top/c.png", b"C")
        _add(tar, "top/a.png", (DIR, ""))
        _add(tar, "top/b.png", (SYM, "nowhere.png"))
        _add(tar, "top/c.png", b"C2")
    got: dict[str, bytes] = {}
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        for key, data in iter_tar(archive, "", lambda m: m.name if m.name.endswith(".png") else None):
            if data is None:
                got.pop(key, None)
            else:
                got[key] = data
    assert got == {"top/c.png": b"C2"}
    assert "skipped 1 link member that leads to no file in the archive (e.g. top/b.png -> nowhere.png)" in caplog.text


# -- 2. linked folders ---------------------------------------------------------------------------------------------


def test_a_linked_class_folder_reads_like_the_extracted_folder(tmp_path: Path) -> None:
    """`train/cat -> ../other/cat` was dropped from the tarball (cat then had no training images), while the
    extracted folder follows it."""
    t = write_imagefolder(tmp_path / "src" / "lk")
    (t.root / "other").mkdir()
    shutil.move(t.root / "train" / "cat", t.root / "other" / "cat")
    (t.root / "train" / "cat").symlink_to("../other/cat")
    folder = load_dataset(t.root)
    tarred = load_dataset(tar_tree(t.root, tmp_path / "lk.tar.gz"))
    assert _counts(tarred) == _counts(folder) == {"cat": 4, "dog": 4, "frog": 4}
    _same(tarred, folder)


def test_every_class_folder_linked_and_links_through_linked_folders(tmp_path: Path) -> None:
    """No image member sits at a train/<class>/ path at all (the tree's top is found as the folder reader finds
    it), and a file link whose target goes through a linked folder (`via_alias.png -> ../../alias/b_small.png`,
    `alias -> store/dog`) is read too."""
    t = write_imagefolder(tmp_path / "src" / "all")
    store = t.root / "store"
    store.mkdir()
    for cls in t.classes:
        shutil.move(t.root / "train" / cls, store / cls)
        (t.root / "train" / cls).symlink_to(f"../store/{cls}")
    (t.root / "alias").symlink_to("store/dog")
    os.symlink("../../alias/b_small.png", store / "frog" / "via_alias.png")
    folder = load_dataset(t.root)
    tarred = load_dataset(tar_tree(t.root, tmp_path / "all.tar.gz"))
    assert _counts(tarred) == _counts(folder) == {"cat": 4, "dog": 4, "frog": 5}
    _same(tarred, folder)


def test_linked_folders_keep_the_folder_readers_guards(tmp_path: Path, caplog) -> None:
    """Links back into the tree are skipped with a warning (their images would get the wrong label), a folder is
    read once per class folder (a loop ends), a link outside the tree but inside the archive is followed, and one
    outside the archive leads nowhere: as in the extracted folder, except that the archive is never left."""
    pkg = tmp_path / "pkg"
    t = write_imagefolder(pkg / "lp")
    train = t.root / "train"
    (train / "cat" / "loop").symlink_to("..")  # the split folder: every class's images
    (train / "dog" / "up").symlink_to("../../train")
    (train / "frog" / "other").symlink_to("../cat")
    (train / "frog" / "held_out").symlink_to("../../test/frog")  # the test images, as training images
    (train / "cat" / "sub").mkdir()
    shutil.move(train / "cat" / "a_big.png", train / "cat" / "sub" / "a.png")
    (train / "cat" / "alias").symlink_to("sub")  # read once, as alias/ (it sorts first)
    (train / "cat" / "sub" / "back").symlink_to("..")  # the class folder itself: the loop guard ends it
    (pkg / "more_frogs").mkdir()
    shutil.copy(train / "frog" / "b_small.png", pkg / "more_frogs" / "x.png")
    (train / "frog" / "extra").symlink_to("../../../more_frogs")  # outside the tree, inside the archive
    archive = tar_tree(pkg, tmp_path / "pkg.tar.gz")
    with tarfile.open(tmp_path / "esc.tar", "w") as tar:  # the same, with links out of the archive
        tar.add(pkg, arcname="pkg")
        _add(tar, "pkg/lp/train/dog/escape", (SYM, "../../../../../../../" + str(tmp_path).lstrip("/")))
        _add(tar, "pkg/lp/train/dog/abs", (SYM, str(pkg / "more_frogs")))
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        folder = load_dataset(t.root)
    on_disk = _skipped_links(caplog, f"{t.root}/")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        tarred = load_dataset(archive)
    in_archive = _skipped_links(caplog, f"{archive} (member pkg/lp/")
    assert in_archive == on_disk == ["train/cat/loop", "train/dog/up", "train/frog/held_out", "train/frog/other"]
    assert "pkg/lp/train/cat/loop): skipped a linked folder that leads to pkg/lp/train/ in the archive" in caplog.text
    assert _counts(tarred) == _counts(folder) == {"cat": 4, "dog": 4, "frog": 5}
    _same(tarred, folder)
    escaped = load_dataset(tmp_path / "esc.tar", cache_dir=tmp_path / "c2")  # the links out lead nowhere
    assert _counts(escaped) == _counts(folder)
    _same(escaped, folder)
