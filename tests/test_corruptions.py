"""CIFAR-10-C style corruptions (`cifarlab.corruptions`), `evaluate_corruptions`, and `cifarlab evaluate
--corruptions` / `--test-data` on tiny runs and tiny datasets."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from _runfolder import make_run, tiny_recipe
from _synth import fit_tiny, make_images
from cifarlab import cli
from cifarlab.corruptions import CORRUPTIONS, corrupt, evaluate_corruptions, parse_severities
from cifarlab.data import Dataset
from cifarlab.errors import ConfigError, UserError
from cifarlab.models import build_model
from cifarlab.runs import WEIGHTS, save_weights
from conftest import write_imagefolder
from test_evaluate import direct_logits, unambiguous

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "fog"}
ALL = CORRUPTIONS.names()


pytestmark = pytest.mark.usefixtures("one_thread")


def images(c: int = 3, n: int = 4, seed: int = 0) -> torch.Tensor:
    """Random pixels on a smooth gradient: neither flat nor pure noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(30, 220, 32).view(1, 1, 1, 32).expand(n, c, 32, 32)
    return (ramp + torch.randint(-30, 31, (n, c, 32, 32), generator=g)).clamp(0, 255).to(torch.uint8)


def test_the_registry_has_the_required_corruptions():
    for name in (
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "gaussian_blur",
        "jpeg",
        "brightness",
        "contrast",
        "pixelate",
        "fog",
    ):
        assert name in CORRUPTIONS and CORRUPTIONS.describe(name)
    with pytest.raises(ConfigError, match="accepted values: gaussian_noise"):
        corrupt(images(), "nope", 1)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("channels", [3, 1])
def test_every_corruption_is_deterministic_typed_and_monotone(name: str, channels: int):
    x = images(channels)
    assert torch.equal(corrupt(x, name, 0), x)  # severity 0: exactly the input
    assert corrupt(x, name, 0) is not x
    changes = []
    for s in range(1, 6):
        a = corrupt(x, name, s, seed=3)
        assert a.dtype == torch.uint8 and a.shape == x.shape
        assert torch.equal(a, corrupt(x, name, s, seed=3))  # same seed, same output
        if name in RANDOM:
            assert not torch.equal(a, corrupt(x, name, s, seed=4))  # another seed, other noise
        changes.append((a.float() - x.float()).abs().mean().item())
    assert changes[0] > 0
    assert all(b >= a for a, b in zip(changes, changes[1:])), changes  # severities never change less
    # numpy in, numpy out, the same pixels
    assert np.array_equal(corrupt(x.numpy(), name, 3, seed=3), corrupt(x, name, 3, seed=3).numpy())


def test_bad_input():
    with pytest.raises(UserError, match="severity"):
        corrupt(images(), "jpeg", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(images().float(), "jpeg", 1)
    assert parse_severities("3, 1,3") == (1, 3)
    with pytest.raises(UserError, match="severities"):
        parse_severities("1,9")


def test_a_new_corruption_is_one_decorated_function():
    @CORRUPTIONS.register("invert_test")
    def invert(x, severity, rng):
        """blend towards the negative"""
        a = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
        return (1 - a) * x + a * (1 - x)

    try:
        x = images()
        assert corrupt(x, "invert_test", 5).float().mean() != x.float().mean()
        assert CORRUPTIONS.describe("invert_test") == "blend towards the negative"
    finally:
        CORRUPTIONS.unregister("invert_test")


# -- what each corruption does, from its documented parameter (CIFAR-10-C's make_cifar_c.py) ---------------------

SEVERITIES = range(1, 6)


def flat(value: int, c: int = 3, n: int = 8, size: int = 32) -> torch.Tensor:
    return torch.full((n, c, size, size), value, dtype=torch.uint8)


def f64(x: torch.Tensor) -> np.ndarray:
    return x.numpy().astype(np.float64)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_gaussian_noise_has_the_documented_std(severity: int):
    s = (0.04, 0.06, 0.08, 0.09, 0.10)[severity - 1]
    x = flat(128)  # mid-grey: +-4 std stays inside [0, 255], no clipping
    d = f64(corrupt(x, "gaussian_noise", severity)) - 128
    assert abs(d.mean()) < 1.0  # zero-mean noise (the sample mean's own sd is <= 0.17 here)
    assert d.std() == pytest.approx(255 * s, rel=0.03)  # 24,576 draws: the sample std is within ~0.5%


@pytest.mark.parametrize("severity", SEVERITIES)
def test_shot_noise_is_poisson_with_the_documented_photon_count(severity: int):
    c = (500, 250, 100, 75, 50)[severity - 1]
    p = 128 / 255
    out = f64(corrupt(flat(128), "shot_noise", severity))
    # Poisson(p c) / c: mean p, variance p / c
    assert out.mean() == pytest.approx(128, abs=1.0)
    assert out.std() == pytest.approx(255 * np.sqrt(p / c), rel=0.03)
    # every value is k / c photons for a whole k (visible where levels are > 1 apart: c < 255)
    if c < 255:
        k = np.rint(out / 255 * c)
        assert np.all(np.abs(np.rint(255 * k / c) - out) == 0)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_impulse_noise_sets_the_documented_share_to_black_or_white(severity: int):
    amount = (0.01, 0.02, 0.03, 0.05, 0.07)[severity - 1]
    out = corrupt(flat(128), "impulse_noise", severity).numpy()
    hit = out != 128
    assert set(np.unique(out[hit]).tolist()) <= {0, 255}  # salt or pepper, nothing in between
    n = out.size
    assert abs(hit.sum() - n * amount) < 5 * np.sqrt(n * amount * (1 - amount))  # binomial, 5 sigma
    salt = int((out == 255).sum())
    assert abs(salt - hit.sum() / 2) < 5 * np.sqrt(hit.sum() / 4)  # salt and pepper equally likely


@pytest.mark.parametrize("severity", SEVERITIES)
def test_gaussian_blur_spreads_a_point_into_the_sampled_gaussian(severity: int):
    sigma = (0.4, 0.6, 0.7, 0.8, 1.0)[severity - 1]
    x = torch.zeros((1, 3, 32, 32), dtype=torch.uint8)
    x[0, 1, 16, 16] = 255  # one white point in the middle channel
    out = f64(corrupt(x, "gaussian_blur", severity))
    j = np.arange(-6, 7)
    k = np.exp(-(j**2) / (2 * sigma**2))
    k /= k.sum()  # the normalised sampled Gaussian, applied along rows and columns
    expected = np.zeros((32, 32))
    expected[10:23, 10:23] = 255 * np.outer(k, k)
    assert np.abs(out[0, 1] - expected).max() <= 0.5 + 1e-9  # up to rounding to whole levels
    assert out[0, 0].max() == 0 and out[0, 2].max() == 0  # spatial blur only: channels do not mix


@pytest.mark.parametrize("severity", SEVERITIES)
def test_brightness_adds_the_documented_amount_to_the_hsv_value(severity: int):
    c = (0.05, 0.1, 0.15, 0.2, 0.3)[severity - 1]
    g = torch.Generator().manual_seed(1)
    x = torch.randint(20, 236, (4, 3, 16, 16), generator=g, dtype=torch.uint8)  # no black pixel: V > 0
    a = f64(x) / 255
    v = a.max(axis=1, keepdims=True)  # HSV value = max(R, G, B)
    # hue and saturation kept, V -> min(V + c, 1): every channel scales by the new V over the old one
    expected = a * np.minimum(v + c, 1) / v * 255
    out = f64(corrupt(x, "brightness", severity))
    assert np.abs(out - expected).max() <= 0.5 + 1e-6
    assert out.mean() > f64(x).mean() + 255 * c / 2
    grey = x[:, :1]
    assert np.abs(f64(corrupt(grey, "brightness", severity)) - np.minimum(f64(grey) + 255 * c, 255)).max() <= 0.5


def coloured(n: int = 4) -> torch.Tensor:
    """Noise around a different level per channel (a colour cast), never clipped by a contrast change."""
    g = torch.Generator().manual_seed(2)
    levels = torch.tensor([180.0, 110.0, 50.0]).view(1, 3, 1, 1)
    return (levels + torch.randint(-40, 41, (n, 3, 32, 32), generator=g)).to(torch.uint8)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_contrast_shrinks_the_spread_around_the_mean_by_the_documented_factor(severity: int):
    c = (0.75, 0.5, 0.4, 0.3, 0.15)[severity - 1]
    x = f64(coloured())
    out = f64(corrupt(coloured(), "contrast", severity))
    # per image and channel, the spread around the channel's own mean scales by c (whichever mean it pulls to)
    assert np.allclose(out.std(axis=(2, 3)), c * x.std(axis=(2, 3)), rtol=0.01, atol=0.3)
    assert np.allclose(out.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=0.5)  # the image mean is kept
    grey = coloured()[:, :1]
    g_out = f64(corrupt(grey, "contrast", severity))
    assert np.allclose(g_out.std(axis=(2, 3)), c * f64(grey).std(axis=(2, 3)), rtol=0.01, atol=0.3)


def test_contrast_keeps_each_channels_mean_as_cifar_10_c_does():
    x = coloured()
    out = f64(corrupt(x, "contrast", 5))
    assert np.allclose(out.mean(axis=(2, 3)), f64(x).mean(axis=(2, 3)), atol=0.5)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_fog_on_a_flat_image_spans_the_documented_range(severity: int):
    strength = (0.2, 0.5, 0.75, 1.0, 1.5)[severity - 1]
    v = 153 / 255
    out = f64(corrupt(flat(153, n=2), "fog", severity))
    # (v + s * fractal) * v / (v + s) with the fractal spanning [0, 1]: from v^2 / (v + s) up to v exactly
    for img in out:
        assert img.max() == pytest.approx(153, abs=0.5)
        assert img.min() == pytest.approx(255 * v * v / (v + strength), abs=0.5 + 1e-6)
        assert np.array_equal(img[0], img[1]) and np.array_equal(img[0], img[2])  # the same fog on each channel
    assert not np.array_equal(out[0], out[1])  # each image its own fractal


@pytest.mark.parametrize("severity", SEVERITIES)
@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 24, 40), (1, 32, 32)], ids=["rgb", "rgb-24x40", "grey"])
def test_pixelate_is_a_box_downscale_and_box_upscale(severity: int, shape: tuple[int, int, int]):
    from PIL import Image

    c = (0.95, 0.9, 0.85, 0.75, 0.65)[severity - 1]
    ch, h, w = shape
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (2, ch, h, w), generator=g, dtype=torch.uint8)
    out = corrupt(x, "pixelate", severity).numpy()
    for img, got in zip(x.numpy(), out):
        pil = Image.fromarray(img[0]) if ch == 1 else Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)))
        small = pil.resize((int(w * c), int(h * c)), Image.Resampling.BOX)
        assert small.size[0] < w  # it really is smaller
        want = np.asarray(small.resize((w, h), Image.Resampling.BOX))
        want = want[None] if ch == 1 else want.transpose(2, 0, 1)
        assert np.array_equal(got, want)


def _jpeg_round_trip(img: np.ndarray, quality: int) -> np.ndarray:
    import io

    from PIL import Image

    pil = (
        Image.fromarray(img[0], "L") if len(img) == 1 else Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)))
    )
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=quality)
    back = np.asarray(Image.open(io.BytesIO(buf.getvalue())))
    return back[None] if len(img) == 1 else back.transpose(2, 0, 1)


@pytest.mark.parametrize("channels", [3, 1])
def test_jpeg_is_a_pil_round_trip_at_the_documented_quality(channels: int):
    x = images(channels, n=2)
    for severity, quality in zip(SEVERITIES, (80, 65, 58, 50, 40)):
        out = corrupt(x, "jpeg", severity).numpy()
        for img, got in zip(x.numpy(), out):
            assert np.array_equal(got, _jpeg_round_trip(img, quality))
            assert not np.array_equal(got, _jpeg_round_trip(img, quality + 5))  # the quality is pinned down


# -- a run under corruption ----------------------------------------------------------------------------------------


def _run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "20260101-120000-reference", tiny_recipe())


def test_evaluate_corruptions_on_a_tiny_run(tmp_path: Path, tiny_cifar10):
    run_dir = _run(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny archive's MD5 is not the official one
        r = evaluate_corruptions(
            run_dir, data_dir=tiny_cifar10.data_dir, severities=(1, 5), names=["contrast", "jpeg"], limit=6
        )
    assert r["n"] == 6 and r["seed"] == 0 and r["severities"] == [1, 5]
    assert set(r["results"]) == {"contrast", "jpeg"} and set(r["results"]["jpeg"]) == {1, 5}
    accs = [a for v in r["results"].values() for a in v.values()]
    assert all(0 <= a <= 1 for a in accs)
    assert r["mean_accuracy"] == pytest.approx(np.mean(accs))
    clean = r["clean_accuracy"]  # an untrained model: may well be 0, then there is no relative drop
    assert r["relative_drop"] == (pytest.approx(1 - r["mean_accuracy"] / clean) if clean > 0 else None)
    with pytest.raises(ConfigError, match="accepted values"):
        evaluate_corruptions(run_dir, data_dir=tiny_cifar10.data_dir, names=["nope"])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory):
    """(run folder, the trained model, its 4-class synthetic data, mean, std): a tiny reference CNN trained for a
    second on bright-square classes with standardize scaling, saved as a run that evaluates with flip TTA in
    fp32, so corrupted accuracies can be recomputed exactly by hand."""
    classes = tuple(f"class{k}" for k in range(4))
    recipe = tiny_recipe().replace(scaling="standardize", tta="flip", precision="fp32", dropout=(0.0, 0.0))
    run_dir = make_run(tmp_path_factory.mktemp("trained") / "20260101-120000-reference", recipe, classes=classes)
    norm = json.loads((run_dir / "config.json").read_text())["normalization"]
    mean, std = norm["mean"], norm["std"]
    assert mean is not None  # standardize scaling: the run has a normalization to apply
    x, y = make_images(24, 4, seed=0)
    x_te, y_te = make_images(8, 4, seed=1)
    torch.manual_seed(1)
    model = build_model(recipe, num_classes=4)
    xf = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    fit_tiny(model, xf, y)
    save_weights(model, run_dir / WEIGHTS)  # the run evaluates the weights it learned
    ds = Dataset(
        name="synthetic",
        classes=classes,
        x_train=x,
        y_train=y,
        x_test=x_te,
        y_test=y_te,
        source="synthetic",
        checksum="",
        cache_dir="",
    )
    return run_dir, model, ds, mean, std


def direct_accuracy(trained_run, images: torch.Tensor) -> tuple[float, int]:
    """(accuracy of the trained model on `images` by hand: run's mean/std + flip TTA, images a near-tie could
    flip): the expected value, computed without cifarlab's inference code."""
    _, model, ds, mean, std = trained_run
    z = direct_logits(model, images, mean, std, "flip")
    return float((z.argmax(1) == ds.y_test.numpy()).mean()), int((~unambiguous(z)).sum())


@pytest.mark.usefixtures("cpu_inference")
def test_corrupted_accuracies_match_a_direct_prediction_on_corrupted_images(trained_run):
    run_dir, _, ds, _, _ = trained_run
    n = len(ds.y_test)
    r = evaluate_corruptions(run_dir, dataset=ds, severities=(1, 5), seed=3)
    clean, ambiguous = direct_accuracy(trained_run, ds.x_test)
    assert clean >= 0.9  # the model learned: corruptions have something to destroy
    assert abs(r["clean_accuracy"] - clean) * n <= ambiguous
    assert r["n"] == n and set(r["results"]) == set(ALL)
    for name in ALL:
        for s in (1, 5):
            want, ambiguous = direct_accuracy(trained_run, corrupt(ds.x_test, name, s, seed=3))
            assert abs(r["results"][name][s] - want) * n <= ambiguous, (name, s)
    # destructive corruptions at severity 5 cost accuracy (so clean images evaluated twice would show)
    for name in ("impulse_noise", "contrast"):
        assert r["results"][name][5] < r["clean_accuracy"], name
    accs = [a for v in r["results"].values() for a in v.values()]
    assert r["mean_accuracy"] == pytest.approx(np.mean(accs)) and r["mean_accuracy"] < r["clean_accuracy"]
    assert r["relative_drop"] == pytest.approx(1 - np.mean(accs) / r["clean_accuracy"]) and r["relative_drop"] > 0
    assert r["per_corruption"]["contrast"] == pytest.approx(np.mean(list(r["results"]["contrast"].values())))
    # severity 0 (the clean images) is shown beside the others but not averaged in as a corruption
    with_clean = evaluate_corruptions(run_dir, dataset=ds, severities=(0, 1, 5), names=["contrast"], seed=3)
    assert with_clean["results"]["contrast"][0] == r["clean_accuracy"]
    assert with_clean["per_corruption"]["contrast"] == pytest.approx(r["per_corruption"]["contrast"])
    with pytest.raises(UserError, match="corrupts nothing"):
        evaluate_corruptions(run_dir, dataset=ds, severities=(0,))


@pytest.mark.usefixtures("cpu_inference")
def test_evaluate_command_corruptions_match_a_direct_prediction(trained_run, monkeypatch, capsys):
    run_dir, _, ds, _, _ = trained_run
    monkeypatch.setattr("cifarlab.evaluate.load_run_dataset", lambda run, data_dir=None: ds)
    argv = ["evaluate", str(run_dir), "--corruptions", "--corruption-names", "impulse_noise,contrast"]
    assert cli.main([*argv, "--severities", "5", "--corruption-seed", "7", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run_dir / "eval_corruptions.json").read_text())
    assert printed["results"] == saved["results"] and saved["seed"] == 7
    n = len(ds.y_test)
    for name in ("impulse_noise", "contrast"):
        want, ambiguous = direct_accuracy(trained_run, corrupt(ds.x_test, name, 5, seed=7))
        assert abs(saved["results"][name]["5"] - want) * n <= ambiguous, name
    clean, ambiguous = direct_accuracy(trained_run, ds.x_test)
    assert abs(saved["clean_accuracy"] - clean) * n <= ambiguous


def test_evaluate_command_with_corruptions_writes_the_json(tmp_path: Path, tiny_cifar10, capsys):
    run_dir = _run(tmp_path)
    argv = ["evaluate", str(run_dir), "--data-dir", str(tiny_cifar10.data_dir), "--corruptions"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main([*argv, "--severities", "1,3", "--corruption-limit", "4"]) == 0
    out, err = capsys.readouterr()
    assert "clean accuracy" in out and "mean corruption accuracy" in out and "relative drop" in out
    for name in ALL:
        assert name in out
    saved = json.loads((run_dir / "eval_corruptions.json").read_text())
    for key in ("clean_accuracy", "n", "seed", "results", "mean_accuracy", "relative_drop", "per_corruption"):
        assert key in saved
    assert saved["n"] == 4 and set(saved["results"]) == set(ALL)
    assert set(saved["results"]["fog"]) == {"1", "3"}
    assert not (run_dir / "eval_test.json").exists()


def test_corruptions_that_cannot_be_saved_are_printed_with_the_reason(
    tmp_path: Path, tiny_cifar10, monkeypatch, capsys
):
    import errno

    run_dir = _run(tmp_path)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("cifarlab.files.write_json", read_only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        argv = ["evaluate", str(run_dir), "--data-dir", str(tiny_cifar10.data_dir), "--corruptions"]
        assert cli.main([*argv, "--severities", "2", "--corruption-names", "contrast"]) == 1
    out, err = capsys.readouterr()
    assert "mean corruption accuracy" in out
    assert err.endswith(
        f"error: results not saved: cannot write {run_dir / 'eval_corruptions.json'}: Read-only file system\n"
    )
    assert not (run_dir / "eval_corruptions.json").exists()


# -- another test set ------------------------------------------------------------------------------------------------


def test_evaluate_on_other_test_data_with_a_subset_of_classes(tmp_path: Path, tiny_imagefolder, capsys):
    run_dir = _run(tmp_path)
    assert cli.main(["evaluate", str(run_dir), "--test-data", str(tiny_imagefolder.root)]) == 0
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    # only the resize of the folder's odd-sized images is announced: a subset of the classes is not a problem
    assert "accuracy" in out and [w for w in warnings if "resized to 32x32" not in w] == [], err
    assert "UserWarning" not in err  # scikit-learn's note that predictions name classes the data lacks
    [saved_file] = run_dir.glob("eval_data-tinyfolder-*.json")  # <name>-<hash of the source's path>
    saved = json.loads(saved_file.read_text())
    n = sum(tiny_imagefolder.counts["test"].values())
    assert saved["n"] == n and saved["classes"] == list(
        json.loads((run_dir / "config.json").read_text())["dataset"]["classes"]
    )
    support = {c: m["support"] for c, m in saved["per_class"].items() if m["support"]}
    assert support == tiny_imagefolder.counts["test"]  # labels mapped onto the run's classes by name
    assert saved["dataset"]["checksum_matches_run"] is None
    assert not (run_dir / "eval_test.json").exists()
    # robustness on that test set too
    argv = ["evaluate", str(run_dir), "--test-data", str(tiny_imagefolder.root), "--corruptions"]
    assert cli.main([*argv, "--severities", "1", "--corruption-names", "jpeg,contrast", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == n


def test_evaluate_on_test_data_with_unknown_classes_fails_clearly(tmp_path: Path, capsys):
    run_dir = _run(tmp_path)
    folder = write_imagefolder(tmp_path / "zoo", {"cat": (200, 30, 40), "zebra": (10, 10, 10)})
    assert cli.main(["evaluate", str(run_dir), "--test-data", str(folder.root)]) == 2
    err = capsys.readouterr().err
    assert "zebra" in err and "not classes of the run" in err and "Traceback" not in err
    # no class in common: said as such, not as a subset "which is fine"
    other = write_imagefolder(tmp_path / "other", {"zebra": (10, 10, 10), "lion": (200, 200, 10)})
    assert cli.main(["evaluate", str(run_dir), "--test-data", str(other.root)]) == 2
    err = capsys.readouterr().err
    assert "none of its classes" in err and "which is fine" not in err
    assert cli.main(["evaluate", str(run_dir), "--test-data", str(folder.root), "--split", "val"]) == 2
    assert "no validation split" in capsys.readouterr().err
