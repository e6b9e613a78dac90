"""QA 17 (explain report): `explain` in bounded batches (M1) without Captum's warning (L1), --out that is a file
(L2), --steps' message (L3), informative unique PNG names and replaced files (L4), the summary line (L5), pooling
rows in `model summary` (L7), a run still training (L8), and `data preview`'s wording (L13)."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from _runfolder import make_run, tiny_recipe
from cifarlab import cli
from cifarlab.errors import UserError
from cifarlab.models import build_model, summary

pytest.importorskip("captum")
pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("method", ["gradcam", "integrated_gradients"])
def test_saliency_in_batches_gives_the_same_maps(method):
    from cifarlab.explain import saliency

    torch.manual_seed(0)
    model = build_model(tiny_recipe(), num_classes=10).eval()
    x = _images(5)
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _m, inp: sizes.append(len(inp[0])))
    whole = saliency(model, x, method=method, steps=3, batch_size=64)
    sizes.clear()
    parts = saliency(model, x, method=method, steps=3, batch_size=2)
    assert max(sizes) <= 2 * 3  # IG: at most batch x steps (image, step) pairs per pass
    torch.testing.assert_close(parts, whole, atol=1e-5, rtol=1e-4)


def test_integrated_gradients_on_many_images_prints_no_captum_warning():
    from cifarlab.explain import saliency

    model = build_model(tiny_recipe(), num_classes=10).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maps = saliency(model, _images(300), method="integrated_gradients", steps=1)
    assert maps.shape == (300, 32, 32)


def test_explain_paths_streams_batches_with_the_same_results(tmp_path: Path, monkeypatch):
    import cifarlab.explain as ex

    run_dir = make_run(tmp_path / "run", tiny_recipe("airnet"))
    for i in range(5):
        Image.new("RGB", (32, 32), (40 * i, 200 - 30 * i, 90)).save(tmp_path / f"im{i}.png")
    paths = [tmp_path / f"im{i}.png" for i in range(5)]
    whole = ex.explain_paths(run_dir, paths, methods=("gradcam",), out_dir=tmp_path / "a")
    seen: list[int] = []
    real = ex.saliency
    monkeypatch.setattr(ex, "saliency", lambda model, x, **kw: seen.append(len(x)) or real(model, x, **kw))
    parts = ex.explain_paths(run_dir, paths, methods=("gradcam",), out_dir=tmp_path / "b", batch_size=2)
    assert seen == [2, 2, 1]
    assert [(r["class"], round(r["probability"], 5)) for r in parts] == [
        (r["class"], round(r["probability"], 5)) for r in whole
    ]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in (tmp_path / "b").iterdir())


def test_explain_out_file_is_refused_before_any_work(tmp_path: Path, capsys, monkeypatch):
    import cifarlab.explain as ex

    run_dir = make_run(tmp_path / "run", tiny_recipe("airnet"))
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "cat.png")
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.setattr(ex, "saliency", lambda *a, **k: pytest.fail("computed maps for an --out that is a file"))
    assert cli.main(["explain", str(run_dir), str(tmp_path / "cat.png"), "--out", str(afile)]) == 2
    err = capsys.readouterr().err
    assert f"--out {afile} is a file, not a folder" in err and "File exists" not in err
    assert cli.main(["explain", str(run_dir), str(tmp_path / "cat.png"), "--out", str(afile / "sub")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_explain_steps_message(tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["explain", str(tmp_path), str(tmp_path / "x.png"), "--steps", "abc"])
    err = capsys.readouterr().err
    assert "--steps: expected an integer from 1 to 1024, got 'abc'" in err and "_steps" not in err


def test_explain_names_keep_the_folder_and_say_when_a_png_is_replaced(tmp_path: Path, capsys):
    run_dir = make_run(tmp_path / "run", tiny_recipe("airnet"))
    for cls, rgb in (("cat", (200, 10, 10)), ("dog", (10, 200, 10))):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (32, 32), rgb).save(tmp_path / "imgs" / cls / "0000.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "maps"
    argv = ["explain", str(run_dir), str(tmp_path / "imgs"), "--out", str(out), "--method", "both", "--steps", "2"]
    assert cli.main(argv) == 0
    stdout, err = capsys.readouterr()
    assert sorted(p.name for p in out.iterdir()) == [
        "cat-0000.gradcam.png",
        "cat-0000.integrated_gradients.png",
        "dog-0000.gradcam.png",
        "dog-0000.integrated_gradients.png",
    ]
    assert "2 images explained (4 PNGs), 1 failed" in err and "replaced" not in stdout
    assert cli.main(argv) == 0
    stdout, err = capsys.readouterr()
    assert stdout.count("(replaced an earlier PNG)") == 4 and "4 of the PNGs replaced one of the same name" in err


def test_explain_steps_with_gradcam_only_is_said(tmp_path: Path, capsys):
    run_dir = make_run(tmp_path / "run", tiny_recipe("airnet"))
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "cat.png")
    assert cli.main(["explain", str(run_dir), str(tmp_path / "cat.png"), "--steps", "4"]) == 0
    err = capsys.readouterr().err
    assert "--steps is for integrated_gradients" in err and "1 image explained (1 PNG)" in err


def test_model_summary_lists_functional_pooling(capsys):
    assert cli.main(["model", "summary", "fast"]) == 0
    text = capsys.readouterr().out
    rows = [line.split()[0] for line in text.splitlines() if "(None," in line]
    assert rows.count("max_pooling2d") + sum(r.startswith("max_pooling2d_") for r in rows) == 3
    assert rows[-2:] == ["global_max_pooling2d", "dense"]
    # module pools (reference) are listed once, not again as the function they call
    ref = summary(build_model(tiny_recipe()))
    assert "global_max_pooling2d" not in ref
    assert sum(" (MaxPooling2D)" in line for line in ref.splitlines()) == len(tiny_recipe().widths)


def test_a_run_still_training_says_so(tmp_path: Path):
    from cifarlab.runs import load_run

    run_dir = make_run(tmp_path / "run", tiny_recipe("airnet"))
    (run_dir / "model.safetensors").unlink()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    # a live process that started before the status time (this test's parent), not this one
    (run_dir / "status.json").write_text(json.dumps({"status": "running", "pid": os.getppid(), "time": stamp}))
    with pytest.raises(UserError, match=r"is still training \(process \d+\).*when training ends"):
        load_run(run_dir).build_model()
    (run_dir / "status.json").write_text(json.dumps({"status": "crashed", "pid": os.getppid(), "time": stamp}))
    with pytest.raises(UserError, match="did training finish"):
        load_run(run_dir).build_model()


def test_data_preview_wording(tmp_path: Path, capsys):
    from conftest import write_imagefolder

    folder = write_imagefolder(tmp_path / "f")
    first = sorted((folder.root / "test").iterdir())[0]
    sorted(first.iterdir())[0].unlink()  # that class keeps 1 test image
    argv = ["data", "preview", "--dataset", str(folder.root), "--split", "test", "--per-class", "8"]
    assert cli.main([*argv, "--out", str(tmp_path / "p.png")]) == 0
    said = capsys.readouterr().out
    assert "x 1 image (the smallest class has 1 test image" in said and "1 images" not in said
    assert cli.main([*argv, "--out", str(tmp_path / "noext")]) == 2
    assert "has no suffix" in capsys.readouterr().err and not (tmp_path / "noext").exists()
    with pytest.raises(SystemExit):
        cli.main([*argv, "--per-class", "x", "--out", str(tmp_path / "q.png")])
    err = capsys.readouterr().err
    assert "expected an integer from 1 to 64, got 'x'" in err and "_per_class" not in err
