"""`cifarlab predict`: every common format and mode, folders, per-file errors, decompression bombs, CLI."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _runfolder import CLASSES, make_run, tiny_recipe
from cifarlab import predict
from cifarlab.cli import build_parser
from cifarlab.cli.common import run_command
from cifarlab.inference import predict_proba
from cifarlab.runs import load_run

RGB = (200, 40, 90)


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(a, "RGB")


def write_formats(folder: Path) -> dict[str, Path]:
    """One file per format/mode the issue names, at assorted sizes (all but one != 32x32)."""
    solid = Image.new("RGB", (50, 40), RGB)
    palette = solid.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 0
    files = {
        "png": _save(_noise((64, 48)), folder / "noise.png", "PNG"),
        "jpeg": _save(_noise((300, 200), 1), folder / "photo.jpg", "JPEG", quality=90),
        "jpeg_cmyk": _save(solid.convert("CMYK"), folder / "cmyk.jpeg", "JPEG"),
        "webp": _save(_noise((40, 40), 2), folder / "lossy.webp", "WEBP", quality=80),
        "bmp": _save(_noise((33, 31), 3), folder / "box.bmp", "BMP"),
        "gray": _save(solid.convert("L"), folder / "gray.png", "PNG"),
        "rgba": _save(Image.new("RGBA", (20, 20), RGB + (0,)), folder / "alpha.png", "PNG"),
        "palette": _save(palette, folder / "palette.png", "PNG"),
        "palette_transparent": _save(palette_t, folder / "palette_t.png", "PNG"),
        "gif": _save(palette, folder / "anim.gif", "GIF"),
        "tiny": _save(_noise((7, 5), 4), folder / "tiny.png", "PNG"),
        "exact": _save(_noise((32, 32), 5), folder / "exact.png", "PNG"),
    }
    return files


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A valid PNG header claiming width x height (10 gigapixels), tiny payload: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(b"\0" * 1024)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "20260101-120000-reference", tiny_recipe())


@pytest.fixture(scope="module")
def air_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "20260101-120000-fast", tiny_recipe("airnet"))


# -- decoding ------------------------------------------------------------------------------------------------


def test_every_format_and_mode_is_decoded(tmp_path: Path):
    files = write_formats(tmp_path / "imgs")
    x, ok, errors = predict.load_images(files.values())
    assert errors == []
    assert ok == [str(p) for p in files.values()]
    assert x.dtype == torch.uint8 and x.shape == (len(files), 3, 32, 32)
    by_name = dict(zip(files, x, strict=True))
    # Solid colours survive every mode conversion (alpha is dropped, as the training loader does).
    for name in ("rgba", "palette", "palette_transparent", "gif"):
        assert (by_name[name].float().mean((1, 2)) - torch.tensor(RGB)).abs().max() <= 2, name
    gray = by_name["gray"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    cmyk = by_name["jpeg_cmyk"].float().mean((1, 2))
    assert (cmyk - torch.tensor(RGB)).abs().max() < 12  # JPEG + CMYK round trip is lossy
    exact = torch.from_numpy(np.array(Image.open(files["exact"]))).permute(2, 0, 1)
    assert torch.equal(by_name["exact"], exact)  # 32x32 RGB: untouched


def test_preprocessing_is_the_training_loaders(tmp_path: Path, tiny_imagefolder):
    from cifarlab.data import load_dataset

    ds = load_dataset(tiny_imagefolder.root, cache_dir=tmp_path / "cache")
    x, ok, errors = predict.load_images([tiny_imagefolder.root / "train"])
    assert errors == [] and len(ok) == len(ds.y_train)
    # Same files (class folder, then name, as the dataset orders them), same pixels, bit for bit.
    assert torch.equal(x, ds.x_train)


def test_folders_are_searched_recursively_skipping_hidden_and_non_images(tmp_path: Path):
    root = tmp_path / "photos"
    _save(_noise((40, 40)), root / "a.png", "PNG")
    _save(_noise((40, 40)), root / "sub" / "deeper" / "b.JPG", "JPEG")
    _save(_noise((40, 40)), root / ".hidden" / "c.png", "PNG")
    _save(_noise((40, 40)), root / ".d.png", "PNG")
    (root / "notes.txt").write_text("not an image")
    x, ok, errors = predict.load_images([root])
    assert [Path(p).relative_to(root).as_posix() for p in ok] == ["a.png", "sub/deeper/b.JPG"]
    assert errors == [] and len(x) == 2


def test_broken_files_get_per_file_errors_and_the_rest_still_load(tmp_path: Path):
    good = _save(_noise((40, 40)), tmp_path / "good.png", "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    text = tmp_path / "text.jpg"
    text.write_text("hello, I am not a JPEG")
    empty = tmp_path / "empty.webp"
    empty.write_bytes(b"")
    empty_dir = tmp_path / "nothing_here"
    empty_dir.mkdir()
    good2 = _save(_noise((20, 20)), tmp_path / "good2.bmp", "BMP")
    paths = [truncated, good, text, tmp_path / "missing.png", empty, empty_dir, good2]
    x, ok, errors = predict.load_images(paths)
    assert ok == [str(good), str(good2)] and x.shape == (2, 3, 32, 32)
    errs = dict(errors)
    assert set(errs) == {str(truncated), str(text), str(tmp_path / "missing.png"), str(empty), str(empty_dir)}
    assert "not an image" in errs[str(text)] and "no such file" in errs[str(tmp_path / "missing.png")]
    assert "no image files" in errs[str(empty_dir)]


def test_decompression_bomb_is_refused(tmp_path: Path):
    bomb = bomb_png(tmp_path / "bomb.png")
    good = _save(_noise((40, 40)), tmp_path / "good.png", "PNG")
    before = Image.MAX_IMAGE_PIXELS
    x, ok, errors = predict.load_images([bomb, good])
    assert ok == [str(good)] and len(x) == 1
    assert errors[0][0] == str(bomb) and errors[0][1].startswith("refused") and "bomb" in errors[0][1]
    assert Image.MAX_IMAGE_PIXELS == before  # the cap is scoped to predict, not left in Pillow


def test_pillows_warning_band_is_refused_too(tmp_path: Path):
    # Between the cap and twice the cap Pillow only warns; predict turns that into a refusal.
    img = _save(_noise((100, 100)), tmp_path / "big.png", "PNG")
    _, ok, errors = predict.load_images([img], max_pixels=6_000)
    assert ok == [] and errors[0][1].startswith("refused")
    _, ok, errors = predict.load_images([img], max_pixels=4_000)
    assert ok == [] and errors[0][1].startswith("refused")
    _, ok, _ = predict.load_images([img], max_pixels=10_000)
    assert ok == [str(img)]


# -- predicting ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["run_dir", "air_run_dir"])
def test_predict_paths_matches_the_models_probabilities(tmp_path: Path, request, which):
    run_dir = request.getfixturevalue(which)
    files = write_formats(tmp_path / "imgs")
    broken = tmp_path / "imgs" / "zz_broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnope")
    results = predict.predict_paths(run_dir, [tmp_path / "imgs"], top_k=3, precision="fp32", device="cpu")
    assert [Path(r["path"]).name for r in results] == sorted(p.name for p in [*files.values(), broken])
    assert "error" in results[-1] and "top_k" not in results[-1]
    ok = [r for r in results if "top_k" in r]
    assert len(ok) == len(files)
    x, paths, _ = predict.load_images([tmp_path / "imgs"])
    run = load_run(run_dir)
    mean, std = run.normalization
    probs = predict_proba(run.build_model(), x, mean=mean, std=std, tta=run.recipe.tta, precision="fp32")
    for r, p in zip(ok, probs, strict=True):
        top = r["top_k"]
        assert len(top) == 3 and all(t["class"] in CLASSES for t in top)
        assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
        assert top[0]["class"] == CLASSES[int(p.argmax())]
        assert top[0]["probability"] == pytest.approx(float(p.max()), abs=1e-6)


def test_a_cuda_fp16_run_predicts_on_a_cpu_as_auto(tmp_path: Path):
    """A run trained in fp16 on a GPU, copied to a laptop: fp16 autocast does not exist on a CPU, so predict
    computes as `precision=auto` there (bf16 where the CPU has it, else fp32) instead of failing."""
    run_dir = make_run(tmp_path / "20260101-120000-reference", tiny_recipe().replace(precision="fp16"))
    files = write_formats(tmp_path / "imgs")
    results = predict.predict_paths(run_dir, [tmp_path / "imgs"], top_k=1, device="cpu")
    assert len(results) == len(files) and all("top_k" in r for r in results)
    x, _, _ = predict.load_images([tmp_path / "imgs"])
    run = load_run(run_dir)
    mean, std = run.normalization
    probs = predict_proba(run.build_model(), x, mean=mean, std=std, tta=run.recipe.tta, precision="auto")
    for r, p in zip(results, probs, strict=True):  # the same computation: the same numbers
        assert r["top_k"][0]["probability"] == pytest.approx(float(p.max()), abs=1e-6)


def test_top_k_is_capped_at_the_number_of_classes(run_dir: Path, tmp_path: Path):
    img = _save(_noise((32, 32)), tmp_path / "a.png", "PNG")
    [r] = predict.predict_paths(run_dir, [img], top_k=50)
    assert len(r["top_k"]) == len(CLASSES)
    assert sum(t["probability"] for t in r["top_k"]) == pytest.approx(1.0, abs=1e-4)


# -- CLI -----------------------------------------------------------------------------------------------------


def _main(argv: list[str]) -> int:
    """The predict command on a parser of its own (independent of the other subcommands)."""
    args = build_parser(["predict"]).parse_args(argv)
    return run_command(args.func, args)


def test_cli_table_and_json(run_dir: Path, tmp_path: Path, capsys):
    good = _save(_noise((64, 64)), tmp_path / "cat.png", "PNG")
    bad = tmp_path / "bad.jpg"
    bad.write_text("nope")
    assert _main(["predict", str(run_dir), str(good), str(bad), "--top-k", "2"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].split() == ["path", "top-1", "top-2"]
    assert str(good) in lines[2] and lines[2].count("%") == 2
    assert str(bad) in lines[3] and "error:" in lines[3]
    assert "1 classified, 1 failed" in err
    assert _main(["predict", str(run_dir), str(good), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["path"] == str(good) and len(data[0]["top_k"]) == 3


def test_cli_exit_1_when_nothing_was_classified(run_dir: Path, tmp_path: Path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    assert _main(["predict", str(run_dir), str(bad)]) == 1
    assert "error:" in capsys.readouterr().out


def test_cli_bad_run_dir_is_a_user_error(tmp_path: Path, capsys):
    img = _save(_noise((32, 32)), tmp_path / "a.png", "PNG")
    assert _main(["predict", str(tmp_path / "no_run"), str(img)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err


# -- reliability ---------------------------------------------------------------------------------------------


def _within(seconds: float, fn, unblock: Path):
    """fn() in a thread; fails instead of hanging when it is blocked (on a FIFO) for `seconds`."""
    import os
    import threading

    box: dict = {}
    t = threading.Thread(target=lambda: box.update(value=fn()), daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        with open(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK), "wb"):  # release the blocked reader
            pass
        pytest.fail(f"still running after {seconds} s (blocked on a FIFO)")
    return box["value"]


def test_fifo_in_a_folder_is_skipped_and_named_fifo_refused(tmp_path: Path):
    import os

    good = _save(_noise((40, 40)), tmp_path / "imgs" / "a.png", "PNG")
    fifo = tmp_path / "imgs" / "b_fifo.png"
    os.mkfifo(fifo)
    x, ok, errors = _within(5, lambda: predict.load_images([tmp_path / "imgs"]), unblock=fifo)
    assert ok == [str(good)] and len(x) == 1
    assert errors == [(str(fifo), "skipped: not a regular file")]
    _, ok, errors = _within(5, lambda: predict.load_images([fifo]), unblock=fifo)
    assert ok == [] and "not a regular file" in errors[0][1]


def test_links_that_lead_nowhere_are_named_as_such(tmp_path: Path):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")  # a loop
    (tmp_path / "gone.png").symlink_to(tmp_path / "missing.png")
    _, ok, errors = predict.load_images([tmp_path / "a.png", tmp_path / "gone.png", tmp_path / "nothere.png"])
    assert ok == [] and [e for _, e in errors] == [
        "a link that leads nowhere (its target is missing, or it loops)",
        "a link that leads nowhere (its target is missing, or it loops)",
        "no such file or folder",
    ]


def test_a_dangling_link_in_a_folder_is_named_as_such(tmp_path: Path):
    good = _save(_noise((40, 40)), tmp_path / "imgs" / "a.png", "PNG")
    (tmp_path / "imgs" / "b.png").symlink_to(tmp_path / "missing.png")
    _, ok, errors = predict.load_images([tmp_path / "imgs"])
    assert ok == [str(good)]
    assert errors == [
        (str(tmp_path / "imgs" / "b.png"), "skipped: a link that leads nowhere (its target is missing, or it loops)")
    ]


def test_an_unreadable_folder_is_an_error_entry_not_skipped(tmp_path: Path, monkeypatch):
    import errno
    import os

    good = _save(_noise((40, 40)), tmp_path / "odd" / "a.png", "PNG")
    _save(_noise((40, 40)), tmp_path / "odd" / "locked" / "b.png", "PNG")
    _save(_noise((40, 40)), tmp_path / "alone" / "c.png", "PNG")
    real_scandir = os.scandir
    denied = {str(tmp_path / "odd" / "locked"), str(tmp_path / "alone")}

    def scandir(path=".") -> object:  # a chmod 000 folder read by a user without CAP_DAC_OVERRIDE (root reads it)
        if os.fspath(path) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert predict.expand_paths([tmp_path / "odd", tmp_path / "alone"]) == [
        (good, None),
        (tmp_path / "odd" / "locked", "cannot read this folder: Permission denied"),
        (tmp_path / "alone", "cannot read this folder: Permission denied"),  # not also "no image files"
    ]


def test_16bit_png_is_scaled_like_the_training_loader(tmp_path: Path):
    a = np.full((40, 40), 0x8000, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(a).save(path)
    x, ok, errors = predict.load_images([path])
    assert errors == [] and x.shape == (1, 3, 32, 32)
    assert int(x.min()) == int(x.max()) == 128  # was clipped to 255


def test_table_escapes_control_characters_json_keeps_them():
    name = "photos/\x1b[31mred\x1b[0m\n\u202egnp.png"
    results = [
        {"path": name, "top_k": [{"class": "c\x07at", "probability": 0.9}]},
        {"path": name + "2", "error": "skipped: not a regular file"},
    ]
    table = predict.format_table(results)
    assert "\x1b" not in table and "\x07" not in table and "\u202e" not in table
    assert "\\x1b[31mred\\x1b[0m\\n\\u202egnp.png" in table and "c\\x07at 90.0%" in table
    assert len(table.splitlines()) == 4  # the newline in the name did not start a row
    assert table.splitlines()[3].endswith("  skipped: not a regular file")
    assert json.loads(json.dumps(results))[0]["path"] == name  # --json prints the real name


# -- EXIF orientation, bit depth, big JPEGs ------------------------------------------------------------------


def _stored_index(orientation: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For an upright h x w image: the stored image's (i, j) grid and the upright (row, col) each stored pixel
    shows, read off the EXIF spec's table of where the stored 0th row and 0th column go (e.g. 6: the 0th row
    is the visual right-hand side, the 0th column the visual top)."""
    sh, sw = (h, w) if orientation <= 4 else (w, h)
    i, j = np.mgrid[0:sh, 0:sw]
    rc = {
        1: (i, j),  # 0th row top, 0th column left
        2: (i, w - 1 - j),  # top, right
        3: (h - 1 - i, w - 1 - j),  # bottom, right
        4: (h - 1 - i, j),  # bottom, left
        5: (j, i),  # left, top
        6: (j, w - 1 - i),  # right, top
        7: (h - 1 - j, w - 1 - i),  # right, bottom
        8: (h - 1 - j, i),  # left, bottom
    }[orientation]
    return i, j, rc[0], rc[1]


def _blocks(h: int, w: int) -> np.ndarray:
    """An asymmetric upright picture of flat 8x8 blocks, each its own colour (survives JPEG almost exactly)."""
    rng = np.random.default_rng(7)
    colours = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return colours.repeat(8, axis=0).repeat(8, axis=1)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("shape", [(24, 40), (32, 32)])  # 32x32 is the simplejpeg fast path's size
def test_exif_orientation_is_applied_like_a_browser(tmp_path: Path, orientation: int, shape: tuple[int, int]):
    from cifarlab.data.images import decode_image

    h, w = shape
    upright = _blocks(h, w)
    i, j, r, c = _stored_index(orientation, h, w)
    stored = np.empty((*i.shape, 3), dtype=np.uint8)
    stored[i, j] = upright[r, c]
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = _save(Image.fromarray(stored), tmp_path / "phone.jpg", "JPEG", exif=exif, quality=95, subsampling=0)
    with Image.open(path) as im:  # the stored pixels as decoded, orientation not applied
        raw = np.asarray(im.convert("RGB"))
    want = np.empty((h, w, 3), dtype=np.uint8)
    want[r, c] = raw[i, j]
    got = decode_image(path, "phone.jpg", None).transpose(1, 2, 0)
    np.testing.assert_array_equal(got, want)
    assert np.abs(got.astype(int) - upright).max() <= 8  # and it is the upright picture (JPEG is lossy)
    if shape == (32, 32):  # predict at the model's size: no resize, the fast path must not skip the rotation
        x, _, errors = predict.load_images([path])
        assert errors == [] and np.array_equal(x[0].permute(1, 2, 0).numpy(), want)


def test_float_and_32bit_images_are_refused_16bit_ones_scaled(tmp_path: Path):
    a = np.zeros((40, 40), dtype=np.float32)
    a[:, 20:] = 1.0
    floats = _save(Image.fromarray(a), tmp_path / "float.tif", "TIFF")  # mode F, values 0-1: decoded all black
    int32 = _save(Image.fromarray(np.full((40, 40), 200, np.int32)), tmp_path / "int32.tif", "TIFF")  # mode I
    tiff16 = _save(Image.fromarray(np.full((40, 40), 0x8000, np.uint16)), tmp_path / "deep16.tif", "TIFF")
    pgm16 = _save(Image.fromarray(np.full((40, 40), 0x8000, np.uint16)), tmp_path / "deep16.pgm", "PPM")
    with Image.open(pgm16) as im:
        assert im.mode == "I"  # what Pillow makes of a 16-bit PGM: "I" is not always 32-bit data
    x, ok, errors = predict.load_images([floats, int32, tiff16, pgm16])
    assert ok == [str(tiff16), str(pgm16)] and int(x.min()) == int(x.max()) == 128
    errs = dict(errors)
    again = "no agreed 0-255 scale; save it as 8- or 16-bit first"
    assert errs[str(floats)] == f"floating-point image (Pillow mode F): {again}"
    assert errs[str(int32)] == f"32-bit integer image: {again}"
    # An "I" image whose depth no tag gives is read as 16-bit, and refused when a value does not fit.
    from cifarlab.data.images import UnsupportedImageError, _deep_to_8bit

    assert _deep_to_8bit(Image.new("I", (4, 4), 0x8000)).getextrema() == (128, 128)
    with pytest.raises(UnsupportedImageError, match=r"values 70000\.\.70000, outside the 16-bit range 0\.\.65535"):
        _deep_to_8bit(Image.new("I", (4, 4), 70_000))


def _jpeg_with_header_size(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims width x height (the scan data is the small image's)."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_48_megapixel_jpeg_is_decoded_at_reduced_size(tmp_path: Path):
    import subprocess
    import sys

    pytest.importorskip("resource")  # peak RSS below: Linux and macOS
    img = Image.new("RGB", (8000, 6000), (200, 30, 30))  # a 48 MP camera photo: red left, blue right, green top
    img.paste((30, 30, 200), (4000, 0, 8000, 6000))
    img.paste((30, 200, 30), (0, 0, 8000, 1500))
    big = _save(img, tmp_path / "camera.jpg", "JPEG", quality=85)
    x, ok, errors = predict.load_images([big])
    assert errors == [] and ok == [str(big)]
    corners = x[0, :, [0, 31, 31], [0, 0, 31]].T.int()  # top-left, bottom-left, bottom-right
    assert (corners - torch.tensor([[30, 200, 30], [200, 30, 30], [30, 30, 200]])).abs().max() <= 3
    # Memory: decoding it costs a few MB (1000x750 at 1/8 scale), not the ~150 MB of a full decode. Measured in a
    # fresh interpreter (the peak RSS here is the test session's), loading images.py alone to start fast.
    import cifarlab.data.images as images

    code = (
        "import importlib.util, resource, sys\n"
        "spec = importlib.util.spec_from_file_location('images', sys.argv[1])\n"
        "images = importlib.util.module_from_spec(spec); spec.loader.exec_module(images)\n"
        "from PIL import Image, ImageOps, JpegImagePlugin\n"
        "data = open(sys.argv[2], 'rb').read()\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "images.decode_image(data, 'camera.jpg', 32)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, images.__file__, str(big)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    grown_mb = int(out.stdout) / 1024  # ru_maxrss is in KiB on Linux
    assert grown_mb < 40, grown_mb


def test_pixel_limit_still_refuses_bombs_per_format(tmp_path: Path):
    jpeg_bomb = tmp_path / "bomb.jpg"
    jpeg_bomb.write_bytes(_jpeg_with_header_size(12_000, 12_000))  # 144 MP: over even a JPEG's 3x header cap
    png48 = bomb_png(tmp_path / "big.png", 8000, 6000)  # 48 MP PNG: no reduced decoding, the 40 MP limit holds
    _, ok, errors = predict.load_images([jpeg_bomb, png48])
    assert ok == [] and dict(errors) == {
        str(jpeg_bomb): "refused: 144,000,000 pixels, over the 120,000,000-pixel limit for JPEGs "
        "(possible decompression bomb)",
        str(png48): "refused: 48,000,000 pixels, over the 40,000,000-pixel limit (possible decompression bomb)",
    }
    # At native size (no reduced decoding) a 48 MP JPEG is refused too: the limit is on the pixels decoded.
    from cifarlab.data.images import decode_image
    from cifarlab.errors import DataError

    with pytest.raises(DataError, match=r"\(48000000 pixels\) exceeds limit of 40000000 pixels,"):
        decode_image(_jpeg_with_header_size(8000, 6000), "big.jpg", None)


def test_jpegs_below_the_draft_threshold_decode_exactly_as_before(tmp_path: Path):
    # Reduced (draft) decoding only starts at 4x the model's side; smaller JPEGs are fully decoded, then BOX.
    from cifarlab.data.images import decode_image

    for size in [(100, 90), (127, 300)]:
        data = _save(_noise(size, 3), tmp_path / f"{size[0]}.jpg", "JPEG", quality=90).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            want = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BOX)).transpose(2, 0, 1)
        np.testing.assert_array_equal(decode_image(data, "x", 32), want)


def test_a_model_predict_cannot_read_files_for_is_said_once_not_per_file(tmp_path: Path):
    """A model of non-square (or 2-channel) images: the model is the problem, not the files, so loading
    stops with one error instead of marking every (readable) file as unreadable."""
    files = [_save(_noise((32, 32), seed=i), tmp_path / f"{i}.png", "PNG") for i in range(3)]
    entries = predict.expand_paths(files)
    for shape in ((3, 30, 40), (2, 32, 32)):
        with pytest.raises(predict.DataError, match=r"this model takes .* images; predict reads files for square"):
            predict._load(entries, predict.MAX_IMAGE_PIXELS, shape)
    decoded, failed = predict._load(entries, predict.MAX_IMAGE_PIXELS, (3, 32, 32))
    assert len(decoded) == 3 and not failed


# -- one list of image formats (QA session 16, finding 7) --------------------------------------------------

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
NOT_READ = "not an image cifarlab reads (send PNG, JPEG, GIF, BMP, WebP, TIFF or PPM/PGM/PBM)"


def _other_formats(folder: Path) -> dict[str, Path]:
    """Images Pillow decodes that cifarlab does not read (and serve answers 415), named .png as a user might."""
    img = _noise((16, 16))
    files = {fmt: _save(img, folder / f"{fmt.lower()}_as.png", fmt) for fmt in ("ICO", "TGA", "PCX", "SGI")}
    (folder / "eps_as.png").write_bytes(EPS)
    return {**files, "EPS": folder / "eps_as.png"}


def test_only_the_accepted_formats_are_handed_to_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An EPS file went to Pillow's EPS plugin (Ghostscript, where installed) whatever its name; ICO, TGA, PCX, ...
    were classified by `predict` and refused (415) by `serve`. Now every other format gets one clear error."""
    Image.init()
    opened: list[str] = []
    for fmt in ("EPS", "ICO", "TGA", "PCX", "SGI"):
        factory, accept = Image.OPEN[fmt]

        def spy(*args, _fmt: str = fmt, _factory=factory, **kw):  # records that Pillow tried this decoder
            opened.append(_fmt)
            return _factory(*args, **kw)

        monkeypatch.setitem(Image.OPEN, fmt, (spy, accept))
    files = _other_formats(tmp_path / "odd")
    good = _save(_noise((40, 40)), tmp_path / "odd" / "good.png", "PNG")
    x, ok, errors = predict.load_images([tmp_path / "odd"])
    assert ok == [str(good)] and len(x) == 1
    assert dict(errors) == {str(p): NOT_READ for p in files.values()}
    assert opened == []  # no other decoder was even tried


def test_the_dataset_loader_reads_the_same_formats(tmp_path: Path):
    from cifarlab.data import load_dataset
    from cifarlab.errors import DataError
    from conftest import write_imagefolder

    t = write_imagefolder(tmp_path / "tree")
    _save(_noise((32, 32)), t.root / "train" / "cat" / "zz_icon.png", "ICO")
    with pytest.raises(DataError, match=r"cat/zz_icon\.png.*" + NOT_READ.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(t.root)


def test_the_command_takes_a_precision(tmp_path: Path, capsys):
    """`cifarlab predict` computed only in the run's precision (bf16 on a bf16 CPU), so it could not give the fp32
    probabilities an export gives; --precision fp32|bf16|auto asks, the default stays the run's."""
    run_dir = make_run(tmp_path / "20260101-120000-reference", tiny_recipe().replace(precision="bf16"))
    imgs = [_save(_noise((32, 32), seed), tmp_path / f"{seed}.png", "PNG") for seed in range(4)]
    parser = build_parser(["predict"])

    def cli_probs(*extra: str) -> list[float]:
        args = parser.parse_args(["predict", str(run_dir), *map(str, imgs), "--json", "--device", "cpu", *extra])
        assert run_command(args.func, args) == 0
        return [r["top_k"][0]["probability"] for r in json.loads(capsys.readouterr().out)]

    def api_probs(precision: str | None) -> list[float]:
        results = predict.predict_paths(run_dir, imgs, device="cpu", precision=precision)
        return [r["top_k"][0]["probability"] for r in results]

    fp32, bf16 = cli_probs("--precision", "fp32"), cli_probs("--precision", "bf16")
    assert fp32 == api_probs("fp32") and bf16 == api_probs("bf16") and fp32 != bf16
    assert cli_probs() == bf16  # the run's own precision by default
    assert cli_probs("--precision", "auto") == api_probs("auto")
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", str(run_dir), str(imgs[0]), "--precision", "fp16"])


def test_a_folder_that_can_be_listed_but_not_entered_is_a_row_per_file(tmp_path: Path, monkeypatch):
    """A folder of mode r-- (listable, not enterable): the lstat of its entries raised PermissionError, and the
    whole command stopped with advice about writing (QA round 3). Now a row for each, the rest classified."""
    import errno
    import os

    good = _save(_noise((40, 40)), tmp_path / "up" / "a" / "a.png", "PNG")
    locked = _save(_noise((40, 40)), tmp_path / "up" / "noexec" / "b.png", "PNG")
    real_stat, real_lstat = os.stat, os.lstat

    def denied(real):
        def stat(path, *args, **kwargs):  # what a user without root's override meets in a chmod 444 folder
            if os.fspath(path).startswith(str(tmp_path / "up" / "noexec") + os.sep):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
            return real(path, *args, **kwargs)

        return stat

    monkeypatch.setattr(os, "stat", denied(real_stat))
    monkeypatch.setattr(os, "lstat", denied(real_lstat))
    rows = predict.expand_paths([tmp_path / "up"])
    assert rows[0] == (good, None)
    assert rows[1][0] == locked and rows[1][1].startswith("cannot read: Permission denied (make its folder readable")


def test_predict_help_names_every_exit_status(capsys) -> None:
    """TOOLS.md documents exit status 2 for a bad run folder; `predict --help` named only 0 and 1 (QA round 17)."""
    from cifarlab import cli

    with pytest.raises(SystemExit):
        cli.main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "classified, else 1; 2 when RUN_DIR is not a usable run folder" in text
