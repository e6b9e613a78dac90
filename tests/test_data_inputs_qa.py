"""Odd inputs to the dataset loaders (QA round 16): links in tarballs read like the folder they came from,
unreadable folders named instead of read as empty, files beside the class folders and dangling links counted,
linked folders that would mislabel images skipped, a dataset passed as --data-dir refused before any download,
and layout messages that say what is really there."""

from __future__ import annotations

import errno
import io
import logging
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cifarlab.data import load_dataset
from cifarlab.data.archives import iter_tar
from cifarlab.errors import DataError
from conftest import tar_tree, write_cifar_archive, write_imagefolder


def _tar(path: Path, members: list[tuple[str, bytes | tuple[bytes, str]]]) -> Path:
    """A .tar.gz of regular members (name, bytes) and link members (name, (LNKTYPE or SYMTYPE, link name))."""
    with tarfile.open(path, "w:gz") as tar:
        for name, what in members:
            info = tarfile.TarInfo(name)
            if isinstance(what, tuple):
                info.type, info.linkname = what[0], what[1]
                tar.addfile(info)
            else:
                info.size = len(what)
                tar.addfile(info, io.BytesIO(what))
    return path


def _deny(monkeypatch: pytest.MonkeyPatch, *folders: Path) -> None:
    """Listing `folders` fails with EACCES, as for a chmod 000 folder read by a user without CAP_DAC_OVERRIDE
    (root ignores chmod, so the tests cannot rely on it)."""
    real_iterdir, real_scandir = Path.iterdir, os.scandir
    denied = {str(f) for f in folders}

    def iterdir(self: Path) -> Iterator[Path]:
        if str(self) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_iterdir(self)

    def scandir(path: object = ".") -> object:
        if os.fspath(path) in denied:  # type: ignore[arg-type]
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))  # type: ignore[arg-type]
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "iterdir", iterdir)
    monkeypatch.setattr(os, "scandir", scandir)


def _counts(ds) -> dict[str, int]:
    return dict(zip(ds.classes, torch.bincount(ds.y_train, minlength=len(ds.classes)).tolist(), strict=True))


# -- 1. hard and symbolic links in a tarball ----------------------------------------------------------------------


def test_tarball_links_are_read_like_the_folder(tmp_path: Path, caplog) -> None:
    t = write_imagefolder(tmp_path / "hl")
    cat, dog = t.root / "train" / "cat", t.root / "train" / "dog"
    os.link(cat / "a_big.png", cat / "0dup.png")  # sorts first: tar stores a_big.png itself as the link
    os.symlink("c_exact.jpg", dog / "sym.jpg")
    os.symlink("../../../nowhere.png", dog / "dang.png")  # leads nowhere, in the folder and in the tarball
    folder = load_dataset(t.root)
    archive = tar_tree(t.root, tmp_path / "hl.tar.gz")
    with tarfile.open(archive) as tar:
        kinds = {m.name: m.type for m in tar.getmembers()}
    assert kinds["hl/train/cat/a_big.png"] == tarfile.LNKTYPE and kinds["hl/train/dog/sym.jpg"] == tarfile.SYMTYPE
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        tarred = load_dataset(archive)
    assert _counts(tarred) == _counts(folder) == {"cat": 5, "dog": 5, "frog": 4}
    assert torch.equal(tarred.x_train, folder.x_train) and torch.equal(tarred.y_train, folder.y_train)
    assert "skipped 1 link member that leads to no file in the archive" in caplog.text
    assert "hl/train/dog/dang.png -> ../../../nowhere.png" in caplog.text


def test_iter_tar_resolves_links_through_the_archive_and_skips_the_rest(tmp_path: Path, caplog) -> None:
    lnk, sym = tarfile.LNKTYPE, tarfile.SYMTYPE
    archive = _tar(
        tmp_path / "links.tar.gz",
        [
            ("./top/blob", b"B"),  # not selected itself, but a selected hard link's target
            ("./top/a.png", b"A"),
            ("top/hard.png", (lnk, "./top/blob")),
            ("top/sub/rel.png", (sym, "../a.png")),
            ("top/chain.png", (sym, "sub/rel.png")),  # a link to a link
            ("top/later.png", (sym, "z.png")),  # its target comes after it
            ("top/abs.png", (sym, "/etc/passwd")),  # outside the archive: never read
            ("top/out.png", (sym, "../../x.png")),
            ("top/loop.png", (sym, "loop.png")),
            ("top/z.png", b"Z"),
        ],
    )
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        got = dict(iter_tar(archive, "", lambda m: m.name if m.name.endswith(".png") else None))
    assert got == {
        "./top/a.png": b"A",
        "top/z.png": b"Z",
        "top/hard.png": b"B",
        "top/sub/rel.png": b"A",
        "top/chain.png": b"A",
        "top/later.png": b"Z",
    }
    assert "skipped 3 link members that lead to no file in the archive (e.g. top/abs.png -> /etc/passwd)" in caplog.text


# -- 2. unreadable folders -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("locked", ["test/dog", "train/cat/more", "test", "train/dog"])
def test_an_unreadable_folder_is_named_not_read_as_empty(tmp_path: Path, monkeypatch, locked: str) -> None:
    t = write_imagefolder(tmp_path / "u")
    (t.root / "train" / "cat" / "more").mkdir()
    (t.root / "train" / "cat" / "a_big.png").rename(t.root / "train" / "cat" / "more" / "a.png")
    _deny(monkeypatch, t.root / locked)
    with pytest.raises(DataError) as info:
        load_dataset(t.root)
    msg = str(info.value)
    assert msg.startswith(f"cannot read {t.root / locked}: Permission denied; make it readable") and "\n" not in msg
    assert "write" not in msg and "no training images" not in msg


def test_an_unreadable_folder_for_real(tmp_path: Path) -> None:
    t = write_imagefolder(tmp_path / "u")
    locked = t.root / "test" / "dog"
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):
            pytest.skip("this user reads a chmod 000 folder anyway (root)")
        with pytest.raises(DataError, match=r"cannot read .*dog: Permission denied"):
            load_dataset(t.root)
    finally:
        locked.chmod(0o755)


def test_an_unreadable_idx_folder_is_named(tmp_path: Path, monkeypatch) -> None:
    from test_idx import fake_arrays, write_fashion

    root = write_fashion(tmp_path / "u4", fake_arrays())
    real_exists = Path.exists

    def exists(self: Path) -> bool:
        if self.parent == root:  # what stat() inside a folder without x permission gives
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_exists(self)

    monkeypatch.setattr(Path, "exists", exists)
    with pytest.raises(DataError, match=rf"^cannot read {root}: Permission denied; make it readable"):
        load_dataset(root)


# -- 4/8: see test_idx.py; 5. a dataset passed as the data folder -----------------------------------------------------


def test_a_dataset_given_as_data_dir_is_refused_before_any_download(tmp_path: Path, capsys) -> None:
    from cifarlab.cli import build_parser
    from cifarlab.cli.common import run_command
    from test_idx import fake_arrays, write_fashion

    tree = write_imagefolder(tmp_path / "folder").root
    idx_dir = write_fashion(tmp_path / "idx", fake_arrays())
    tried: list[str] = []
    for data_dir, what in ((tree, "an image-folder tree (train/ and test/"), (idx_dir, "MNIST-format IDX files,")):
        for download in (True, False):
            with pytest.raises(DataError) as info:
                load_dataset("cifar10", data_dir, download=download, opener=tried.append)
            msg = str(info.value)
            assert msg.startswith(f"{data_dir} (--data-dir) holds {what}") and ", not cifar10: " in msg
            assert f"--set dataset={data_dir} (train), --dataset {data_dir}" in msg
    assert tried == [] and sorted(p.name for p in tree.iterdir()) == ["test", "train"]  # nothing downloaded there
    args = build_parser(["data"]).parse_args(["data", "info", "--data-dir", str(tree)])
    assert run_command(args.func, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "holds an image-folder tree" in err and err.count("\n") == 1


def test_data_dir_help_says_what_the_option_is(capsys) -> None:
    from cifarlab.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser(["train"]).parse_args(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--data-dir DATA_DIR folder where the named datasets are looked for" in out
    assert "ImageFolder tree);" not in out and "--set dataset=PATH" in out


# -- 13. messages that say what is there ----------------------------------------------------------------------------


def test_loose_images_are_named_as_such(tmp_path: Path) -> None:
    t = write_imagefolder(tmp_path / "tree")
    loose = t.root / "test" / "cat"
    with pytest.raises(DataError, match=rf"^{loose} holds 2 images directly, not in class folders: a test set needs"):
        load_dataset(loose, test_only=True)
    with pytest.raises(DataError, match=rf"^{loose} holds 2 images directly, not in class folders: put them in"):
        load_dataset(loose)


def test_a_renamed_official_archive_says_its_name(tmp_path: Path) -> None:
    t = write_cifar_archive(tmp_path / "d")
    renamed = t.path.rename(tmp_path / "renamed-cifar10.tar.gz")
    with pytest.raises(DataError, match=r"looks like the official cifar10 archive .* rename it cifar-10-python\.tar"):
        load_dataset(renamed)
    assert load_dataset(renamed.rename(tmp_path / "cifar-10-python.tar.gz")).name == "cifar10"


def test_an_extracted_official_folder_is_not_called_a_cache(tiny_cifar10_extracted) -> None:
    ds = load_dataset("cifar10", tiny_cifar10_extracted.data_dir)
    assert ds.cache_dir == "" and ds.source == str(tiny_cifar10_extracted.path)


def test_a_cache_path_that_is_a_file_is_called_a_file(tmp_path: Path, monkeypatch, caplog) -> None:
    a_file = tmp_path / "cachefile"
    a_file.write_text("x")
    monkeypatch.setenv("CIFARLAB_CACHE", str(a_file))
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        ds = load_dataset(write_imagefolder(tmp_path / "tree").root)
    assert ds.cache_dir == "" and f"the cache folder {a_file} is a file, not a folder" in caplog.text


# -- 14. files beside the class folders, dangling links --------------------------------------------------------------


def test_stray_files_and_dangling_links_are_counted(tmp_path: Path, caplog) -> None:
    t = write_imagefolder(tmp_path / "tree")
    (t.root / "train" / "stray.jpg").write_bytes((t.root / "train" / "cat" / "c_exact.jpg").read_bytes())
    os.symlink("gone.jpg", t.root / "train" / "cat" / "dang.jpg")
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        ds = load_dataset(t.root)
    assert len(ds.y_train) == 12
    line = next(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert "1 file that is outside the class folders, so of no class (e.g. " in line and "stray.jpg" in line
    assert "1 image name that is not a regular file (a link that leads nowhere" in line and "dang.jpg" in line
    caplog.clear()
    (t.root / "train" / "cat" / "dang.jpg").unlink()
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        load_dataset(tar_tree(t.root, tmp_path / "tree.tar.gz"))
    assert "tree.tar.gz: skipped 1 file that is outside the class folders" in caplog.text


def test_a_file_name_with_a_newline_keeps_the_warning_on_one_line(tmp_path: Path, caplog) -> None:
    """A name holding a newline (or an escape sequence) split the one-line warning over several (QA round 3)."""
    t = write_imagefolder(tmp_path / "nl")
    (t.root / "train" / "cat" / "x\ny.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        load_dataset(t.root)
    (line,) = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "\n" not in line and "x\\ny.txt" in line


# -- 18. linked folders that would mislabel images ------------------------------------------------------------------


def test_linked_folders_leading_back_into_the_tree_are_skipped(tmp_path: Path, caplog) -> None:
    t = write_imagefolder(tmp_path / "lp")
    train = t.root / "train"
    before = _counts(load_dataset(t.root))
    (train / "cat" / "loop").symlink_to("..")  # the split folder: every class's images
    (train / "dog" / "up").symlink_to("../../train")
    (train / "frog" / "other").symlink_to("../cat")
    (train / "frog" / "held_out").symlink_to("../../test/frog")  # the test images, as training images
    (train / "frog" / "root").symlink_to("/")
    outside = tmp_path / "more_frogs"
    outside.mkdir()
    (outside / "x.png").write_bytes((train / "frog" / "b_small.png").read_bytes())
    (train / "frog" / "extra").symlink_to(outside)  # outside the tree: followed, as documented
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        after = _counts(load_dataset(t.root))
    assert after == {**before, "frog": before["frog"] + 1}
    skipped = [r.getMessage() for r in caplog.records if "skipped a linked folder" in r.getMessage()]
    assert len(skipped) == 5 and all("its images would all be labelled" in m for m in skipped)
    assert any(m.startswith(f"{train / 'frog' / 'root'}:") and "a folder above its class folder" in m for m in skipped)


def test_a_link_within_its_own_class_folder_is_still_followed(tmp_path: Path, caplog) -> None:
    t = write_imagefolder(tmp_path / "t")
    cat = t.root / "train" / "cat"
    (cat / "sub").mkdir()
    (cat / "a_big.png").rename(cat / "sub" / "a.png")
    (cat / "alias").symlink_to("sub")
    (cat / "sub" / "back").symlink_to("..")  # the class folder itself: a loop, ended by the loop guard
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        ds = load_dataset(t.root)
    assert _counts(ds)["cat"] == 4 and "linked folder" not in caplog.text  # sub/ read once, not skipped


@pytest.mark.parametrize("writable", [True, False])
def test_first_time_only_is_said_only_where_the_decode_is_cached(tmp_path: Path, caplog, monkeypatch, writable) -> None:
    """A read-only cache folder decodes on every load, and each load said "(first time only)" (QA round 3)."""
    import cifarlab.data.imagefolder as imagefolder

    t = write_imagefolder(tmp_path / "ro")
    monkeypatch.setattr(imagefolder, "writable_dir", lambda folder: writable)
    with caplog.at_level(logging.INFO, logger="cifarlab"):
        load_dataset(t.root)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("decoding images in")]
    assert ("(first time only)" in line) is writable


def test_a_folder_decoded_again_after_an_edit_does_not_say_first_time_only(tmp_path: Path, caplog) -> None:
    """An edited image folder is decoded again: the line said "(first time only)" again (QA round 17, L11)."""
    from PIL import Image

    t = write_imagefolder(tmp_path / "tinyc")

    def decode_lines() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="cifarlab"):
            load_dataset(t.root)
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("decoding images in")]

    assert decode_lines() == [f"decoding images in {t.root} (first time only)"]
    assert decode_lines() == []  # cached
    Image.new("RGB", (32, 32), (1, 2, 3)).save(t.root / "train" / t.classes[0] / "z_new.png")
    assert decode_lines() == [f"decoding images in {t.root} (again: it changed since it was cached)"]
    # Its cache file removed by hand: decoded again, said without either note.
    for f in Path(os.environ["CIFARLAB_CACHE"]).glob("*.safetensors"):
        f.unlink()
    assert decode_lines() == [f"decoding images in {t.root}"]
