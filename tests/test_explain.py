"""Saliency maps (`cifarlab.explain`, Captum): shape, range, determinism, the model-randomization sanity check of
Adebayo et al. (2018), overlays, and the `cifarlab explain` command."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _runfolder import make_run, tiny_recipe
from _synth import fit_tiny, make_images
from cifarlab import cli
from cifarlab.errors import UserError
from cifarlab.explain import overlay, overlay_png, saliency, saliency_layer
from cifarlab.models import build_model
from cifarlab.runs import load_run

pytest.importorskip("captum")
METHODS = ("gradcam", "integrated_gradients")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A tiny reference CNN trained for a second on 4 learnable synthetic classes (bright squares), and
    held-out images and labels."""
    x, y = make_images(24, 4, seed=0)
    x_te, y_te = make_images(4, 4, seed=1)
    torch.manual_seed(1)
    model = build_model(tiny_recipe().replace(dropout=(0.0, 0.0)), num_classes=4)
    fit_tiny(model, x.float() / 255, y)
    with torch.no_grad():
        assert (model(x_te.float() / 255).argmax(1) == y_te).float().mean() >= 0.75  # it did learn
    return model, x_te, y_te


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().numpy(), b.flatten().numpy())[0])


@pytest.mark.parametrize("method", METHODS)
def test_maps_have_the_right_shape_range_and_are_deterministic(trained, method):
    model, x, y = trained
    maps = saliency(model, x, method=method, steps=8)
    assert maps.shape == (len(x), 32, 32) and maps.dtype == torch.float32
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1
    assert torch.allclose(maps.amax(dim=(1, 2)), torch.ones(len(x)))  # min-max normalised per image
    assert torch.equal(maps, saliency(model, x, method=method, steps=8))
    assert not model.training
    # one target for all, one per image, the predicted class by default
    pred = model(x.float() / 255).argmax(1)
    assert torch.equal(maps, saliency(model, x, method=method, target=pred, steps=8))
    assert saliency(model, x[:2], method=method, target=0, steps=8).shape == (2, 32, 32)


def test_model_randomization_changes_the_maps(trained):
    """Adebayo et al. 2018: a map that does not change when the weights are re-randomized does not explain
    the model. The trained model's maps must correlate weakly with those of the same net at random weights."""
    model, x, y = trained
    torch.manual_seed(123)
    random_model = build_model(tiny_recipe().replace(dropout=(0.0, 0.0)), num_classes=4).eval()
    for method in METHODS:
        a = saliency(model, x, method=method, target=y)
        b = saliency(random_model, x, method=method, target=y)
        rho = np.nanmean([spearman(a[i], b[i]) for i in range(len(x))])
        assert rho < 0.5, (method, rho)


def test_gradcam_of_the_trained_model_points_at_the_class_square(trained):
    model, x, y = trained
    maps = saliency(model, x, method="gradcam", target=y)
    inside, outside = [], []
    for m, k in zip(maps, y.tolist(), strict=True):
        r, c = 4 + 12 * (k // 2 % 2), 4 + 12 * (k % 2)  # where make_images puts class k's square
        mask = torch.zeros(32, 32, dtype=torch.bool)
        mask[r : r + 12, c : c + 12] = True
        inside.append(float(m[mask].mean()))
        outside.append(float(m[~mask].mean()))
    assert np.mean(inside) > np.mean(outside)


def test_all_zero_maps_stay_zero_and_bad_input_is_refused():
    class Constant(torch.nn.Module):  # a conv whose output the logits ignore: zero gradients everywhere
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 3)
            self.bias = torch.nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return self.conv(x).sum() * 0 + self.bias.expand(len(x), 3)

    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    for method in METHODS:
        assert torch.equal(saliency(Constant(), x, method=method, steps=4), torch.zeros(2, 8, 8))
    with pytest.raises(UserError, match="gradcam or integrated_gradients"):
        saliency(Constant(), x, method="lime")
    with pytest.raises(ValueError, match="uint8"):
        saliency(Constant(), x.float())
    with pytest.raises(UserError, match="no nn.Conv2d"):
        saliency_layer(torch.nn.Linear(2, 2))


def test_the_built_in_models_name_their_last_conv():
    for name in ("reference_cnn", "airnet"):
        model = build_model(tiny_recipe(name), num_classes=10)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert saliency_layer(model) is convs[-1]


def test_overlay_and_png():
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    heat = torch.rand(32, 32)
    o = overlay(img, heat, alpha=0.5)
    assert o.shape == (32, 32, 3) and o.dtype == np.uint8
    assert np.array_equal(overlay(img, heat, alpha=0.0), img.numpy().transpose(1, 2, 0))
    grey = overlay(img[:1], heat, alpha=0.0)
    assert grey.shape == (32, 32, 3) and np.array_equal(grey[..., 0], grey[..., 2])
    png = overlay_png(img, heat, scale=4)
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.size == (128, 128)
        assert np.array_equal(np.asarray(im.convert("RGB"))[::4, ::4], o)
    with pytest.raises(ValueError, match="does not match"):
        overlay(img, torch.rand(8, 8))


# -- the command -----------------------------------------------------------------------------------------------------


def test_explain_command(tmp_path: Path, capsys):
    run_dir = make_run(tmp_path / "run", tiny_recipe("airnet"))
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "cat.png")
    (tmp_path / "more").mkdir()
    Image.new("L", (32, 32), 90).save(tmp_path / "more" / "cat.jpg")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    argv = ["explain", str(run_dir), str(tmp_path / "cat.png"), str(tmp_path / "more"), str(tmp_path / "broken.png")]
    assert cli.main([*argv, "--method", "both", "--steps", "4"]) == 0
    out, err = capsys.readouterr()
    written = sorted(p.name for p in (run_dir / "explain").iterdir())
    top = tmp_path.name  # images from two folders: each name carries its folder's
    assert written == sorted(
        [
            "more-cat.gradcam.png",
            "more-cat.integrated_gradients.png",
            f"{top}-cat.gradcam.png",
            f"{top}-cat.integrated_gradients.png",
        ]
    )
    assert "broken.png" in out and "error: not an image" in out and "2 images explained (4 PNGs), 1 failed" in err
    run = load_run(run_dir)
    assert any(c in out for c in run.classes) and "%" in out
    with Image.open(run_dir / "explain" / f"{top}-cat.gradcam.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]  # side by side

    out_dir = tmp_path / "maps"
    assert (
        cli.main(["explain", str(run_dir), str(tmp_path / "cat.png"), "--target", "ship", "--out", str(out_dir)]) == 0
    )
    out = capsys.readouterr().out
    assert "ship" in out and (out_dir / "cat.gradcam.png").is_file()

    assert cli.main(["explain", str(run_dir), str(tmp_path / "cat.png"), "--target", "zebra"]) == 2
    assert "zebra" in capsys.readouterr().err
    assert cli.main(["explain", str(run_dir), str(tmp_path / "broken.png")]) == 1


def test_missing_captum_is_one_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_captum(name, *a, **k):
        if name.startswith("captum"):
            raise ImportError("No module named 'captum'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_captum)
    with pytest.raises(UserError, match=r"pip install 'cifarlab\[explain\]'"):
        saliency(torch.nn.Conv2d(3, 1, 1), torch.zeros((1, 3, 4, 4), dtype=torch.uint8))
