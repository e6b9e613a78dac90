"""QA round 17 on the report's reading and the end of a run: a Ctrl-C during the report leaves a finished run
finished (M2); a collapsed or diverged model is said first, without calibration or overfitting advice (M4); the
calibration wording follows the size and direction of the ECE (L9); restoring the last epoch's own weights is not
called a restore (L10); a non-empty high-confidence share never reads "0%" (L11)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from _synth import make_dataset
from cifarlab.evaluate import evaluate_predictions
from cifarlab.experiment import run_experiment
from cifarlab.recipes import get_recipe
from cifarlab.report.reading import calibration_sentence, plain_reading

TINY_RECIPE = get_recipe("reference").replace(widths=(8, 16, 16), dense_width=32, batch_size=16, precision="fp32")


def logits_for(pred: list[int] | np.ndarray, k: int, margin: float = 6.0) -> np.ndarray:
    z = np.zeros((len(pred), k))
    z[np.arange(len(pred)), pred] = margin
    return z


def _history(loss: float) -> list[dict]:
    return [{"epoch": 1, "loss": loss, "accuracy": 0.30, "val_loss": None, "val_accuracy": None, "events": []}]


# -- M4: a collapsed or diverged model ---------------------------------------------------------------------------


def test_diverged_model_is_said_first_and_its_advice_left_out():
    y = np.repeat([0, 1, 2], 100)
    ev = evaluate_predictions(y, logits_for([2] * 300, 3, margin=1e16), ["circle", "triangle", "square"])
    assert ev.loss > 1e14
    out = plain_reading(ev, _history(15.46), {"status": "finished"})
    first = out[0]
    assert first.startswith("This model does not work")
    assert "predicts square for all 300 test images" in first and "training diverged" in first
    assert "15.4600" in first and "6.67e+15" in first  # the train loss and the huge test loss, readably
    text = " ".join(out)
    assert "Calibration:" not in text and "val_fraction" not in text
    assert "overfitting" not in text.replace("overfitting readings", "")


def test_one_class_collapse_with_a_moderate_loss_is_flagged():
    y = np.repeat([0, 1, 2], 100)
    ev = evaluate_predictions(y, logits_for([0] * 300, 3), ["a", "b", "c"])
    out = plain_reading(ev, _history(1.2), {"status": "finished"})
    assert out[0].startswith("This model does not work") and "collapsed onto one class" in out[0]
    assert not any(s.startswith("Calibration:") for s in out)


def test_a_working_model_gets_no_collapse_sentence():
    y = np.repeat([0, 1, 2], 100)
    pred = y.copy()
    pred[::10] = (pred[::10] + 1) % 3  # 90% right
    ev = evaluate_predictions(y, logits_for(pred, 3, margin=2.0), ["a", "b", "c"])
    out = plain_reading(ev, _history(0.4), {"status": "finished"})
    assert not out[0].startswith("This model does not work")
    assert any(s.startswith("Calibration:") for s in out)


# -- L9 / L11: the calibration wording ---------------------------------------------------------------------------


def _cal(ece: float, over: float, hc_share: float = 0.5):
    y = np.repeat([0, 1, 2], 100)
    cal = evaluate_predictions(y, logits_for(y, 3), ["a", "b", "c"]).calibration
    return replace(cal, ece=ece, overconfidence=over, high_confidence=replace(cal.high_confidence, share=hc_share))


def test_calibration_wording_follows_the_size_and_direction_of_the_ece():
    big = calibration_sentence(
        _cal(0.421, 0.42), temperature=1.58, uncalibrated_ece=0.45, fitted_on="600 training images"
    )
    assert "badly over-confident" in big and "far too sure" in big
    assert "a little too sure" not in big and "too low" not in big  # T > 1 softened the probabilities
    small = calibration_sentence(
        _cal(0.03, 0.03), temperature=0.8, uncalibrated_ece=0.04, fitted_on="600 training images"
    )
    assert "slightly over-confident" in small and "a little too sure" in small and "too low" in small
    under = calibration_sentence(_cal(0.2, -0.2))
    assert "badly under-confident" in under and "over-confident" not in under


@pytest.mark.parametrize(("share", "text"), [(0.003, "(0.3% of images)"), (0.0004, "(<0.1% of images)")])
def test_a_small_high_confidence_share_does_not_read_zero(share, text):
    s = calibration_sentence(_cal(0.1, 0.1, hc_share=share))
    assert text in s and "(0% of images)" not in s


# -- M2 / L10: the end of a run ----------------------------------------------------------------------------------


def test_ctrl_c_during_the_report_leaves_the_run_finished(tmp_path, monkeypatch):
    import cifarlab.report
    from cifarlab.runs import load_run, run_status

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cifarlab.report, "build_report", interrupted)
    lines: list[str] = []
    with pytest.raises(KeyboardInterrupt):
        run_experiment(TINY_RECIPE.replace(epochs=1), dataset=make_dataset(16, 4), runs_root=tmp_path, log=lines.append)
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "finished" and status["report_error"] == "interrupted"
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "finished"
    assert run_status(load_run(run_dir))[0] == "finished"
    assert any(f"cifarlab report {run_dir}" in line for line in lines)
    assert not any("resume" in line for line in lines)


def test_restoring_the_last_epochs_own_weights_is_not_called_a_restore(tmp_path):
    recipe = TINY_RECIPE.replace(epochs=1)
    assert recipe.restore_best_weights and recipe.val_fraction > 0
    lines: list[str] = []
    res = run_experiment(recipe, dataset=make_dataset(16, 4), runs_root=tmp_path, log=lines.append, report=False)
    assert res.metrics["restored_epoch"] == 1  # the weights kept are epoch 1's
    text = "\n".join(lines)
    assert "best weights restored" not in text
    assert "nothing to restore" in text
    with open(res.run_dir / "history.csv", newline="") as f:
        assert "restored_best" not in f.read()


@pytest.mark.parametrize(
    "loss, text", [(0.55137, "0.5514"), (9999.5, "9999.5000"), (6.67e15, "6.67e+15"), (float("inf"), "inf")]
)
def test_the_report_writes_a_diverged_runs_loss_readably(loss, text):
    """The Summary and Results tables printed a diverged run's test loss as 6670000000000000.0000."""
    from cifarlab.report.common import loss_text

    assert loss_text(loss) == text
