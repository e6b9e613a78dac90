"""User-made image folders (QA round 14): class folders read recursively with the suffixes `predict` reads,
resizing announced, a constant colour channel standardized instead of refused, a validation split that would leave
a class untrained refused, val/ ignored said by `train` too, and layout errors that say what is wrong."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _synth import TINY_ARGS
from cifarlab.data import load_dataset
from cifarlab.errors import DataError
from conftest import tar_tree

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
ROOT = Path(__file__).resolve().parents[1]


def _img(
    path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (32, 32), seed: int = 0, fmt: str | None = None
) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = np.clip(np.array(colour) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format=fmt)


def _tree(root: Path, n_train: int = 4, n_test: int = 2, size: tuple[int, int] = (32, 32), classes=COLOURS) -> Path:
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            for i in range(n):
                _img(root / split / c / f"{i:03d}.png", COLOURS[c], size, seed=i + 100 * (split == "test"))
    return root


def _counts(ds) -> dict[str, int]:
    return dict(zip(ds.classes, torch.bincount(ds.y_train, minlength=len(ds.classes)).tolist(), strict=True))


def _no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr("cifarlab.data.imagefolder._decode_entries", boom)


# -- 1. sub-folders and the suffixes predict reads -------------------------------------------------------------------


def test_class_folders_are_read_recursively_with_predicts_suffixes(tmp_path: Path, caplog) -> None:
    from cifarlab.predict import expand_paths

    root = tmp_path / "nested"
    for split, n in (("train", 4), ("test", 2)):
        for c in COLOURS:
            for i in range(n):
                sub = "sub/" if c == "blue" or (c == "red" and i % 2) else ""  # blue only in a sub-folder
                _img(root / split / c / f"{sub}{i:03d}.png", COLOURS[c], seed=i)
    _img(root / "train" / "green" / "deep" / "er" / "x.ppm", COLOURS["green"], fmt="PPM")
    _img(root / "train" / "green" / "y.jfif", COLOURS["green"], fmt="JPEG")
    _img(root / "train" / "green" / ".hidden" / "z.png", COLOURS["green"])  # hidden: never data
    _img(root / "train" / "green" / "__MACOSX" / "z.png", COLOURS["green"])
    (root / "train" / "red" / "notes.txt").write_text("not an image")

    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        ds = load_dataset(root)
    assert _counts(ds) == {"blue": 4, "green": 6, "red": 4}
    assert ds.y_test.tolist() == [0, 0, 1, 1, 2, 2]
    assert "skipped 1 file that is not an image" in caplog.text and "notes.txt" in caplog.text
    # The loader reads exactly the files predict finds in each class folder.
    for c, n in _counts(ds).items():
        assert sum(err is None for _, err in expand_paths([root / "train" / c])) == n
    # A tarball of the tree reads the same images, and says what it skipped too.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        tarred = load_dataset(tar_tree(root, tmp_path / "nested.tar.gz"))
    assert torch.equal(tarred.x_train, ds.x_train) and torch.equal(tarred.y_train, ds.y_train)
    assert "nested.tar.gz: skipped 1 file that is not an image" in caplog.text and "notes.txt" in caplog.text

    # The checksum covers sub-folder images: editing one is a new checksum and a fresh decode, not the old cache.
    _img(root / "train" / "blue" / "sub" / "000.png", COLOURS["red"], seed=7)
    edited = load_dataset(root)
    assert edited.checksum != ds.checksum and not torch.equal(edited.x_train, ds.x_train)
    # Moving a nested image up a level changes its path under the tree: another checksum too.
    (root / "train" / "blue" / "sub" / "001.png").rename(root / "train" / "blue" / "001.png")
    assert load_dataset(root).checksum != edited.checksum


def test_a_tree_without_sub_folders_keeps_its_checksum(tmp_path: Path) -> None:
    """Runs trained before recursion still match their data: a flat class folder hashes as it did."""
    import hashlib

    from cifarlab.data.imagefolder import _scan_folder, folder_fingerprint

    root = _tree(tmp_path / "flat", 2, 1)
    files = _scan_folder(root)[1]
    h = hashlib.md5()  # the rule of the loader before sub-folders: split/class/name, size, content MD5
    for s, c, _, f in sorted(files, key=lambda t: f"{t[0]}/{t[1]}/{t[3].name}"):
        data = f.read_bytes()
        h.update(f"{s}/{c}/{f.name}\0{len(data)}\0".encode())
        h.update(hashlib.md5(data).digest())
    assert folder_fingerprint(files) == h.hexdigest() == load_dataset(root).checksum


def test_a_class_whose_images_are_all_skipped_is_still_an_error(tmp_path: Path) -> None:
    root = _tree(tmp_path / "t", 3, 1)
    shutil.rmtree(root / "train" / "blue")
    (root / "train" / "blue" / "sub").mkdir(parents=True)
    (root / "train" / "blue" / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="class blue has no training images"):
        load_dataset(root)


# -- 2. resizing is said, from a fresh decode and from the cache -----------------------------------------------------


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ([(16, 16)], "24 images (16x16) resized to 32x32; "),
        ([(40, 30)], "24 images (40x30) resized to 32x32 (aspect ratio not kept)"),
        ([(16, 16), (32, 32), (100, 20)], "15 of 24 images (2 sizes from 16x16 to 100x20) resized to 32x32 (aspect"),
    ],
)
def test_resizing_is_announced_also_from_the_cache(tmp_path: Path, monkeypatch, caplog, sizes, expected) -> None:
    root = tmp_path / "sized"
    for split, n in (("train", 6), ("test", 2)):
        for c in COLOURS:
            for i in range(n):
                _img(root / split / c / f"{i}.png", COLOURS[c], sizes[i % len(sizes)], seed=i)
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        first = load_dataset(root)
    assert expected in caplog.text and first.input_shape == (3, 32, 32)
    caplog.clear()
    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="cifarlab"):
        _no_decoding(m)
        again = load_dataset(root)
    assert expected in caplog.text and again.native_sizes == first.native_sizes
    assert sum(first.native_sizes.values()) == 24


def test_no_note_when_nothing_was_resized_and_data_info_lists_sizes(tmp_path: Path, caplog, capsys) -> None:
    from cifarlab import cli

    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        ds = load_dataset(_tree(tmp_path / "same"))
        native = load_dataset(_tree(tmp_path / "big", size=(48, 48)), image_size=None)
    assert "resized" not in caplog.text and ds.native_sizes == {"32x32": 18} and native.input_shape == (3, 48, 48)

    assert cli.main(["data", "info", "--dataset", str(_tree(tmp_path / "wide", size=(40, 30)))]) == 0
    assert "files     40x30 (18); loaded as 32x32" in capsys.readouterr().out
    assert cli.main(["data", "info", "--json", "--dataset", str(tmp_path / "wide")]) == 0
    assert json.loads(capsys.readouterr().out)["native_sizes"] == {"40x30": 18}


# -- 3. docs/API.md says what a folder and arrays become -------------------------------------------------------------


def test_api_doc_matches_folder_and_array_shapes(tmp_path: Path) -> None:
    from PIL import Image

    from cifarlab.data import from_arrays

    root = tmp_path / "gray64"
    for split in ("train", "test"):
        for k, c in enumerate(("dark", "light")):
            for i in range(2):
                (root / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((64, 64), 40 + 150 * k + i, np.uint8), "L").save(root / split / c / f"{i}.png")
    assert load_dataset(root).input_shape == (3, 32, 32)  # a folder: RGB, 32x32
    assert load_dataset(root, image_size=None).input_shape == (3, 64, 64)
    x = np.zeros((4, 64, 64), np.uint8)
    assert from_arrays(x, np.array([0, 1, 0, 1]), x, np.array([0, 1, 0, 1])).input_shape == (1, 64, 64)
    doc = " ".join((ROOT / "docs" / "API.md").read_text().split())
    assert "Images of any size and channel count are kept as they are" not in doc
    assert "resized to 32x32 without keeping its aspect ratio" in doc and "load_dataset(path, image_size=None)" in doc


# -- 4. a constant channel -------------------------------------------------------------------------------------------


def test_a_constant_channel_standardizes_to_zero_and_round_trips(tmp_path: Path, caplog) -> None:
    import cifarlab
    from cifarlab.data import channel_stats, scale_images, scaling_constants
    from cifarlab.errors import ConfigError

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(2), 12)
    x = np.zeros((24, 32, 32, 4), np.uint8)
    x[..., 0] = np.clip(60 + 120 * y[:, None, None] + rng.normal(0, 20, (24, 32, 32)), 0, 255)  # R only
    x[..., 3] = 255  # an opaque alpha: constant
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        mean, std = channel_stats(torch.as_tensor(x).permute(0, 3, 1, 2))
    assert std[1:] == (1.0, 1.0, 1.0) and 0.1 < std[0] < 0.5 and mean[3] == 1.0
    assert "channels G, B, A of the training images are constant" in caplog.text
    assert channel_stats(torch.as_tensor(x).permute(0, 3, 1, 2), for_scaling=False)[1][1:] == (0.0, 0.0, 0.0)
    scaled = scale_images(torch.full((1, 4, 2, 2), 255.0), *scaling_constants(mean, std, 4))
    assert torch.all(scaled[:, 3] == 0) and torch.isfinite(scaled).all()
    with pytest.raises(ConfigError, match="std > 0"):  # a std given by the user is still checked strictly
        scaling_constants(mean, (0.2, 0.0, 1.0, 1.0), 4)

    run = cifarlab.fit(
        "reference", (x, y, x[::3], y[::3]), runs_dir=tmp_path / "runs", report=False, epochs=1, batch_size=8,
        widths=(8, 16, 16), dense_width=32, precision="fp32", scaling="standardize",
    )  # fmt: skip
    saved = json.loads((Path(run.path) / "config.json").read_text())
    assert saved["normalization"]["std"][1:] == [1.0, 1.0, 1.0] and saved["normalization"]["mean"][1:] == [0, 0, 1]
    again = cifarlab.load(run.path)
    probs = torch.as_tensor(run.predict(x[:5]))
    assert torch.isfinite(probs).all() and torch.equal(torch.as_tensor(again.predict(x[:5])), probs)


# -- 5. a split that leaves a class untrained ------------------------------------------------------------------------


def test_a_split_that_holds_out_a_whole_class_is_refused_before_any_folder(tmp_path: Path) -> None:
    import cifarlab
    from cifarlab.data import from_arrays, recipe_split
    from cifarlab.recipes import get_recipe

    y = np.array([0] * 80 + [1] * 5 + [2])
    x = np.zeros((len(y), 8, 8, 3), np.uint8) + (y * 80)[:, None, None, None].astype(np.uint8)
    recipe = dataclasses.replace(get_recipe("reference"), seed=1)
    assert recipe.val_fraction == 0.2 and not recipe.stratified_split
    _, va = recipe_split(recipe, torch.as_tensor(y))
    assert 85 in va.tolist()  # this seed does hold the one blue image out
    with pytest.raises(DataError, match=r"holds out every training image of class blue \(1 image\)") as info:
        recipe_split(recipe, torch.as_tensor(y), ("red", "green", "blue"))
    assert str(info.value).endswith(
        "would never be learned. Use --set stratified_split=true (each class keeps its share in training), add "
        "training images, or use --set val_fraction=0 (no validation split, and schedule=onecycle)."
    )
    with pytest.raises(DataError) as info:  # tune's trials need their validation split
        recipe_split(recipe, torch.as_tensor(y), ("red", "green", "blue"), needs_validation=True)
    assert "val_fraction=0" not in str(info.value) and "add training images." in str(info.value)
    # evaluate and calibrate reproduce a run's split without classes: not refused there.
    assert len(recipe_split(recipe, torch.as_tensor(y))[1]) == 17

    ds = from_arrays(x, y, x[:6], y[:6], classes=["red", "green", "blue"])
    with pytest.raises(DataError, match="class blue"):
        cifarlab.fit("reference", ds, runs_dir=tmp_path / "runs", report=False, epochs=1, seed=1, batch_size=8)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    strat = dataclasses.replace(recipe, stratified_split=True)  # the advice works
    tr, _ = recipe_split(strat, torch.as_tensor(y), ("red", "green", "blue"))
    assert 85 in tr.tolist()


# -- 6. val/ ignored: said by train too ------------------------------------------------------------------------------


def test_train_says_val_is_ignored(tmp_path: Path) -> None:
    root = _tree(tmp_path / "tvt", 8, 2, classes=("red", "green"))
    shutil.copytree(root / "test", root / "val")
    env = {**os.environ, "CIFARLAB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT / "src")}
    argv = ["train", *TINY_ARGS, "--set", "epochs=1", "--set", f"dataset={root}", "--set", "batch_size=8"]
    out = subprocess.run(
        [sys.executable, "-m", "cifarlab.cli", *argv, "--runs-dir", str(tmp_path / "runs"), "--no-report"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    # one line, as a warning (Python's fallback handler printed the bare message)
    assert out.stderr.count(f"warning: {root}: using test/ as the test split; val/ is ignored\n") == 1, out.stderr


# -- 7. layout errors that say what is wrong -------------------------------------------------------------------------


def test_flat_class_folders_and_a_missing_test_split_are_named(tmp_path: Path, capsys) -> None:
    from cifarlab import cli

    root = _tree(tmp_path / "two", 4, 0, classes=("red", "green"))
    flat = root / "train"
    with pytest.raises(DataError, match=r"has no train/ or test/ folder: its images seem to be directly in class "
                       r"folders \(green/, red/\)") as info:  # fmt: skip
        load_dataset(flat)
    assert f"{flat}/train/<class>/" in str(info.value)
    with pytest.raises(DataError, match=r"has train/ but no test/ \(or val/\) folder"):
        load_dataset(root, test_only=True)
    with pytest.raises(DataError, match=r"has train/ but no test/ \(or val/\) images"):
        load_dataset(root)
    assert cli.main(["data", "info", "--dataset", str(flat)]) == 2
    err = capsys.readouterr().err
    assert "images seem to be directly in class folders" in err and err.count("\n") == 1
