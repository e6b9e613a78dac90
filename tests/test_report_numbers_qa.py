"""QA round 16 on the report's numbers: corruption means without the clean column, the refit advice for what the
temperature was fitted on, tied weak classes, the MCE's bin, and one tiny run whose console, metrics.json, report
and `cifarlab report`/`calibrate` agree (exact accuracy, the command's total, the headline loss, the val columns'
meaning, no stale report time, a stale evaluation block marked)."""

from __future__ import annotations

import json
import re

import numpy as np

from _synth import write_image_folder
from cifarlab import cli
from cifarlab.evaluate import evaluate_predictions
from cifarlab.experiment import run_experiment
from cifarlab.recipes import get_recipe
from cifarlab.report.common import corruption_mean, most_damaging
from cifarlab.report.reading import calibration_sentence, class_sentences
from cifarlab.report.sections import _mce_text, robustness_section
from test_reading_qa import _cal


def _robustness() -> dict:
    results = {"contrast": {0: 0.72, 1: 0.72, 5: 0.37}, "jpeg": {0: 0.72, 1: 0.70, 5: 0.50}}
    return {"results": results, "clean_accuracy": 0.72, "mean_accuracy": 0.5725, "relative_drop": 0.2, "n": 100}


def test_a_corruptions_mean_leaves_the_clean_severity_out():
    """The report averaged severity 0 (clean) into each corruption's mean and "most damaging", where the console
    and eval_corruptions.json's per_corruption do not (contrast 60.3% against 54.5%)."""
    rob = _robustness()
    assert corruption_mean(rob["results"]["contrast"]) == (0.72 + 0.37) / 2
    assert most_damaging(rob) == ("contrast", (0.72 + 0.37) / 2)
    section = json.dumps(robustness_section(rob), default=lambda o: getattr(o, "__dict__", str(o)))
    assert "54.5%" in section and "60.3%" not in section


def test_the_advice_for_a_worse_temperature_follows_what_it_was_fitted_on():
    """A temperature fitted on a validation split was told to "retrain with --set val_fraction=0.02 so that it is
    fitted on held-out images": it was, and the advice would shrink the split."""
    plain, sharp = _cal(1.0), _cal(4.0)

    def advice(fitted_on: str) -> str:
        return calibration_sentence(
            sharp.calibration, 0.2, 4, temperature=0.28, uncalibrated_ece=plain.calibration.ece,
            fitted_on=fitted_on, loss=sharp.loss, uncalibrated_loss=plain.loss, run_dir="runs/r1",
        )  # fmt: skip

    on_train, few_val, many_val = (
        advice("1000 training images"),
        advice("80 validation images"),
        advice("1000 validation images"),
    )
    assert "val_fraction=0.02" in on_train
    assert "val_fraction=0.02" not in few_val and "fitted on only 80 validation images" in few_val
    assert "larger validation split" in few_val
    assert (
        "val_fraction" not in many_val and "Do not rely on it: cifarlab calibrate runs/r1 --off removes it." in many_val
    )


def test_classes_tied_with_the_weakest_are_named_too():
    """Three of five classes at F1 0.00 and the summary named one of them, breaking the tie the opposite way to
    the "lowest" it names elsewhere."""
    classes = ["alpha", "beta", "gamma", "delta", "eps"]
    y = np.repeat(np.arange(5), 20)
    pred = y.copy()
    pred[y == 0] = 1  # alpha, gamma and eps never predicted, never right
    pred[y == 2] = 3
    pred[y == 4] = 3
    ev = evaluate_predictions(y, np.eye(5)[pred] * 6, classes)
    assert [ev.per_class[c].f1 for c in ("alpha", "gamma", "eps")] == [0.0, 0.0, 0.0]
    text = " ".join(class_sentences(ev))
    assert "Weak: alpha (F1 0.00" in text  # the lowest by class order, as "lowest" is
    assert "As weak, at the same F1 (0.00): gamma and eps" in text


def test_the_mce_names_the_bin_that_sets_it():
    ev = _cal(1.0)
    worst = max((b for b in ev.calibration.bins if b.gap is not None), key=lambda b: abs(b.gap))
    text = _mce_text(ev.calibration)
    assert text.startswith(f"{ev.calibration.mce:.2%}") and f"{worst.count} image" in text
    assert f"{worst.lower:.2f}–{worst.upper:.2f}" in text


def test_a_runs_console_metrics_and_report_agree(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CIFARLAB_CACHE", str(tmp_path / "cache"))
    folder = write_image_folder(tmp_path / "data", n_train=8, n_test=7, n_classes=4)  # 1/28: no float32 value
    recipe = get_recipe("reference").replace(
        dataset=str(folder), widths=(4, 8, 8), dense_width=16, dropout=(), augment="none", batch_size=8,
        precision="fp32", val_fraction=0.25, epochs=1, calibrate=True,
    )  # fmt: skip
    said: list[str] = []
    result = run_experiment(recipe, runs_root=tmp_path / "runs", device="cpu", log=said.append)
    run, m = result.run_dir, result.metrics
    n = 28
    assert m["test_accuracy"] == round(m["test_accuracy"] * n) / n  # exact, not float32's 0.69999998...
    t = m["timings"]
    phases = t["data_seconds"] + t["setup_seconds"] + t["train_seconds"] + t["eval_seconds"]
    assert t["total_seconds"] >= phases  # it started after the data loading
    headline = next(s for s in said if s.startswith("test accuracy"))
    assert f"(loss {m['test_loss']:.4f}," in headline  # the calibrated loss metrics.json and the report give
    md = (run / "report.md").read_text()
    assert "The val\\_ columns are measured as training measures them" in md and "L2 term" in md

    capsys.readouterr()
    assert cli.main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("test accuracy") and "top-" not in out  # 4 classes: top-5 is 100% by construction
    md = (run / "report.md").read_text()
    assert not re.search(r"^\| report \|", md, re.M)  # training's report time is not this report's

    assert cli.main(["calibrate", str(run), "--off"]) == 0
    ev = json.loads((run / "metrics.json").read_text())["evaluation"]
    assert "stale" in ev and "cifarlab report" in ev["stale"]


def test_the_reliability_diagram_draws_bins_of_few_images_faint():
    """One bin of 2 images, with an 81-point gap, was the tallest bar of a figure whose ECE was 2% (QA)."""
    import matplotlib.pyplot as plt

    from cifarlab.report.figures import FEW_IN_BIN, plot_reliability

    ev = _cal(3.0)
    fig = plot_reliability(ev)
    try:
        top = fig.axes[0]
        faint = {round(p.get_x() + p.get_width() / 2, 6) for p in top.patches if p.get_alpha() == 0.3}
        few = {
            round((b.lower + b.upper) / 2, 6) for b in ev.calibration.bins if 0 < b.count < FEW_IN_BIN
        }  # 400 images: 0.5% is 2, so the fixed floor decides
        assert faint == few and few
        assert any("fewer than 20 images" in t.get_text() for t in top.get_legend().get_texts())
    finally:
        plt.close(fig)


def test_a_worse_temperature_cites_only_the_measures_that_got_worse():
    """ "made the probabilities worse ... loss 1.173 without it, 0.989 with it": a loss that fell was cited as the
    evidence (QA round 3)."""
    plain, sharp = _cal(1.0), _cal(4.0)
    s = calibration_sentence(
        sharp.calibration, 0.2, 4, temperature=0.28, uncalibrated_ece=plain.calibration.ece,
        fitted_on="1000 training images", loss=0.9, uncalibrated_loss=1.2, run_dir="runs/r1",
    )  # fmt: skip
    worse_part = s.split("made the probabilities worse, not better (")[1].split(")")[0]
    assert "ECE" in worse_part and "loss" not in worse_part
    assert "though not by every measure (loss 1.200 without it, 0.900 with it)" in s
