"""The softmax temperature (`cifarlab.calibrate`): fitted after training, stored with the weights, applied by every
path that gives probabilities (API, predict, serve, ONNX/TorchScript export, evaluate and the report)."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _runfolder import make_run, tiny_recipe
from _synth import make_dataset, make_images
from cifarlab import api, cli, export
from cifarlab.api import TrainedRun
from cifarlab.calibrate import CALIBRATION_IMAGES, calibrate_run, calibration_split, fit_temperature
from cifarlab.errors import UserError
from cifarlab.evaluate import calibration, evaluate_run, softmax, split_images
from cifarlab.experiment import run_experiment
from cifarlab.inference import predict_logits, recipe_options
from cifarlab.predict import predict_paths
from cifarlab.recipes import get_recipe
from cifarlab.runs import TEMPERATURE, WEIGHTS, RunLock, load_run, read_json, save_weights, write_json, write_status


def _sampled(t_true: float, n: int = 20000, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits z and labels drawn from softmax(z / t_true): the temperature that fits them best is t_true."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 4
    y = torch.multinomial(torch.softmax(z / t_true, dim=1), 1, generator=g).squeeze(1)
    return z, y


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_fit_recovers_the_temperature_the_labels_were_drawn_with(t_true: float):
    z, y = _sampled(t_true)
    t = fit_temperature(z, y)
    assert abs(t - t_true) / t_true < 0.05, (t, t_true)
    nll = [F.cross_entropy(z / s, y).item() for s in (t / 1.02, t, t * 1.02)]
    assert nll[1] <= min(nll[0], nll[2])  # a minimum, not a point beside it


def test_fit_ends_of_the_range_and_bad_shapes():
    z = torch.tensor([[3.0, 0.0], [0.0, 3.0]] * 50)
    assert fit_temperature(z, torch.tensor([0, 1] * 50)) < 0.05  # always right: as sure as allowed
    assert fit_temperature(z, torch.tensor([1, 0] * 50)) > 20  # always wrong: as unsure as allowed
    with pytest.raises(ValueError, match="labels"):
        fit_temperature(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))


def test_calibration_split_prefers_the_validation_split():
    x = torch.arange(5000).view(-1, 1, 1, 1).expand(-1, 1, 2, 2).to(torch.uint8)
    y = torch.arange(5000) % 7
    tr, va = torch.arange(0, 4000), torch.arange(4000, 5000)
    xc, yc, what = calibration_split(x, y, tr, va[:300], seed=0)
    assert what == "300 validation images" and torch.equal(yc.sort().values, y[4000:4300].sort().values)
    # More validation images than it takes: a random draw of them, not the first ones (the split's indices are
    # sorted, and files stored class by class made the first 1,000 of CIFAR-10's validation split all airplanes).
    by_class = torch.arange(20000) // 2000  # 10 classes, stored in order
    x20 = torch.zeros(20000, 1, 2, 2, dtype=torch.uint8)
    _, yv, what = calibration_split(x20, by_class, torch.arange(0, 10000), torch.arange(10000, 20000), seed=0)
    assert what == f"{CALIBRATION_IMAGES} validation images"
    assert set(yv.tolist()) == set(range(5, 10)) and int(torch.bincount(yv)[5:].min()) > 150
    xc, yc, what = calibration_split(x, y, tr, va[:0], seed=0)
    assert what == f"{CALIBRATION_IMAGES} training images" and len(yc) == CALIBRATION_IMAGES
    xc2, yc2, _ = calibration_split(x, y, tr, va[:0], seed=0)
    assert torch.equal(xc, xc2) and torch.equal(yc, yc2)  # the run's seed picks them: a resume picks the same
    assert not torch.equal(yc, calibration_split(x, y, tr, va[:0], seed=1)[1])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A tiny airnet trained by the real loop, with label smoothing as `fast` has it (so under-confident)."""
    ds = make_dataset(40, 10)
    recipe = get_recipe("fast").replace(widths=(8, 16, 16), epochs=3, batch_size=16, precision="fp32")
    res = run_experiment(recipe, dataset=ds, runs_root=tmp_path_factory.mktemp("runs"), quiet=True, report=False)
    assert res.status == "finished"
    return res.run_dir, ds


def test_a_trained_run_stores_the_temperature_its_calibration_images_give(trained):
    run_dir, ds = trained
    run = load_run(run_dir)
    cal = read_json(run_dir / "metrics.json")["calibration"]
    assert cal["fitted_on"] == f"{len(ds.y_train)} training images"  # fewer than CALIBRATION_IMAGES: all of them
    assert run.temperature == cal["temperature"] != 1.0
    # Recomputed independently: the logits of the same images through the same inference path, on the device the
    # run trained on (the fitted temperature can be small here, which magnifies a CPU/GPU difference in logits).
    mean, std = run.normalization
    model = run.build_model().to(run.config["machine"]["device"])
    z = predict_logits(model, ds.x_train, mean=mean, std=std, **recipe_options(run.recipe))
    assert math.isclose(fit_temperature(z, ds.y_train), run.temperature, rel_tol=1e-3)
    assert cal["fit_loss_after"] <= cal["fit_loss_before"]
    # ...and the test loss at the temperature is what metrics.json says.
    zt = predict_logits(model, ds.x_test, mean=mean, std=std, **recipe_options(run.recipe))
    assert math.isclose(F.cross_entropy(zt / run.temperature, ds.y_test).item(), cal["test_loss"], rel_tol=1e-3)


def test_every_probability_path_applies_it(trained, tmp_path: Path):
    run_dir, ds = trained
    run = load_run(run_dir)
    t = run.temperature
    mean, std = run.normalization
    x = ds.x_test[:12]
    z = predict_logits(run.build_model(), x, mean=mean, std=std, **recipe_options(run.recipe))
    expected = torch.softmax(z / t, dim=1)
    assert not torch.allclose(expected, torch.softmax(z, dim=1), atol=1e-3)  # the temperature matters here
    loaded = api.load(run_dir)
    assert loaded.temperature == t
    torch.testing.assert_close(loaded.predict(x), expected, atol=1e-5, rtol=0)
    # Files through `cifarlab predict`.
    from PIL import Image

    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(p)
        paths.append(p)
    for i, r in enumerate(predict_paths(run_dir, paths, top_k=1)):
        assert r["top_k"][0]["probability"] == pytest.approx(expected[i].max().item(), abs=1e-5)
    # TorchScript export (ONNX below, where onnxruntime is installed).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load: still how TorchScript loads
        ts = torch.jit.load(str(export.export_torchscript(run_dir, tmp_path / "m.pt")))
    torch.testing.assert_close(ts(x), run_probs_fp32(run_dir, x), atol=1e-4, rtol=0)


def run_probs_fp32(run_dir: Path, x: torch.Tensor) -> torch.Tensor:
    """What an export must give: fp32, the recipe's TTA (in the graph), at the run's temperature."""
    run = load_run(run_dir)
    mean, std = run.normalization
    z = predict_logits(run.build_model(), x, mean=mean, std=std, tta=run.recipe.tta, precision="fp32")
    return torch.softmax(z / run.temperature, dim=1)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs the export extra (onnxruntime)")
def test_onnx_export_carries_the_temperature(tmp_path: Path):
    import onnx
    import onnxruntime as ort

    run_dir = make_run(tmp_path / "20260101-120000-fast", tiny_recipe("airnet"), temperature=0.4)
    path = export.export_onnx(run_dir, tmp_path / "m.onnx")
    x, _ = make_images(4, n_classes=4, seed=5)
    [got] = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), run_probs_fp32(run_dir, x), atol=1e-4, rtol=0)
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert float(meta["temperature"]) == 0.4


def test_evaluate_and_the_report_use_it(trained):
    run_dir, ds = trained
    run = load_run(run_dir)
    ev, preds = evaluate_run(run_dir, dataset=ds)
    mean, std = run.normalization
    assert ev.inference is not None
    model = run.build_model().to(ev.inference.device)  # where evaluate ran: a GPU's logits differ in the last bits
    z = predict_logits(model, ds.x_test, mean=mean, std=std, **recipe_options(run.recipe)).double()
    y = ds.y_test.numpy()
    p = softmax((z / run.temperature).numpy())
    assert ev.inference.temperature == run.temperature
    assert ev.calibration.ece == pytest.approx(calibration(p.max(1), p.argmax(1) == y).ece, abs=1e-6)
    raw = softmax(z.numpy())
    assert ev.inference.uncalibrated_ece == pytest.approx(calibration(raw.max(1), raw.argmax(1) == y).ece, abs=1e-6)
    assert ev.loss == pytest.approx(F.cross_entropy(z / run.temperature, ds.y_test.long()).item(), abs=1e-5)
    np.testing.assert_allclose(preds.probs, p, atol=1e-6)
    assert ev.to_dict()["inference"]["temperature"] == run.temperature
    assert ev.inference.temperature_fitted_on == f"{len(ds.y_train)} training images"


def test_recipes_without_calibration_and_old_runs_keep_the_plain_softmax(tmp_path: Path):
    assert get_recipe("reference").calibrate is False  # the reference is Keras's softmax, as pinned
    assert get_recipe("fast").calibrate and get_recipe("air94").calibrate
    run_dir = make_run(tmp_path / "20260101-120000-fast", tiny_recipe("airnet"))  # no temperature stored
    assert load_run(run_dir).temperature == 1.0
    ds = make_dataset(8, 4, n_classes=10)
    recipe = tiny_recipe("airnet").replace(epochs=1, batch_size=16, calibrate=False, precision="fp32", tta="none")
    res = run_experiment(recipe, dataset=ds, runs_root=tmp_path, quiet=True, report=False)
    assert res.metrics["calibration"] is None and load_run(res.run_dir).temperature == 1.0


@pytest.mark.parametrize("bad", ["nan", "-1", "0", "abc", "inf"])
def test_a_damaged_temperature_is_one_clear_error(tmp_path: Path, bad: str):
    run_dir = make_run(tmp_path / "20260101-120000-fast", tiny_recipe("airnet"))
    run = load_run(run_dir)
    save_weights(run.build_model(), run_dir / WEIGHTS, metadata={TEMPERATURE: bad})
    with pytest.raises(UserError, match="temperature .* is not a positive number; the file is damaged"):
        load_run(run_dir).temperature  # noqa: B018


# -- calibrating a run afterwards: `cifarlab calibrate`, TrainedRun.calibrate --------------------------------------


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_calibrate_run_fits_on_the_reproduced_validation_split_and_keeps_the_weights(tmp_path: Path):
    ds = make_dataset(30, 10)
    recipe = tiny_recipe("reference_cnn").replace(epochs=2, batch_size=16, precision="fp32", val_fraction=0.25)
    res = run_experiment(recipe, dataset=ds, runs_root=tmp_path, quiet=True, report=False)
    run_dir = res.run_dir
    assert res.metrics["calibration"] is None and load_run(run_dir).temperature == 1.0
    plain_loss = res.metrics["test_loss"]
    before = _tensors(run_dir / WEIGHTS)
    result = calibrate_run(run_dir, dataset=ds)
    assert result is not None and result["fitted_on"] == "30 validation images"  # 25% of 120
    # metrics.json's loss was the plain softmax's: unknown at the new temperature until `report`, the plain one kept
    m = read_json(run_dir / "metrics.json")
    assert m["test_loss"] is None and m["test_loss_uncalibrated"] == plain_loss
    run = load_run(run_dir)
    assert run.temperature == result["temperature"] and read_json(run_dir / "metrics.json")["calibration"] == result
    after = _tensors(run_dir / WEIGHTS)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    from safetensors import safe_open

    with safe_open(str(run_dir / WEIGHTS), framework="pt") as f:
        assert f.metadata()["recipe"] == recipe.name  # the other metadata is kept
    # Independently: the validation split as `evaluate --split val` reproduces it, through the run's inference.
    x, y, _ = split_images(run, ds, "val")
    mean, std = run.normalization
    z = predict_logits(run.build_model(), x, mean=mean, std=std, **recipe_options(run.recipe))
    assert math.isclose(fit_temperature(z, y), run.temperature, rel_tol=1e-3)
    # The report says what the temperature was fitted on, and that the validation split's ECE is then in-sample.
    from cifarlab.report.sections import _temperature_rows

    [[label, value], _] = _temperature_rows(evaluate_run(run_dir, split="val", dataset=ds)[0])
    assert "on 30 validation images: these images, so the ECE here is optimistic" in label
    assert value == f"{run.temperature:.4g}"
    assert "optimistic" not in _temperature_rows(evaluate_run(run_dir, dataset=ds)[0])[0][0]
    # --off: the plain softmax again, the same tensors.
    assert calibrate_run(run_dir, off=True) is None
    assert load_run(run_dir).temperature == 1.0 and read_json(run_dir / "metrics.json")["calibration"] is None
    m = read_json(run_dir / "metrics.json")
    assert m["test_loss"] == plain_loss and m["test_loss_uncalibrated"] is None  # the plain softmax's again
    assert all(torch.equal(before[k], v) for k, v in _tensors(run_dir / WEIGHTS).items())
    # The API: fit again, and predict applies it.
    trained = TrainedRun(load_run(run_dir), dataset=ds)
    t = trained.calibrate()
    assert t == pytest.approx(result["temperature"], rel=1e-6) and trained.temperature == t
    probs = trained.predict(ds.x_test[:4])
    zt = predict_logits(run.build_model(), ds.x_test[:4], mean=mean, std=std, **recipe_options(run.recipe))
    torch.testing.assert_close(probs, torch.softmax(zt / t, dim=1), atol=1e-5, rtol=0)


def test_calibrate_run_refuses_unfinished_runs_other_data_and_a_busy_folder(tmp_path: Path):
    import dataclasses

    run_dir = make_run(tmp_path / "20260101-120000-reference", tiny_recipe())  # no status.json: not finished
    with pytest.raises(UserError, match="has not finished"):
        calibrate_run(run_dir, dataset=make_dataset(4, 2, n_classes=10))
    ds = dataclasses.replace(make_dataset(30, 10), checksum="aaa")
    recipe = tiny_recipe("reference_cnn").replace(epochs=1, batch_size=16, precision="fp32")
    run_dir = run_experiment(recipe, dataset=ds, runs_root=tmp_path, quiet=True, report=False).run_dir
    before = (run_dir / WEIGHTS).read_bytes()
    with pytest.raises(UserError, match="not the data .* was trained on"):
        calibrate_run(run_dir, dataset=dataclasses.replace(ds, checksum="bbb"))
    with RunLock(run_dir), pytest.raises(UserError, match="in use"):
        calibrate_run(run_dir, dataset=ds)
    # A folder it cannot write its lock into (read-only; here the lock's name is taken by a folder): one line.
    (run_dir / ".lock").unlink()
    (run_dir / ".lock").mkdir()
    with pytest.raises(UserError, match="cannot lock .* must be writable"):
        calibrate_run(run_dir, dataset=ds)
    assert (run_dir / WEIGHTS).read_bytes() == before  # nothing was written by the refusals


def test_cli_calibrate(tmp_path: Path, tiny_cifar10, capsys: pytest.CaptureFixture[str]):
    run_dir = make_run(tmp_path / "20260101-120000-reference", tiny_recipe())
    write_status(run_dir, "finished")
    data = str(tiny_cifar10.data_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny archive's MD5 is not the official one
        assert cli.main(["calibrate", str(run_dir), "--data-dir", data]) == 0
    out, err = capsys.readouterr()
    t = load_run(run_dir).temperature
    assert t != 1.0 and f"softmax temperature {t:.4g}, fitted on 10 validation images" in out  # 20% of 50
    assert "cifarlab report" in out
    if t > 49.9:  # this tiny run is mostly wrong on its 10 images: the fit flattens everything, and says so
        assert "at the upper bound of the fit's range (0.02 to 50): a degenerate fit" in err
    # The same fit again: the same temperature, so the weights file (and what was computed from it) stays as is.
    weights = (run_dir / "model.safetensors").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["calibrate", str(run_dir), "--data-dir", data]) == 0
    out = capsys.readouterr().out
    assert "the same as the run's, so nothing changes" in out and "keep the old probabilities" not in out
    assert (run_dir / "model.safetensors").read_bytes() == weights
    assert cli.main(["calibrate", str(run_dir), "--off"]) == 0
    assert "temperature removed" in capsys.readouterr().out and load_run(run_dir).temperature == 1.0
    assert cli.main(["calibrate", str(run_dir), "--off"]) == 0
    assert "nothing to remove" in capsys.readouterr().out
    assert cli.main(["calibrate", str(tmp_path / "nope")]) == 2
    # A damaged metrics.json cannot record the new temperature: said, not silently skipped; the file stays as it is.
    (run_dir / "metrics.json").write_text("{damaged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["calibrate", str(run_dir), "--data-dir", data]) == 0
    err = capsys.readouterr().err
    assert "warning: the temperature is in model.safetensors, but" in err and "cifarlab report" in err
    assert (run_dir / "metrics.json").read_text() == "{damaged" and load_run(run_dir).temperature != 1.0


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs the export extra (onnxruntime)")
def test_a_new_temperature_makes_an_earlier_onnx_export_stale_for_serve(tmp_path: Path):
    """The weights' digest covers the file's metadata: `serve --backend onnx` exports again after `calibrate`."""
    from cifarlab.runs import write_temperature
    from cifarlab.serve import _onnx_forward

    run_dir = make_run(tmp_path / "20260101-120000-fast", tiny_recipe("airnet"))
    export.export_onnx(run_dir, run_dir / "model.onnx")  # at temperature 1, kept in the folder
    write_temperature(run_dir / WEIGHTS, 0.4)  # what `cifarlab calibrate` writes
    x, _ = make_images(2, n_classes=4, seed=7)
    served = _onnx_forward(load_run(run_dir), torch.device("cpu"))(x)
    torch.testing.assert_close(served, run_probs_fp32(run_dir, x), atol=1e-4, rtol=0)


def test_resume_writing_a_lost_weights_file_again_keeps_the_runs_temperature(tmp_path: Path, caplog) -> None:
    """QA round 17, L5: `--resume` wrote a lost model.safetensors without the temperature `cifarlab calibrate`
    had fitted (and refitted the recipe's own after `calibrate --off`). metrics.json's "calibration" block keeps
    it; where metrics.json cannot say, a warning names the command that fits it again."""
    import logging

    from safetensors import safe_open

    def metadata(run_dir: Path) -> dict[str, str]:
        with safe_open(str(run_dir / WEIGHTS), framework="pt") as f:
            return dict(f.metadata() or {})

    ds = make_dataset(30, 10)
    base = tiny_recipe("reference_cnn").replace(epochs=1, batch_size=16, precision="fp32", val_fraction=0.25)
    # calibrate=false, then `cifarlab calibrate`
    run_dir = run_experiment(base, dataset=ds, runs_root=tmp_path / "a", quiet=True, report=False).run_dir
    fitted = calibrate_run(run_dir, dataset=ds)
    assert fitted is not None and fitted["temperature"] != 1.0
    before = metadata(run_dir)
    (run_dir / WEIGHTS).unlink()
    res = run_experiment(resume=run_dir, dataset=ds, quiet=True, report=False)
    assert res.status == "finished" and metadata(run_dir) == before
    assert load_run(run_dir).temperature == fitted["temperature"]
    m = read_json(run_dir / "metrics.json")
    assert (
        m["calibration"]["temperature"] == fitted["temperature"]
        and m["calibration"]["fitted_on"] == "30 validation images"
    )
    assert m["test_loss"] is not None and m["test_loss_uncalibrated"] is not None  # both known again
    assert m["test_loss"] == pytest.approx(m["calibration"]["test_loss"])
    # calibrate=true, then `cifarlab calibrate --off`: the plain softmax stays
    run_dir = run_experiment(
        base.replace(calibrate=True), dataset=ds, runs_root=tmp_path / "b", quiet=True, report=False
    ).run_dir
    assert load_run(run_dir).temperature != 1.0
    calibrate_run(run_dir, off=True)
    (run_dir / WEIGHTS).unlink()
    run_experiment(resume=run_dir, dataset=ds, quiet=True, report=False)
    assert load_run(run_dir).temperature == 1.0 and read_json(run_dir / "metrics.json")["calibration"] is None
    # metrics.json damaged too: nothing says which temperature the run had, so a warning says what to do
    (run_dir / WEIGHTS).unlink()
    (run_dir / "metrics.json").write_text("{damaged")
    with caplog.at_level(logging.WARNING, logger="cifarlab"):
        run_experiment(resume=run_dir, dataset=ds, quiet=True, report=False)
    (line,) = [r.getMessage() for r in caplog.records if "cannot be recovered" in r.getMessage()]
    assert f"fit it again: cifarlab calibrate {run_dir}" in line and "the temperature fitted now" in line


def test_calibrate_and_evaluate_on_a_run_stopped_before_its_first_epoch_say_start_it_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """QA round 17, L4: they suggested `cifarlab train --resume`, which refuses such a run (no checkpoint)."""
    run_dir = make_run(tmp_path / "20260101-120000-reference", tiny_recipe())
    config = read_json(run_dir / "config.json")
    start = "cifarlab train --recipe reference --set seed=3"
    write_json(run_dir / "config.json", {**config, "command": start})
    write_status(run_dir, "stopped")
    with pytest.raises(UserError) as e:
        calibrate_run(run_dir)
    assert str(e.value).endswith(f"it has nothing to resume; start the run again: {start}")
    assert "--resume" not in str(e.value)
    cli.main(["evaluate", str(run_dir)])  # the data is not there: the warning comes first
    err = capsys.readouterr().err
    assert f"it has nothing to resume: start the run again: {start}" in err and "--resume" not in err
    # With a checkpoint (an epoch finished), resuming is the way, as before.
    (run_dir / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(UserError, match=f"resume it first: cifarlab train --resume {run_dir}$"):
        calibrate_run(run_dir)
    cli.main(["evaluate", str(run_dir)])
    assert f"cifarlab train --resume {run_dir} continues it" in capsys.readouterr().err
