"""The decode cache shrinks: when a source is edited, the cache file of its previous version is removed, unless
another source still reads it, the folder is read-only, or it may be newer than this process's version (another
process, a torchrun rank, read the source later). Each test fails on the code before the fix (the cache only
grew)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarlab.data import load_dataset
from cifarlab.data.cache import SOURCES_DIR, CacheSource, cache_source, cached, read_cache
from conftest import write_imagefolder


def _cache() -> Path:
    return Path(os.environ["CIFARLAB_CACHE"])


def _files() -> set[str]:
    return {p.name for p in _cache().glob("*.safetensors")}


def _edit(root: Path, colour: tuple[int, int, int] = (1, 2, 3)) -> None:
    """Redraw one training image: the folder's checksum, so its cache file, changes."""
    Image.new("RGB", (16, 16), colour).save(root / "train" / "cat" / "b_small.png")


def _freed(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("freed ")]


def test_editing_a_folder_removes_the_cache_file_of_its_previous_version(tmp_path: Path, caplog) -> None:
    t = write_imagefolder(tmp_path / "tree")
    first = load_dataset(t.root)
    (old,) = _files()
    _edit(t.root)
    with caplog.at_level(logging.INFO, logger="cifarlab"):
        edited = load_dataset(t.root)
    assert edited.checksum != first.checksum
    assert _files() == {f"imagefolder-{edited.checksum}-32px-v4.safetensors"}
    (line,) = _freed(caplog)
    assert old in line and str(t.root) in line and " MB " in line and "\n" not in line
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cifarlab"):
        load_dataset(t.root)  # unchanged: a cache hit, nothing removed, nothing said
    assert _files() == {f"imagefolder-{edited.checksum}-32px-v4.safetensors"} and not _freed(caplog)


def test_a_file_another_source_reads_is_kept_until_no_source_reads_it(tmp_path: Path) -> None:
    """A copy of a folder has the same checksum, so it shares the cache file: editing one copy must not take the
    file from the other (whose next load would decode everything again)."""
    a = write_imagefolder(tmp_path / "a").root
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shared = load_dataset(a).checksum
    assert load_dataset(b).checksum == shared and len(_files()) == 1
    _edit(a)
    edited_a = load_dataset(a).checksum
    assert _files() == {f"imagefolder-{c}-32px-v4.safetensors" for c in (shared, edited_a)}
    _edit(b, (9, 9, 9))
    edited_b = load_dataset(b).checksum  # nothing reads the shared file now
    assert _files() == {f"imagefolder-{c}-32px-v4.safetensors" for c in (edited_a, edited_b)}


def test_other_image_sizes_and_tarballs_of_the_folder_are_kept(tmp_path: Path) -> None:
    t = write_imagefolder(tmp_path / "tree")
    load_dataset(t.root, image_size=16)
    load_dataset(t.root)
    _edit(t.root)
    now = load_dataset(t.root).checksum
    names = _files()
    assert f"imagefolder-{now}-32px-v4.safetensors" in names and len(names) == 2
    assert any("-16px-" in n for n in names)  # another decode setting: another source


def test_a_read_only_cache_folder_is_left_alone(tmp_path: Path, caplog) -> None:
    t = write_imagefolder(tmp_path / "tree")
    load_dataset(t.root)
    before = _files()
    _cache().chmod(0o555)  # read-only by its mode bits, which cifarlab honours even as root
    try:
        _edit(t.root)
        with caplog.at_level(logging.WARNING, logger="cifarlab"):
            load_dataset(t.root)
    finally:
        _cache().chmod(0o755)
    assert _files() == before and "is not writable" in caplog.text


def test_files_written_before_the_records_existed_are_never_removed(tmp_path: Path) -> None:
    t = write_imagefolder(tmp_path / "tree")
    load_dataset(t.root)
    shutil.rmtree(_cache() / SOURCES_DIR)  # as an older cifarlab left it: which source it was is unknown
    before = _files()
    _edit(t.root)
    load_dataset(t.root)
    assert before < _files() and len(_files()) == 2


def test_a_record_is_never_read_as_leave_to_remove_another_file(tmp_path: Path) -> None:
    """A record is trusted only to name a cache file cifarlab wrote (a safetensors file that says it was written
    under that name), in the cache folder itself."""
    t = write_imagefolder(tmp_path / "tree")
    load_dataset(t.root)
    (record,) = (_cache() / SOURCES_DIR).glob("*.json")
    keep = {"data.tar.gz": b"an archive beside the cache", "x.safetensors": b"not a cache file"}
    for name, data in keep.items():
        (_cache() / name).write_bytes(data)
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    for name in ("data.tar.gz", "x.safetensors", "../outside.safetensors"):
        saved = json.loads(record.read_text())
        record.write_text(json.dumps({**saved, "file": name}))
        _edit(t.root, (len(name), 0, 0))
        load_dataset(t.root)
    assert all((_cache() / n).read_bytes() == d for n, d in keep.items())
    assert (tmp_path / "outside.safetensors").exists()


def test_a_removal_that_fails_only_warns(tmp_path: Path, monkeypatch, caplog) -> None:
    t = write_imagefolder(tmp_path / "tree")
    load_dataset(t.root)
    (old,) = _files()
    real_unlink = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name == old:
            raise PermissionError(13, "Permission denied", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    _edit(t.root)
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        ds = load_dataset(t.root)
    assert len(ds.y_train) > 0 and old in _files()
    (line,) = [r.getMessage() for r in caplog.records if r.name == "cifarlab.data.cache"]
    assert line.startswith(f"could not remove the older cache file {_cache() / old} (PermissionError")


# -- processes that read the source at different times (torchrun ranks, two jobs) ------------------------------------


def _arrays(value: int) -> dict:
    x = np.full((2, 3, 4, 4), value, np.uint8)
    y = np.array([0, 1])
    return {"x_train": x, "y_train": y, "x_test": x.copy(), "y_test": y[::-1].copy(), "classes": ("a", "b")}


def test_only_a_version_read_before_this_one_is_removed(tmp_path: Path) -> None:
    """Process B read the source (already edited) after process A began reading the old version, and cached the
    new version first: A's later write must neither remove B's file nor record A's older one as the source's."""
    src = tmp_path / "src"
    src.mkdir()
    start_a = time.time() - 10  # A began reading first
    b = cache_source("kind", src, "s")
    cached(_cache() / "k-new.safetensors", lambda: _arrays(2), b)
    a = cache_source("kind", src, "s", read_at=start_a)
    got, _ = cached(_cache() / "k-old.safetensors", lambda: _arrays(1), a)
    assert int(got["x_train"][0, 0, 0, 0]) == 1  # A still gets its own data
    assert _files() == {"k-new.safetensors", "k-old.safetensors"}
    (record,) = (_cache() / SOURCES_DIR).glob("*.json")
    assert json.loads(record.read_text())["file"] == "k-new.safetensors"
    # Ranks reading what one process wrote change nothing; a later version removes the one before it.
    for _ in range(2):
        cached(_cache() / "k-new.safetensors", lambda: pytest.fail("decoded again"), cache_source("kind", src, "s"))
    assert _files() == {"k-new.safetensors", "k-old.safetensors"}
    cached(_cache() / "k-newer.safetensors", lambda: _arrays(3), cache_source("kind", src, "s"))
    assert _files() == {"k-old.safetensors", "k-newer.safetensors"}


def test_a_cache_file_removed_while_being_opened_reads_as_absent(tmp_path: Path, monkeypatch, caplog) -> None:
    """Another process removed the file between the stat and the open: decode again, quietly (it is not damaged)."""
    import safetensors

    path = _cache() / "k.safetensors"
    cached(path, lambda: _arrays(1), CacheSource("kind:s:/x", "/x"))

    def gone(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(safetensors, "safe_open", gone)
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        assert read_cache(path) is None
    assert not caplog.records and path.exists()
