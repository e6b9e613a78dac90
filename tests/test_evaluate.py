"""Evaluation: metrics against scikit-learn, hand-made confusion matrix, confusion ranking, ECE, `evaluate_run`,
and the `cifarlab evaluate` command."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    classification_report,
    confusion_matrix,
    log_loss,
    top_k_accuracy_score,
)

from _runfolder import tiny_recipe
from cifarlab import cli
from cifarlab.errors import UserError
from cifarlab.evaluate import (
    ClassMetrics,
    ConfusedPair,
    EvalResult,
    calibration,
    confused_pairs,
    evaluate_predictions,
    evaluate_run,
    format_summary,
    softmax,
    top_confusions,
)
from test_report import make_report_run, synthetic_dataset

NAMES = ["a", "b", "c"]


def logits_for(pred: list[int], k: int, margin: float = 4.0) -> np.ndarray:
    """Logits whose argmax is `pred`."""
    z = np.zeros((len(pred), k))
    z[np.arange(len(pred)), pred] = margin
    return z


def test_metrics_match_scikit_learn_on_random_predictions():
    rng = np.random.default_rng(0)
    k, n = 10, 2000
    classes = [f"class{i}" for i in range(k)]
    y = rng.integers(0, k, n)
    z = rng.normal(0, 2, (n, k))
    z[np.arange(n), y] += rng.normal(1.5, 1.5, n)  # better than chance, far from perfect
    ev = evaluate_predictions(y, z, classes)
    probs = softmax(z)
    pred = probs.argmax(1)
    rep = classification_report(y, pred, labels=range(k), output_dict=True, zero_division=0)
    assert ev.accuracy == pytest.approx(rep["accuracy"])
    assert ev.error_rate == pytest.approx(1 - rep["accuracy"])
    for i, c in enumerate(classes):
        for key, sk in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score"), ("support", "support")):
            assert getattr(ev.per_class[c], key) == pytest.approx(rep[str(i)][sk])
    for avg in ("macro", "weighted"):
        for key, sk in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert getattr(getattr(ev, f"{avg}_avg"), key) == pytest.approx(rep[f"{avg} avg"][sk])
    assert ev.top_k == 5
    assert ev.top5 == pytest.approx(top_k_accuracy_score(y, probs, k=5, labels=range(k)))
    assert ev.loss == pytest.approx(log_loss(y, probs, labels=range(k)), rel=1e-9)
    assert ev.loss == pytest.approx(
        torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor(y)).item(), rel=1e-9
    )
    assert np.array_equal(ev.confusion, confusion_matrix(y, pred, labels=range(k)))
    assert np.allclose(ev.confusion_normalized.sum(1), 1.0)
    assert ev.probability_check.is_distribution
    assert ev.probability_check.max_abs_sum_error < 1e-12
    json.dumps(ev.to_dict())  # everything JSON-serialisable


def test_loss_is_exact_where_log_loss_clips():
    # A confidently wrong prediction with a logit gap of 1000: log-softmax gives exactly 1000.
    z = np.array([[0.0, 1000.0]])
    ev = evaluate_predictions(np.array([0]), z, ["x", "y"])
    assert ev.loss == pytest.approx(1000.0)


def test_confusion_matrix_hand_made():
    y = [0, 0, 0, 1, 1, 2]
    pred = [0, 1, 1, 1, 2, 2]
    ev = evaluate_predictions(np.array(y), logits_for(pred, 3), NAMES)
    assert ev.confusion.tolist() == [[1, 2, 0], [0, 1, 1], [0, 0, 1]]
    assert np.allclose(ev.confusion_normalized, [[1 / 3, 2 / 3, 0], [0, 0.5, 0.5], [0, 0, 1]])
    assert ev.accuracy == pytest.approx(3 / 6)
    # precision of b: predicted b = 3 images (two a's and one b), one right
    assert ev.per_class["b"].precision == pytest.approx(1 / 3)
    assert ev.per_class["a"].recall == pytest.approx(1 / 3)
    assert ev.per_class["c"].support == 1
    assert ev.top_k == 3 and ev.top5 == 1.0  # every class is in the top 3 of 3


def test_absent_class_is_not_applicable():
    # Not zeros: a class with no image is not one the model fails on (NaN in memory, null in JSON).
    ev = evaluate_predictions(np.array([0, 0, 1]), logits_for([0, 1, 1], 3), NAMES)
    c = ev.per_class["c"]
    assert isinstance(c, ClassMetrics) and c.support == 0 and not c.applicable
    assert all(np.isnan([c.precision, c.recall, c.f1]))
    assert ev.to_dict()["per_class"]["c"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert ev.confusion_normalized[2].tolist() == [0.0, 0.0, 0.0]
    assert ev.top_confusions["c"] == ()


def test_confusion_ranking():
    classes = ["cat", "dog", "frog", "bird", "car"]
    cm = np.array(
        [
            [50, 14, 6, 5, 0],  # cat: dog 14, frog 6, bird 5
            [20, 70, 0, 5, 5],  # dog: cat 20, then bird/car tie at 5 -> lower index (bird) first
            [0, 0, 100, 0, 0],  # frog: no mistakes
            [1, 1, 1, 97, 0],  # bird: three-way tie -> class order
            [0, 0, 0, 0, 10],
        ]
    )
    tc = top_confusions(cm, classes)
    assert tc["cat"] == [("dog", 14 / 75), ("frog", 6 / 75), ("bird", 5 / 75)]
    assert [o for o, _ in tc["dog"]] == ["cat", "bird", "car"]
    assert tc["frog"] == []
    assert [o for o, _ in tc["bird"]] == ["cat", "dog", "frog"]
    assert [o for o, _ in top_confusions(cm, classes, k=1)["cat"]] == ["dog"]
    pairs = confused_pairs(cm, classes)
    assert pairs[0] == ConfusedPair(a="cat", b="dog", count=34, a_to_b=14, b_to_a=20)
    assert all(p.count > 0 for p in pairs)
    assert [p.count for p in pairs] == sorted((p.count for p in pairs), reverse=True)


def test_ranking_through_evaluate_predictions():
    # class 0: 10 images, 6 right, 3 -> class 2, 1 -> class 1
    y = [0] * 10 + [1] * 2 + [2] * 2
    pred = [0] * 6 + [2] * 3 + [1] + [1, 1, 2, 2]
    ev = evaluate_predictions(np.array(y), logits_for(pred, 3), NAMES)
    assert ev.top_confusions["a"] == (("c", 0.3), ("b", 0.1))
    assert "a" in format_summary(ev) and "c 30%" in format_summary(ev)


def test_ece_hand_made():
    conf = np.array([0.9, 0.9, 0.9, 0.9, 0.5, 0.5])
    ok = np.array([1, 1, 1, 0, 1, 0], dtype=bool)
    cal = calibration(conf, ok, n_bins=5)
    # bin (0.8, 1.0]: 4 images, accuracy 0.75, confidence 0.9 -> |gap| 0.15, weight 4/6
    # bin (0.4, 0.6]: 2 images, accuracy 0.5, confidence 0.5 -> 0
    assert cal.ece == pytest.approx(4 / 6 * 0.15)
    assert cal.mce == pytest.approx(0.15)
    assert [b.count for b in cal.bins] == [0, 0, 2, 0, 4]
    assert cal.bins[4].accuracy == pytest.approx(0.75)
    assert cal.bins[0].accuracy is None
    assert cal.overconfidence == pytest.approx(np.mean(conf) - 4 / 6)
    assert cal.high_confidence.to_dict() == {"threshold": 0.9, "share": pytest.approx(4 / 6), "accuracy": 0.75}
    # Bin edges are right-closed: 0.8 belongs to (0.6, 0.8], 0.0 to the first bin.
    edges = calibration(np.array([0.8, 0.0, 1.0]), np.array([1, 1, 1], dtype=bool), n_bins=5)
    assert [b.count for b in edges.bins] == [1, 0, 0, 1, 1]


def test_ece_through_softmax_of_two_classes():
    p = np.array([0.9, 0.9, 0.6, 0.6])
    z = np.stack([np.log(p), np.log(1 - p)], axis=1)  # softmax gives back (p, 1 - p)
    y = np.array([0, 1, 0, 0])  # 0.9 bin: 1 of 2 right; 0.6 bin: 2 of 2 right
    ev = evaluate_predictions(y, z, ["x", "y"], n_bins=10)
    assert ev.calibration.ece == pytest.approx(0.5 * abs(0.9 - 0.5) + 0.5 * abs(0.6 - 1.0))
    perfect = calibration(np.full(10, 0.7), np.arange(10) < 7, n_bins=10)
    assert perfect.ece == pytest.approx(0.0, abs=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="logits must be"):
        evaluate_predictions(np.array([0, 1]), np.zeros((2, 4)), NAMES)
    with pytest.raises(ValueError, match="labels must be"):
        evaluate_predictions(np.array([0, 3]), np.zeros((2, 3)), NAMES)
    with pytest.raises(UserError, match="no images"):
        evaluate_predictions(np.array([], dtype=int), np.zeros((0, 3)), NAMES)


def test_ten_thousand_predictions_are_fast():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 10, 10_000)
    z = rng.normal(size=(10_000, 10))
    t0 = time.perf_counter()
    evaluate_predictions(y, z, [str(i) for i in range(10)])
    assert time.perf_counter() - t0 < 2.0  # ~0.04 s here; generous for a loaded 2-core machine


# -- evaluate_run and the command ------------------------------------------------------------------------------


def direct_logits(model: torch.nn.Module, x: torch.Tensor, mean, std, tta: str) -> np.ndarray:
    """Logits computed by hand as documented (not through cifarlab.inference): pixels / 255, then (x - mean) / std
    per channel, then the weighted average of the TTA views' logits in eval mode. flip: the image and its mirror,
    1/2 each; flip_translate: those at 1/4 plus the mirror pairs of the image shifted by +-1 pixel (reflect
    padding) at 1/8 each."""
    a = x.numpy().astype(np.float64) / 255.0
    if mean is not None:
        a = (a - np.reshape(mean, (1, -1, 1, 1))) / np.reshape(std, (1, -1, 1, 1))
    views = [(1.0, a)]
    if tta in ("flip", "flip_translate"):
        w = 0.5 if tta == "flip" else 0.25
        views = [(w, a), (w, a[..., ::-1])]
    if tta == "flip_translate":
        p = np.pad(a, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
        for shifted in (p[..., :-2, :-2], p[..., 2:, 2:]):
            views += [(0.125, shifted), (0.125, shifted[..., ::-1])]
    model.eval()
    with torch.no_grad():
        return sum(w * model(torch.from_numpy(np.ascontiguousarray(v)).float()).double().numpy() for w, v in views)


def unambiguous(z: np.ndarray) -> np.ndarray:
    """Rows whose top-2 logit gap is clear of float32 round-off: there the argmax cannot depend on summation order."""
    top2 = np.sort(z, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0] > 1e-3


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("tta", ["flip", "flip_translate"])
@pytest.mark.usefixtures("cpu_inference")
def test_evaluate_run_matches_direct_prediction(tmp_path: Path, tta: str):
    import dataclasses

    from safetensors.torch import load_file

    from cifarlab.models import build_model

    # fp32 + standardize scaling + TTA: every step evaluate_run must apply is exercised and exactly comparable.
    recipe = tiny_recipe("airnet").replace(precision="fp32", tta=tta)
    assert recipe.scaling == "standardize"
    run_dir, ds = make_report_run(tmp_path, recipe=recipe)
    ds = dataclasses.replace(ds, x_test=ds.x_test[:100], y_test=ds.y_test[:100])  # enough, and quick
    ev, preds = evaluate_run(run_dir, dataset=ds)
    norm = json.loads((run_dir / "config.json").read_text())["normalization"]
    mean, std = norm["mean"], norm["std"]
    assert mean is not None and std is not None

    # the independent path: the saved weights loaded into a fresh model, scaling and TTA views done by hand
    model = build_model(recipe, num_classes=10)
    model.load_state_dict(load_file(run_dir / "model.safetensors"))
    z = direct_logits(model, ds.x_test, mean, std, tta)
    y = ds.y_test.numpy()
    # the check has teeth: without normalization or without the TTA views the logits are far off
    few = ds.x_test[:32]
    assert np.abs(direct_logits(model, few, None, None, tta) - z[:32]).max() > 1.0
    assert np.abs(direct_logits(model, few, mean, std, "none") - z[:32]).max() > 0.1

    assert ev.split == "test" and ev.n == len(y)
    np.testing.assert_allclose(preds.logits, z, rtol=1e-4, atol=1e-4)
    probs = torch.softmax(torch.from_numpy(z), dim=1).numpy()  # softmax of the averaged logits
    np.testing.assert_allclose(preds.probs, probs, atol=1e-5)
    clear = unambiguous(z)  # a near-tie may go either way: it may cost at most its own image
    assert clear.mean() > 0.95 and np.array_equal(preds.y_pred[clear], z.argmax(1)[clear])
    assert abs(ev.accuracy - float((z.argmax(1) == y).mean())) * len(y) <= (~clear).sum()
    ce = torch.nn.functional.cross_entropy(torch.from_numpy(z), torch.from_numpy(y)).item()
    assert ev.loss == pytest.approx(ce, rel=1e-5)
    assert ev.dataset is not None and ev.dataset.checksum_matches_run is True
    assert ev.inference is not None and (ev.inference.images_per_second or 0) > 0
    assert ev.inference.tta == tta and ev.inference.dtype == "float32"


def test_evaluate_run_val_split_is_the_runs_split(tmp_path: Path):
    from cifarlab.data import split_indices

    run_dir, ds = make_report_run(tmp_path)
    ev, preds = evaluate_run(run_dir, split="val", dataset=ds)
    _, va = split_indices(len(ds.y_train), 0.2, 0)
    assert ev.split == "val" and ev.n == len(va)
    assert np.array_equal(preds.indices, va.numpy())
    assert np.array_equal(preds.y_true, ds.y_train[va].numpy())


def test_evaluate_run_errors(tmp_path: Path):
    run_dir, ds = make_report_run(tmp_path / "noval", val_fraction=0.0)
    with pytest.raises(UserError, match="no validation split"):
        evaluate_run(run_dir, split="val", dataset=ds)
    with pytest.raises(UserError, match="unknown split"):
        evaluate_run(run_dir, split="train", dataset=ds)
    other = synthetic_dataset(classes=tuple(f"c{i}" for i in range(10)))
    with pytest.raises(UserError, match="classes"):
        evaluate_run(run_dir, dataset=other)
    with pytest.raises(UserError, match="not a folder"):
        evaluate_run(tmp_path / "missing", dataset=ds)


def test_evaluate_command_on_an_official_archive(tmp_path: Path, tiny_cifar10, capsys):
    run_dir, _ = make_report_run(tmp_path / "run", dataset_name="cifar10")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny archive's MD5 is not the official one
        assert cli.main(["evaluate", str(run_dir), "--data-dir", str(tiny_cifar10.data_dir)]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "ECE" in out and "macro avg" in out
    for c in tiny_cifar10.classes:
        assert c in out
    saved = json.loads((run_dir / "eval_test.json").read_text())
    assert saved["n"] == len(tiny_cifar10.y_test)
    cm = np.array(saved["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == len(tiny_cifar10.y_test)
    assert cm.sum(1).tolist() == np.bincount(tiny_cifar10.y_test, minlength=10).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["evaluate", str(run_dir), "--json", "--data-dir", str(tiny_cifar10.data_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["split"] == "test"


def test_a_run_finds_the_data_it_trained_on_without_being_told(tmp_path: Path, tiny_cifar10, capsys, monkeypatch):
    """No --data-dir and no $CIFARLAB_DATA: the folder config.json records (where it still exists) is used, not the
    empty default cache; --data-dir and $CIFARLAB_DATA still come first."""
    run_dir, _ = make_report_run(tmp_path / "run", dataset_name="cifar10")
    config = json.loads((run_dir / "config.json").read_text())
    config["data_dir"] = str(tiny_cifar10.data_dir)
    (run_dir / "config.json").write_text(json.dumps(config))
    monkeypatch.delenv("CIFARLAB_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the default cache: empty (and offline in tests)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny archive's MD5 is not the official one
        assert cli.main(["evaluate", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == len(tiny_cifar10.y_test)
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "elsewhere"))  # named: it wins, and holds nothing
    (tmp_path / "elsewhere").mkdir()
    assert cli.main(["evaluate", str(run_dir)]) == 2
    assert "elsewhere" in capsys.readouterr().err


def test_evaluate_command_user_errors(tmp_path: Path, capsys):
    assert cli.main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err


# -- the typed result --------------------------------------------------------------------------------------------


def test_eval_result_is_frozen_and_its_dict_is_the_json():
    import dataclasses

    ev = evaluate_predictions(np.array([0, 0, 1, 2]), logits_for([0, 1, 1, 2], 3), NAMES)
    assert isinstance(ev, EvalResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.accuracy = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError):
        ev.confusion[0, 0] = 9  # read-only array
    with pytest.raises(TypeError):
        ev.per_class["a"] = ev.macro_avg  # type: ignore[index]
    d = ev.to_dict()
    assert list(d) == [
        "n", "classes", "loss", "accuracy", "error_rate", "balanced_accuracy", "top5_accuracy", "top_k",
        "confusion_matrix", "confusion_matrix_normalized", "per_class", "macro_avg", "weighted_avg",
        "top_confusions", "confused_pairs", "calibration", "probability_check",
    ]  # fmt: skip
    assert d == json.loads(json.dumps(d))  # plain JSON types only (lists, not tuples or arrays)
    assert d["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert d["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert d["top_confusions"]["a"] == [["b", 0.5]]
    assert d["confused_pairs"] == [{"a": "a", "b": "b", "count": 1, "a_to_b": 1, "b_to_a": 0}]
    assert set(d["calibration"]) == {
        "n_bins", "ece", "mce", "mean_confidence", "accuracy", "overconfidence", "bins", "high_confidence",
    }  # fmt: skip


def test_evaluate_run_result_dict_has_the_run_keys(tmp_path: Path):
    run_dir, ds = make_report_run(tmp_path)
    ev, _ = evaluate_run(run_dir, dataset=ds)
    d = ev.to_dict()
    assert list(d)[-3:] == ["split", "dataset", "inference"]
    assert d["dataset"] == {
        "name": "synthetic",
        "source": "synthetic",
        "checksum": "synthetic-md5",
        "checksum_matches_run": True,
    }
    assert set(d["inference"]) == {
        "device", "tta", "precision", "dtype", "channels_last", "batch_size", "predict_seconds",
        "images_per_second", "logits_from", "metrics_seconds", "temperature", "uncalibrated_ece",
        "temperature_fitted_on", "uncalibrated_loss",
    }  # fmt: skip
    assert ev.tta == d["inference"]["tta"] and ev.split_name == "test" and not ev.dataset_mismatch
    assert ev.seconds == d["inference"]["predict_seconds"]


# -- the terminal summary ------------------------------------------------------------------------------------


@pytest.mark.parametrize("names", [NAMES, ["airplane", "automobile", "bird"], ["a-very-long-class-name", "b", "c"]])
def test_summary_average_rows_are_aligned(names):
    y = [0] * 10 + [1] * 2 + [2] * 2
    pred = [0] * 6 + [2] * 3 + [1] + [1, 1, 2, 2]
    text = format_summary(evaluate_predictions(np.array(y), logits_for(pred, 3), names))
    lines = text.splitlines()
    header = next(ln for ln in lines if ln.startswith("class"))
    rows = [ln for ln in lines if ln.split("  ")[0].strip() in (*names, "macro avg", "weighted avg")]
    assert len(rows) == 5
    col = header.index("precision") + len("precision")  # right edge of the precision column
    for ln in rows:
        assert ln[col - 5 : col].strip() and ln[col - 5 : col].replace(".", "").strip().isdigit(), repr(ln)
        assert ln[col] == " ", repr(ln)
    macro = next(ln for ln in rows if ln.startswith("macro avg"))
    weighted = next(ln for ln in rows if ln.startswith("weighted avg"))
    assert macro.index("0.") == weighted.index("0.")  # the same column, no extra space


def test_summary_escapes_terminal_control_characters():
    names = ["\x1b[2J\x1b[31mred", "tab\there", "new\nline"]
    text = format_summary(evaluate_predictions(np.array([0, 1, 2, 0]), logits_for([0, 1, 2, 1], 3), names))
    assert "\x1b" not in text and "\t" not in text
    assert "\\x1b[2J\\x1b[31mred" in text and "tab\\there" in text and "new\\nline" in text
    assert len(text.splitlines()) == len(format_summary(
        evaluate_predictions(np.array([0, 1, 2, 0]), logits_for([0, 1, 2, 1], 3), ["x", "y", "z"])
    ).splitlines())  # fmt: skip


# -- the command when the folder cannot be written, or the data is not the run's --------------------------


def _patch_data(monkeypatch, ds):
    monkeypatch.setattr("cifarlab.evaluate.load_run_dataset", lambda run, data_dir=None: ds)


def test_evaluate_prints_results_when_the_disk_is_full(tmp_path: Path, monkeypatch, capsys):
    import errno

    run_dir, ds = make_report_run(tmp_path)
    _patch_data(monkeypatch, ds)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cifarlab.files.write_json", full)
    assert cli.main(["evaluate", str(run_dir)]) == 1
    out, err = capsys.readouterr()
    assert "accuracy" in out and "macro avg" in out and "weighted avg" in out  # the results are shown
    assert err == f"error: results not saved: cannot write {run_dir / 'eval_test.json'}: No space left on device\n"
    assert not (run_dir / "eval_test.json").exists()
    assert cli.main(["evaluate", str(run_dir), "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["n"] == len(ds.y_test) and err.startswith("error: results not saved")


def _mount_tmpfs(folder: Path) -> bool:
    """Mount a small tmpfs on `folder`; False where that is not allowed (not root) or there is no `mount`."""
    if shutil.which("mount") is None:
        return False
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(folder)], capture_output=True).returncode
        == 0
    )


@pytest.fixture
def read_only_copy(tmp_path: Path):
    """copy(folder) -> (a read-only copy of it, the reason writing there fails).

    The copy goes on a tmpfs remounted read-only, which stops root too (chmod does not, and tests often run as
    root); where mounting is not allowed (not root), a chmod 555 copy does the job instead."""
    mounts: list[Path] = []
    chmodded: list[Path] = []

    def copy(src: Path) -> tuple[Path, str]:
        mnt = tmp_path / f"ro{len(mounts) + len(chmodded)}"
        mnt.mkdir()
        mounted = _mount_tmpfs(mnt)
        if mounted:
            mounts.append(mnt)
        dest = mnt / src.name
        shutil.copytree(src, dest)
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True, capture_output=True)
            reason = "Read-only file system"
        else:
            dest.chmod(0o555)
            chmodded.append(dest)
            if os.access(dest, os.W_OK):
                pytest.skip("cannot mount a read-only tmpfs here, and chmod does not stop this user (root)")
            reason = "Permission denied"
        assert not os.access(dest, os.W_OK)
        return dest, reason

    yield copy
    for mnt in mounts:
        subprocess.run(["umount", str(mnt)], capture_output=True)
    for d in chmodded:
        d.chmod(0o755)


def test_evaluate_in_a_read_only_folder(tmp_path: Path, monkeypatch, capsys, read_only_copy):
    run_dir, ds = make_report_run(tmp_path / "src")
    ro_run, reason = read_only_copy(run_dir)
    before = sorted(p.name for p in ro_run.iterdir())
    _patch_data(monkeypatch, ds)
    assert cli.main(["evaluate", str(ro_run)]) == 1
    out, err = capsys.readouterr()
    assert "macro avg" in out and "Traceback" not in err  # the numbers are shown, the file is lost
    assert err == f"error: results not saved: cannot write {ro_run / 'eval_test.json'}: {reason}\n"
    # the same for --corruptions, on a real read-only folder rather than a patched writer
    argv = ["evaluate", str(ro_run), "--corruptions", "--corruption-names", "contrast", "--severities", "1"]
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert "mean corruption accuracy" in out
    assert err.endswith(f"error: results not saved: cannot write {ro_run / 'eval_corruptions.json'}: {reason}\n")
    assert sorted(p.name for p in ro_run.iterdir()) == before


def test_evaluate_warns_first_when_the_data_is_not_the_runs(tmp_path: Path, monkeypatch, capsys):
    import dataclasses

    run_dir, ds = make_report_run(tmp_path)
    _patch_data(monkeypatch, dataclasses.replace(ds, checksum="other-md5"))
    assert cli.main(["evaluate", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("warning: the data evaluated") and "not the data this run was trained on" in err
    assert "macro avg" in out
    saved = json.loads((run_dir / "eval_test.json").read_text())
    assert saved["dataset"]["checksum_matches_run"] is False


def test_data_not_found_elsewhere_names_the_folder_the_run_trained_from(tmp_path, monkeypatch):
    """$CIFARLAB_DATA (or --data-dir) pointing at another folder wins over the run's own, as documented; when the
    data is not there, the error names the folder the run trained from (QA: it only tried to download)."""
    from types import SimpleNamespace

    import cifarlab.data
    from cifarlab.errors import DataError
    from cifarlab.evaluate import load_run_dataset

    trained_from = tmp_path / "shared"
    trained_from.mkdir()
    run = SimpleNamespace(
        recipe=SimpleNamespace(dataset="cifar10"),
        config={"dataset": {"source": "cifar10"}, "data_dir": str(trained_from)},
        path=tmp_path / "run",
    )

    def missing(name, data_dir=None):
        raise DataError(f"no {name} in {data_dir}")

    monkeypatch.setattr(cifarlab.data, "load_dataset", missing)
    monkeypatch.setenv("CIFARLAB_DATA", str(tmp_path / "empty"))
    with pytest.raises(DataError, match=rf"the run trained from {trained_from}: .* or unset \$CIFARLAB_DATA"):
        load_run_dataset(run, tmp_path / "empty")  # the CLI passes the variable's folder as data_dir
    monkeypatch.delenv("CIFARLAB_DATA")
    with pytest.raises(DataError, match=r"or leave out --data-dir"):
        load_run_dataset(run, tmp_path / "other")
    with pytest.raises(DataError) as e:  # its own folder: nothing to add
        load_run_dataset(run, None)
    assert "trained from" not in str(e.value)


# -- --test-data: its own result files, paths looked up in --data-dir, a closed output pipe (QA session 16) -------


def _tiny_run(tmp_path: Path) -> Path:
    from _runfolder import make_run

    return make_run(tmp_path / "20260101-120000-reference", tiny_recipe())


CORRUPTION_ARGS = ["--corruptions", "--severities", "1", "--corruption-names", "contrast"]


def test_test_data_corruptions_leave_the_runs_own_robustness_file_alone(tmp_path: Path, capsys):
    """`--test-data X --corruptions` wrote the run's eval_corruptions.json, which the report shows as the run's
    robustness: X's results go to a file of their own."""
    from conftest import write_imagefolder

    run_dir = _tiny_run(tmp_path)
    own = run_dir / "eval_corruptions.json"
    own.write_text('{"the run": "own"}')
    folder = write_imagefolder(tmp_path / "sub")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["evaluate", str(run_dir), "--test-data", str(folder.root), *CORRUPTION_ARGS]) == 0
    out = capsys.readouterr().out
    assert own.read_text() == '{"the run": "own"}'
    [saved] = run_dir.glob("eval_corruptions-data-sub-*.json")
    assert f"written: {saved}" in out
    assert json.loads(saved.read_text())["dataset"]["name"].endswith("(test data)")


def test_test_data_results_are_one_file_per_source(tmp_path: Path, capsys):
    """A folder and its tarball, or a/test and b/test, share a base name: each gets its own file, named after the
    source's resolved path, rather than replacing the other's results."""
    from conftest import tar_tree, write_imagefolder

    run_dir = _tiny_run(tmp_path)
    a = write_imagefolder(tmp_path / "a" / "test", {"cat": (200, 30, 40), "dog": (20, 180, 60)})
    b = write_imagefolder(tmp_path / "b" / "test", {"cat": (200, 30, 40), "frog": (90, 70, 220)})
    tarball = tar_tree(a.root, tmp_path / "test.tar.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for source in (a.root, b.root, tarball, a.root):  # a again: its own file, replaced
            assert cli.main(["evaluate", str(run_dir), "--test-data", str(source), "--json"]) == 0
    capsys.readouterr()
    files = sorted(run_dir.glob("eval_data-test-*.json"))
    assert len(files) == 3
    assert len({json.loads(f.read_text())["dataset"]["source"] for f in files}) == 3


def test_test_data_results_file_keeps_a_non_ascii_name(tmp_path: Path, capsys):
    """A folder named `données` or `猫` lost its letters in the results file's name (ASCII-only filter): eval_data-
    donn_es-..., eval_data-data-... Letters of any script are kept; what is written is what a glob finds."""
    from conftest import write_imagefolder

    run_dir = _tiny_run(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("données", "猫"):
            folder = write_imagefolder(tmp_path / name, {"cat": (200, 30, 40), "dog": (20, 180, 60)})
            assert cli.main(["evaluate", str(run_dir), "--test-data", str(folder.root), "--json"]) == 0
            [saved] = run_dir.glob(f"eval_data-{name}-*.json")
            assert json.loads(saved.read_text())["dataset"]["source"] == str(folder.root)
    capsys.readouterr()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("données", "données"),
        ("e\u0301te\u0301", "été"),  # decomposed accents (macOS) composed, not dropped
        ("猫 photos", "猫_photos"),
        ("a/b\\c d\te\x1b[0m", "a_b_c_d_e_0m"),  # separators, spaces and control characters: one "_" a run
        ("\u202eevil\udcff", "evil"),  # a bidi override and an undecodable byte (surrogate escape)
        ("...", "data"),
    ],
)
def test_results_file_name_part_keeps_letters_of_any_script(name: str, expected: str) -> None:
    from cifarlab.cli.evaluate import _safe_name

    assert _safe_name(name) == expected


def test_results_file_name_part_is_bounded_in_bytes() -> None:
    from cifarlab.cli.evaluate import _NAME_BYTES, _safe_name

    for long in ("猫" * 200, "a" * 300, "é" * 200):
        part = _safe_name(long)
        assert 0 < len(part.encode("utf-8")) <= _NAME_BYTES and long.startswith(part)


def test_test_data_takes_paths_and_finds_relative_ones_in_the_data_dir(tmp_path: Path, monkeypatch, capsys):
    from conftest import write_imagefolder

    run_dir = _tiny_run(tmp_path)
    assert cli.main(["evaluate", str(run_dir), "--test-data", "cifar10"]) == 2
    err = capsys.readouterr().err
    assert "--test-data takes a path" in err and "use cifar10" not in err and "leave --test-data out" in err
    # a relative path not found here is looked for in --data-dir (it was only looked for in $CIFARLAB_DATA)
    write_imagefolder(tmp_path / "datasets" / "sub")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    argv = ["evaluate", str(run_dir), "--test-data", "sub", "--json"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main([*argv, "--data-dir", str(tmp_path / "datasets")]) == 0
    assert json.loads(capsys.readouterr().out)["dataset"]["source"] == str(tmp_path / "datasets" / "sub")
    assert cli.main(argv) == 2  # not in $CIFARLAB_DATA either: the message says where it looked
    err = capsys.readouterr().err
    assert "no such file or folder" in err and os.environ["CIFARLAB_DATA"] in err


@pytest.mark.parametrize("corruptions", [False, True])
def test_evaluate_whose_output_pipe_closes_still_saves_its_results(tmp_path: Path, monkeypatch, corruptions):
    """`cifarlab evaluate ... 2>&1 | head -1`: the reader goes away after one line; the evaluation still ends with
    its file written (a write to the closed pipe ended the command, with exit status 0, before it saved)."""
    import sys

    from conftest import write_imagefolder

    run_dir = _tiny_run(tmp_path)
    folder = write_imagefolder(tmp_path / "sub")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone: every write raises BrokenPipeError
    closed = os.fdopen(write_end, "w", buffering=1)
    monkeypatch.setattr(sys, "stdout", closed)
    monkeypatch.setattr(sys, "stderr", closed)  # 2>&1: the warnings and the corruption progress too
    argv = ["evaluate", str(run_dir), "--test-data", str(folder.root), *(CORRUPTION_ARGS if corruptions else [])]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert cli.main(argv) == 0
    finally:
        monkeypatch.undo()
        closed.close()
    pattern = "eval_corruptions-data-sub-*.json" if corruptions else "eval_data-sub-*.json"
    assert len(list(run_dir.glob(pattern))) == 1


def test_a_class_with_a_slash_in_its_name_is_found_in_a_folder_with_an_underscore(tmp_path: Path, capsys):
    """A Fashion-MNIST run could not be evaluated on an image folder holding class 0: no folder can be named
    "T-shirt/top" (QA). "_" stands in for "/"."""
    from _runfolder import make_run
    from cifarlab.evaluate import load_test_data
    from cifarlab.runs import load_run
    from conftest import write_imagefolder

    classes = ("T-shirt/top", "Trouser", "Pullover")
    run_dir = make_run(tmp_path / "20260101-120000-reference", tiny_recipe(), classes=classes)
    folder = write_imagefolder(tmp_path / "fm", {"T-shirt_top": (200, 30, 40), "Pullover": (20, 180, 60)})
    ds = load_test_data(load_run(run_dir), folder.root)
    assert ds.classes == classes
    assert set(ds.y_test.tolist()) == {0, 2}  # T-shirt_top -> T-shirt/top (0), Pullover -> 2
    wrong = write_imagefolder(tmp_path / "wrong", {"T-shirt-top": (200, 30, 40)})
    with pytest.raises(UserError, match="a folder for 'T-shirt/top' is named 'T-shirt_top'"):
        load_test_data(load_run(run_dir), wrong.root)
