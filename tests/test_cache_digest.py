"""The decode cache's content digest, and where a damaged cache file may be removed (QA session 16, findings 3
and 15). Each test fails on the code before the fix."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from cifarlab.data import load_dataset
from cifarlab.data.cache import DIGEST_KEY, read_cache, write_cache
from conftest import TinyCifar, write_cifar_archive


def _cache_file() -> Path:
    (path,) = Path(os.environ["CIFARLAB_CACHE"]).glob("*.safetensors")
    return path


def _layout(path: Path) -> tuple[int, dict]:
    """(where the tensor data starts, the safetensors JSON header)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n, json.loads(raw[8 : 8 + n])


def _patch(path: Path, offset: int, new: bytes) -> None:
    """Overwrite bytes in place: the header and the file's size stay as they were."""
    raw = bytearray(path.read_bytes())
    assert raw[offset : offset + len(new)] != new
    raw[offset : offset + len(new)] = new
    path.write_bytes(bytes(raw))


def _damage(path: Path, what: str, n_classes: int) -> None:
    start, header = _layout(path)
    if what == "pixels":  # a run of bytes inside x_train, as a bad sector or a stray write would leave it
        begin = start + header["x_train"]["data_offsets"][0] + 100
        _patch(path, begin, bytes(b ^ 0xFF for b in path.read_bytes()[begin : begin + 64]))
    elif what == "label":  # one label moved to another (valid) class: the label range check cannot see it
        begin = start + header["y_train"]["data_offsets"][0]
        label = int.from_bytes(path.read_bytes()[begin : begin + 8], "little")
        _patch(path, begin, ((label + 1) % n_classes).to_bytes(8, "little"))
    else:  # a class name changed in the metadata, same length, so the JSON still parses
        raw = path.read_bytes()
        begin = raw.index(b"automobile", 8, start)
        _patch(path, begin, b"automobilf")


def _tiny(tmp_path: Path) -> TinyCifar:
    t = write_cifar_archive(tmp_path / "d")
    load_dataset("cifar10", t.data_dir)  # writes the cache file
    return t


def _assert_true_data(ds, t: TinyCifar) -> None:
    np.testing.assert_array_equal(ds.x_train.numpy(), t.x_train)
    np.testing.assert_array_equal(ds.y_train.numpy(), t.y_train)
    assert ds.classes == t.classes


def _cache_notes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cifarlab.data.cache" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("what", ["pixels", "label", "class name"])
def test_damage_inside_the_arrays_is_noticed_and_rebuilt_with_one_warning(tmp_path, caplog, what) -> None:
    t = _tiny(tmp_path)
    path = _cache_file()
    _damage(path, what, len(t.classes))
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        ds = load_dataset("cifar10", t.data_dir)
    _assert_true_data(ds, t)  # decoded again from the archive, not the damaged copy
    notes = _cache_notes(caplog)
    assert len(notes) == 1 and str(path) in notes[0] and "CRC32" in notes[0] and "\n" not in notes[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        _assert_true_data(load_dataset("cifar10", t.data_dir), t)  # the rebuilt file reads back silently
    assert _cache_notes(caplog) == []


def test_a_cache_file_from_before_digests_is_rebuilt_once_quietly(tmp_path, caplog) -> None:
    from safetensors.torch import save

    t = _tiny(tmp_path)
    path = _cache_file()
    arrays = {k: torch.from_numpy(getattr(t, k)) for k in ("x_train", "y_train", "x_test", "y_test")}
    path.write_bytes(save(arrays, metadata={"classes": json.dumps(list(t.classes))}))  # the old format
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        _assert_true_data(load_dataset("cifar10", t.data_dir), t)
    assert _cache_notes(caplog) == []  # not damaged: just written by an older cifarlab
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert DIGEST_KEY in (f.metadata() or {})  # rewritten with its digest


def test_a_damaged_cache_file_in_a_read_only_folder_is_left_in_place(tmp_path) -> None:
    """Root ignores a folder's r-x mode: the file used to be unlinked from a folder marked read-only."""
    t = _tiny(tmp_path)
    path = _cache_file()
    _damage(path, "pixels", len(t.classes))
    damaged = path.read_bytes()
    folder = path.parent
    folder.chmod(0o555)
    try:
        _assert_true_data(load_dataset("cifar10", t.data_dir), t)
        assert path.read_bytes() == damaged  # neither removed nor rewritten
    finally:
        folder.chmod(0o755)


def test_a_fresh_file_renamed_over_a_damaged_one_is_not_deleted(tmp_path) -> None:
    """Process A judges the file damaged; before A removes it, process B renames a good file into place. A used
    to unlink B's good file."""
    t = _tiny(tmp_path)
    path = _cache_file()
    read = read_cache(path)
    assert read is not None
    good = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in read.items()}  # not the file's pages
    _damage(path, "label", len(t.classes))

    class ProcessB(logging.Handler):  # runs when A logs its "damaged" warning, before A removes anything
        def emit(self, record: logging.LogRecord) -> None:
            assert write_cache(path, good)

    logger = logging.getLogger("cifarlab.data.cache")
    handler = ProcessB(logging.WARNING)
    logger.addHandler(handler)
    try:
        assert read_cache(path) is None  # A: the file it read was damaged
    finally:
        logger.removeHandler(handler)
    again = read_cache(path)  # B's file is still there and whole
    assert again is not None
    np.testing.assert_array_equal(again["y_train"].numpy(), t.y_train)


def test_a_cache_file_renamed_over_another_sources_is_noticed(tmp_path, caplog) -> None:
    """Two sources' cache files swapped (or one copied over the other's name): each held intact arrays with a right
    digest, and each source loaded the other's images without a word (QA round 3). The file records its name."""
    a = write_cifar_archive(tmp_path / "a", n_per_batch=12, seed=1)
    b = write_cifar_archive(tmp_path / "b", n_per_batch=12, seed=2)
    load_dataset("cifar10", a.data_dir)
    before = set(Path(os.environ["CIFARLAB_CACHE"]).glob("*.safetensors"))
    load_dataset("cifar10", b.data_dir)
    (file_a,) = before
    (file_b,) = set(Path(os.environ["CIFARLAB_CACHE"]).glob("*.safetensors")) - before
    swap = file_a.with_suffix(".swap")
    file_a.rename(swap)
    file_b.rename(file_a)
    swap.rename(file_b)
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        _assert_true_data(load_dataset("cifar10", a.data_dir), a)
    notes = _cache_notes(caplog)
    assert len(notes) == 1 and "another source's cache" in notes[0]
