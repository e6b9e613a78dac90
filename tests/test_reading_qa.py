"""QA round 14 on the report's reading: absent classes, weak/strong only when meaningful, a temperature that hurts
or is degenerate, overfitting only with evidence, stopped/budget/resumed runs, rounding and plurals, trivial
top-k, and a run whose image folder moved. Unit tests on hand-made predictions; one tiny run folder."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from cifarlab.calibrate import T_RANGE
from cifarlab.errors import UserError
from cifarlab.evaluate import (
    InferenceInfo,
    TrainingState,
    check_dataset,
    evaluate_predictions,
    format_summary,
    load_run_dataset,
)
from cifarlab.report.reading import (
    calibration_sentence,
    class_sentences,
    generalisation_sentence,
    headline,
    pair_sentences,
    plain_reading,
    share,
    training_sentence,
)


def logits_for(pred: list[int] | np.ndarray, k: int, margin: float = 6.0) -> np.ndarray:
    z = np.zeros((len(pred), k))
    z[np.arange(len(pred)), pred] = margin
    return z


def hist_rows(losses: list[float], val_losses: list[float | None], acc: float = 0.9, val_acc: float = 0.8) -> list:
    return [
        {"epoch": e + 1, "loss": lo, "accuracy": acc, "val_loss": vl, "val_accuracy": val_acc if vl else None}
        for e, (lo, vl) in enumerate(zip(losses, val_losses, strict=True))
    ]


def state(**kw: object) -> TrainingState:
    base = {"run_dir": "runs/r1", "status": "finished", "planned_epochs": 30, "calibrate": True}
    return TrainingState(**{**base, **kw})  # type: ignore[arg-type]


# -- 1: classes absent from the test set ----------------------------------------------------------------------


def test_absent_class_is_left_out_of_macro_averages_and_the_weak_list():
    classes = ["red", "green", "blue"]
    y = np.repeat([0, 1], 20)  # no blue image
    ev = evaluate_predictions(y, logits_for(y, 3), classes)
    assert ev.accuracy == 1.0
    assert ev.macro_avg.f1 == pytest.approx(f1_score(y, y, labels=[0, 1], average="macro")) == 1.0
    assert ev.macro_avg.recall == pytest.approx(balanced_accuracy_score(y, y))  # no longer contradict
    assert math.isnan(ev.per_class["blue"].f1) and ev.per_class["blue"].support == 0
    assert ev.present_classes == ("red", "green")
    text = " ".join(class_sentences(ev))
    assert "Weak" not in text and "include no blue" in text and "not applicable" in text
    json.dumps(ev.to_dict(), allow_nan=False)  # valid JSON: null, not NaN
    summary = format_summary(ev)
    blue = next(ln for ln in summary.splitlines() if ln.startswith("blue"))
    assert "n/a" in blue and "nan" not in summary
    macro = next(ln for ln in summary.splitlines() if ln.startswith("macro avg"))
    assert "1.000" in macro


# -- 2: weak / strongest only when meaningful ---------------------------------------------------------------------


def test_no_class_is_called_weak_when_all_are_near_perfect():
    classes = ["cyan", "orange", "v1.2", "navy"]
    y = np.repeat(np.arange(4), 40)
    pred = y.copy()
    pred[0] = 1  # one cyan image taken for orange: cyan's F1 0.99
    text = " ".join(class_sentences(evaluate_predictions(y, logits_for(pred, 4), classes)))
    assert "Weak" not in text and "Strongest" not in text
    assert "Every class has an F1 of at least 0.95" in text and "cyan" in text
    perfect = " ".join(class_sentences(evaluate_predictions(y, logits_for(y, 4), classes)))
    assert perfect == "Every class is recognised perfectly (F1 1.00)."


def test_weak_only_below_the_macro_f1_by_the_margin():
    classes = [f"c{i}" for i in range(8)]
    y = np.repeat(np.arange(8), 50)
    pred = y.copy()
    pred[:20] = 1  # c0 recall 0.6: weak; c1 loses precision
    pred[50:52] = 2  # c1 also misses two: slightly below, not weak
    ev = evaluate_predictions(y, logits_for(pred, 8), classes)
    text = " ".join(class_sentences(ev))
    weak = [c for c in classes if f"Weak: {c} " in text]
    expected = [c for c in classes if ev.per_class[c].f1 <= ev.macro_avg.f1 - 0.05]
    assert sorted(weak) == sorted(expected) and "c0" in weak and "c2" not in weak
    assert ev.per_class["c2"].f1 < 1  # below the others, but not by the margin: not weak


# -- 3: the temperature ------------------------------------------------------------------------------------------


def _cal(scale: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 400)
    z = rng.normal(0, 1, (400, 4))
    z[np.arange(400), y] += 1.0
    return evaluate_predictions(y, z * scale, ["a", "b", "c", "d"])


def test_a_temperature_that_made_things_worse_is_called_so():
    plain, sharp = _cal(1.0), _cal(4.0)  # the temperature made the model over-sure
    assert sharp.calibration.ece > plain.calibration.ece and sharp.loss > plain.loss
    s = calibration_sentence(
        sharp.calibration, 0.2, 4, temperature=0.28, uncalibrated_ece=plain.calibration.ece,
        fitted_on="1000 training images", loss=sharp.loss, uncalibrated_loss=plain.loss, run_dir="runs/r1",
    )  # fmt: skip
    assert "made the probabilities worse" in s and f"{plain.loss:.3f} without it, {sharp.loss:.3f} with it" in s
    assert "val_fraction=0.02" in s and "cifarlab calibrate runs/r1 --off" in s
    assert "fitted after training" not in s  # not presented as a help


def test_a_temperature_at_its_bound_is_not_trusted():
    ev = _cal(200.0)  # all-but-certain predictions
    s = calibration_sentence(
        ev.calibration, temperature=T_RANGE[0] * (1 + 1e-9), uncalibrated_ece=0.05,
        fitted_on="1000 training images", fit_loss=0.0,
    )  # fmt: skip
    assert "lower bound of its fit range" in s and "degenerate" in s and "should not be trusted" in s
    assert "well calibrated" not in s and "fit loss 0.0000" in s


def test_calibration_advice_matches_the_runs_state():
    under = _cal(0.2).calibration  # under-confident, as label smoothing makes it
    assert under.overconfidence < 0 and under.ece >= 0.02
    off = calibration_sentence(under, 0.2, 4, state="off", run_dir="runs/r1")
    assert "switched off" in off and "cifarlab calibrate runs/r1 fits it again" in off and "calibrate=true" not in off
    pending = calibration_sentence(under, 0.2, 4, state="pending", run_dir="runs/r1")
    assert "has not finished" in pending and "--resume runs/r1" in pending and "--set calibrate=true" not in pending
    never = calibration_sentence(under, 0.2, 4, state="no", run_dir="runs/r1")
    assert "--set calibrate=true" in never and "cifarlab calibrate runs/r1" in never


def test_plain_reading_derives_the_switched_off_state():
    y = np.repeat(np.arange(4), 25)
    ev = evaluate_predictions(y, logits_for(y, 4, margin=1.0), list("abcd"))  # right but unsure
    inf = InferenceInfo("cpu", "none", "auto", "float32", False, 64, None, None, "training", 0.0)
    ev = ev.with_run_info("test", None, inf, state())  # type: ignore[arg-type]
    text = " ".join(plain_reading(ev, hist_rows([1.0], [1.0]), {"calibration": None}, None, 0.2))
    assert "switched off" in text and "--set calibrate=true" not in text
    stopped = replace(ev, training=state(status="stopped"))
    text = " ".join(plain_reading(stopped, hist_rows([1.0], [1.0]), {}, None, 0.2))
    assert "has not finished" in text and "--set calibrate=true" not in text


# -- 4: overfitting only with evidence --------------------------------------------------------------------------


def test_no_overfitting_claim_from_the_accuracy_gap_alone():
    y = np.repeat(np.arange(4), 100)
    pred = y.copy()
    pred[: int(400 * 0.579)] = (y[: int(400 * 0.579)] + 1) % 4  # 42.1% right
    ev = evaluate_predictions(y, logits_for(pred, 4), list("abcd"))
    h = hist_rows([1.527], [1.382], acc=0.556, val_acc=0.456)
    s = generalisation_sentence(ev, h, {})
    assert s is not None and "clear overfitting" not in s and "does not show overfitting" in s
    assert "training mode" in s and "augmented" in s and "(1.382) is not above the training loss (1.527)" in s


def test_overfitting_claimed_when_validation_loss_rises_while_training_loss_falls():
    y = np.repeat(np.arange(4), 100)
    ev = evaluate_predictions(y, logits_for(y, 4), list("abcd"))
    ev = replace(ev, accuracy=0.7)
    h = hist_rows([1.2, 0.9, 0.6, 0.4, 0.3], [1.0, 0.8, 0.85, 0.95, 1.1], acc=0.95)
    s = generalisation_sentence(ev, h, {})
    assert s is not None and "rose from 0.800 (epoch 2) to 1.100 (epoch 5)" in s and "overfitting" in s
    assert "does not show" not in s


# -- 5: stopped, budget-cut and resumed runs ---------------------------------------------------------------------


def test_a_stopped_run_says_so_and_how_to_continue():
    s = training_sentence(hist_rows([1.0] * 7, [1.0] * 7), {}, state(status="stopped"))
    assert s.startswith("Training was stopped") and "7 epochs of the 30 planned" in s
    assert "cifarlab train --resume runs/r1" in s and "Training ran" not in s


def test_a_budget_run_says_it_stopped_at_its_deadline():
    budget = {"budget_seconds": 20.0, "epochs": 13, "steps_per_epoch": 7}
    s = training_sentence(hist_rows([1.0] * 8, [None] * 8), {"budget": budget}, state(last_epoch_steps=6))
    assert "time budget (20 s)" in s and "partway through epoch 8 (6 of its 7 steps ran)" in s
    assert "13 epochs planned" in s
    whole = training_sentence(hist_rows([1.0] * 8, [None] * 8), {"budget": budget}, state(last_epoch_steps=7))
    assert "after 8 epochs" in whole and "partway" not in whole
    # the plan's own figure when it has one, as the summary table shows it (epochs is its ceiling)
    planned = {**budget, "predicted_epochs": 12.4}
    s = training_sentence(hist_rows([1.0] * 8, [None] * 8), {"budget": planned}, state(last_epoch_steps=6))
    assert "against ~12.4 epochs planned" in s and "13 epochs planned" not in s


def test_a_resumed_run_and_singular_epoch():
    metrics = {"timings": {"session_seconds": [3.0, 33.3]}}
    s = training_sentence(hist_rows([1.0] * 30, [1.0] * 30), metrics, state())
    assert "resumed: 2 training sessions" in s
    one = training_sentence(hist_rows([1.0], [1.0]), {}, state(planned_epochs=1))
    assert one == "Training ran 1 epoch."


# -- 6: rounding and plurals ---------------------------------------------------------------------------------------


def test_shares_come_from_the_same_counts_and_round_alike():
    assert share(1, 40) == "2.5%" and share(25, 40) == "63%" and share(1, 30) == "3.3%" and share(0, 5) == "0%"
    classes = ["cyan", "orange", "c2", "c3", "c4", "c5", "c6", "c7"]
    y = np.repeat(np.arange(8), 40)
    pred = y.copy()
    pred[0] = 1  # cyan: one image missed, as orange (1 of 40: 2.5% both times)
    for k in range(2, 6):
        pred[40 * k : 40 * k + 3] = 0  # 12 images of other classes called cyan: its precision is low
    ev = evaluate_predictions(y, logits_for(pred, 8), classes)
    text = " ".join(class_sentences(ev))
    assert "Weak: cyan" in text
    assert "1 of the 40 cyan images (2.5%) is missed, taken for orange (2.5%)." in text
    assert "12 images of other classes are called cyan, most often c2 (3) and c3 (3)" in text
    from cifarlab.report.sections import _confusion_cell

    assert _confusion_cell(ev, "cyan") == "orange 2.5%"  # the confusions table rounds as the reading does


def test_plurals_for_a_single_mistake():
    y = np.repeat(np.arange(2), 20)
    pred = y.copy()
    pred[0] = 1
    ev = evaluate_predictions(y, logits_for(pred, 2), ["x", "y"])
    text = " ".join(pair_sentences(ev))
    assert "1 mistake (" in text and "the only mistake" in text and "1 mistakes" not in text
    one = evaluate_predictions(np.array([0]), logits_for([0], 2), ["x", "y"])
    assert "of the 1 test image correctly" in headline(one)


# -- 7: top-k when k >= the number of classes ------------------------------------------------------------------------


def test_trivial_top_k_is_not_in_the_headline_or_summary():
    y = np.repeat(np.arange(4), 10)
    ev = evaluate_predictions(y, logits_for(y, 4), list("abcd"))
    assert ev.top_k == 4 and not ev.top_k_informative
    assert "top 4" not in headline(ev) and "top-4" not in format_summary(ev)
    y10 = np.repeat(np.arange(10), 5)
    ev10 = evaluate_predictions(y10, logits_for(y10, 10), [f"c{i}" for i in range(10)])
    assert "top 5 guesses" in headline(ev10) and "top-5" in format_summary(ev10)


# -- 8: a run whose image folder moved -------------------------------------------------------------------------------


def test_a_moved_image_folder_is_found_with_data_dir(tmp_path, monkeypatch):
    from _runfolder import make_run, tiny_recipe
    from _synth import write_image_folder
    from cifarlab.data import load_dataset
    from cifarlab.runs import CONFIG, load_run, read_json, write_json

    monkeypatch.delenv("CIFARLAB_DATA", raising=False)
    orig = write_image_folder(tmp_path / "orig", n_train=3, n_test=2, n_classes=2)
    ds = load_dataset(orig, cache_dir=tmp_path / "cache")
    run_dir = make_run(tmp_path / "run", tiny_recipe().replace(dataset=str(orig)), classes=tuple(ds.classes))
    cfg = read_json(run_dir / CONFIG)
    cfg["dataset"].update(source=str(orig), checksum=ds.checksum)
    write_json(run_dir / CONFIG, cfg)
    moved = tmp_path / "moved"
    shutil.move(str(orig), moved)
    with pytest.raises(UserError, match=r"is gone .*--data-dir"):
        load_run_dataset(load_run(run_dir))
    with pytest.raises(UserError, match="has no train/ or test/"):
        load_run_dataset(load_run(run_dir), tmp_path / "run")
    found = load_run_dataset(load_run(run_dir), moved)
    assert found.classes == ds.classes and check_dataset(load_run(run_dir), found).checksum_matches_run is True
    monkeypatch.setenv("CIFARLAB_DATA", str(moved))
    assert load_run_dataset(load_run(run_dir)).checksum == ds.checksum
