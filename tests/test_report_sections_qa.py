"""QA's report defects (session 14): each test builds a tiny run folder (`_runfolder.make_run`, synthetic data),
renders the report's document and checks a number or a sentence against the run's own files."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from _runfolder import make_run, tiny_recipe
from cifarlab.evaluate import evaluate_run
from cifarlab.recipes import get_recipe
from cifarlab.report import build_document, build_report, render_markdown
from cifarlab.report.common import read_steps, seconds
from cifarlab.report.sections import (
    _budget_rows,
    _config_rows,
    _init_rows,
    _phase_rows,
    _summary_text,
    data_section,
    results_section,
    training_section,
)
from cifarlab.runs import CHECKPOINT, METRICS, STATUS, load_run, read_json, write_history, write_json
from test_report import fake_history, make_report_run, synthetic_dataset

FOUR = ("cat", "dog", "frog", "ship")


def _markdown(run_dir: Path, ds: Any) -> str:
    """The report's document for `run_dir`, rendered to Markdown without figures (fast: no drawing)."""
    ev, _ = evaluate_run(run_dir, dataset=ds)
    run = load_run(run_dir)
    timings = dict(run.metrics.get("timings") or {})
    doc = build_document(run, ev, [], [], timings, "meta", None, read_steps(run_dir))
    return render_markdown(doc, {})


def _table_rows(md: str) -> dict[str, str]:
    """{first cell: second cell} of every Markdown table row (escapes removed)."""
    out = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [re.sub(r"\\(.)", r"\1", c.strip()) for c in line.strip().strip("|").split(" | ")]
            if len(cells) >= 2:
                out[cells[0]] = cells[1]
    return out


def _md_table_row(md: str, first: str) -> list[str]:
    for line in md.splitlines():
        cells = [re.sub(r"\\(.)", r"\1", c.strip()) for c in line.strip().strip("|").split(" | ")]
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r}")


# -- 1. metrics.json's test_loss is the report's (at the temperature) -------------------------------------------


def test_metrics_test_loss_is_at_the_temperature_and_the_plain_one_is_kept(tmp_path: Path, undrawn_figures):
    """A calibrated run: training's stale `test_loss` (before the temperature) is replaced by the report's, and
    the plain softmax's loss is kept apart; the same weights without a temperature give exactly that plain loss."""
    ds = synthetic_dataset(classes=FOUR, n_test=80)
    recipe = tiny_recipe()
    hot = make_run(tmp_path / "hot", recipe, classes=FOUR, temperature=0.5)
    plain = make_run(tmp_path / "plain", recipe, classes=FOUR)  # the same seed: the same weights
    write_json(hot / METRICS, {"status": "finished", "test_loss": 123.0, "test_accuracy": 0.5})
    m_hot = build_report(hot, dataset=ds)
    m_plain = build_report(plain, dataset=ds)
    saved = read_json(hot / METRICS)
    assert saved["test_loss"] == saved["evaluation"]["loss"] == m_hot["evaluation"]["loss"]
    assert saved["test_loss_uncalibrated"] == pytest.approx(m_plain["test_loss"], rel=1e-9)
    assert saved["test_loss"] != pytest.approx(saved["test_loss_uncalibrated"])
    assert m_plain["test_loss_uncalibrated"] is None  # no temperature: the loss is the plain one
    assert f"{saved['test_loss']:.4f}" in (hot / "report.md").read_text()


def test_training_writes_the_calibrated_loss_and_the_serve_card_shows_it(tmp_path: Path):
    """Without a report too, training's metrics.json holds the loss at the temperature it fitted; serve's model
    card shows that one."""
    from _synth import make_dataset
    from cifarlab.experiment import run_experiment
    from cifarlab.serve import model_card

    recipe = tiny_recipe().replace(epochs=1, batch_size=32, precision="fp32", calibrate=True)
    res = run_experiment(recipe, dataset=make_dataset(16, 8), runs_root=tmp_path, quiet=True, report=False)
    saved = read_json(res.run_dir / METRICS)
    cal = saved["calibration"]
    assert cal["temperature"] != 1.0
    assert saved["test_loss"] == cal["test_loss"] and saved["test_loss_uncalibrated"] is not None
    assert saved["test_loss_uncalibrated"] != saved["test_loss"]
    run = load_run(res.run_dir)
    assert run.temperature == pytest.approx(cal["temperature"])
    assert model_card(run, "m", "torch", "none")["test_loss"] == pytest.approx(cal["test_loss"])


# -- 2. a stopped run reads as stopped --------------------------------------------------------------------------


def _stopped(tmp_path: Path, status: dict[str, Any], checkpoint: bool = True) -> tuple[Path, Any]:
    run_dir, ds = make_report_run(tmp_path, classes=FOUR)
    (run_dir / METRICS).unlink()  # a stopped run has no metrics.json (no test result)
    write_json(run_dir / STATUS, status)
    if checkpoint:
        (run_dir / CHECKPOINT).write_bytes(b"checkpoint")
    return run_dir, ds


def test_a_stopped_run_says_so_how_far_it_got_and_how_to_continue(tmp_path: Path):
    msg = "interrupted during epoch 6; the checkpoint after epoch 5 is kept"
    run_dir, ds = _stopped(tmp_path, {"status": "stopped", "pid": os.getpid(), "message": msg})
    md = _markdown(run_dir, ds)
    rows = _table_rows(md)
    planned = load_run(run_dir).recipe.epochs
    history = read_json(run_dir / "history.json")
    assert rows["status"].startswith(f"stopped after epoch {len(history)} of {planned}")
    assert rows["to continue it"] == f"cifarlab train --resume {run_dir}"
    assert f"This run has not finished: it stopped after {len(history)} epochs of {planned}" in md.replace("\\", "")
    assert rows["epochs run"].startswith(f"{len(history)} of {planned} planned")
    # no train_seconds: the wall time is what the epochs recorded
    total = sum(r["epoch_seconds"] for r in history)
    assert rows["training wall time"].startswith(f"{seconds(total)} (the sum of the times of its {len(history)}")
    # Table 1 marks where it stopped
    assert "the run was interrupted after this epoch" in _md_table_row(md, str(len(history)))[-1]


def test_a_running_status_whose_process_is_gone_reads_as_crashed(tmp_path: Path):
    run_dir, ds = _stopped(tmp_path, {"status": "running", "pid": None, "time": "2026-01-01T00:00:00"}, False)
    rows = _table_rows(_markdown(run_dir, ds))
    assert rows["status"].startswith("crashed after epoch 5 of")
    assert rows["to continue it"] == "no checkpoint was kept: train it again"


def test_a_finished_run_has_no_status_row(tmp_path: Path):
    run_dir, ds = make_report_run(tmp_path, classes=FOUR)
    write_json(run_dir / STATUS, {"status": "finished", "pid": 1})
    md = _markdown(run_dir, ds)
    assert "status" not in _table_rows(md) and "has not finished" not in md


# -- 3. a resumed run's wall times --------------------------------------------------------------------------------


def test_a_resumed_runs_wall_times_name_each_session_and_what_each_row_covers():
    timings = {
        "data_seconds": 0.2,
        "train_seconds": 36.0,
        "total_seconds": 33.4,
        "process_seconds": 34.6,
        "seconds_per_epoch": 1.2,
        "session_seconds": [3.0, 33.3],
        "sessions_total_seconds": 36.3,
    }
    rows, note = _phase_rows(timings, 1.0)
    got = dict((k, v) for k, v in rows)
    assert got["training session 1 of 2"] == "3.0 s" and got["training session 2 of 2"] == "33.3 s"
    assert got["training sessions, all 2 together"] == "36.3 s"
    assert got["training (all 2 sessions)"] == "36.0 s"
    assert got["training command, total (last session only)"] == "33.4 s"
    assert got["process start to test accuracy (last session only, imports included)"] == "34.6 s"
    assert note is not None and "3.0 + 33.3 = 36.3 s" in note
    # every row is labelled: none claims a total that a row inside it exceeds
    assert not any(k in ("training", "training command, total") for k in got)
    one, none = _phase_rows({**timings, "session_seconds": [3.0], "sessions_total_seconds": 3.0}, 1.0)
    assert none is None and not any("session" in k for k, _ in one)


# -- 4. frozen stages are not trainable -----------------------------------------------------------------------------


def test_the_model_section_counts_the_runs_frozen_stages_as_non_trainable(tmp_path: Path):
    from cifarlab.report.insights import model_info

    recipe = tiny_recipe("airnet").replace(freeze_stages=1)
    run = load_run(make_run(tmp_path / "ft", recipe, classes=FOUR))
    model = run.build_model()
    frozen = sum(p.numel() for p in model.stages()[0].parameters() if p.requires_grad)
    trainable_unfrozen = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert frozen > 0
    flags = [p.requires_grad for p in model.parameters()]
    counts = model_info(model, run, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))["parameters"]
    assert counts["trainable"] == trainable_unfrozen - frozen
    assert counts["total"] == counts["trainable"] + counts["non_trainable"]
    # counted, not changed: the report's Grad-CAM after it needs gradients through every stage
    assert [p.requires_grad for p in model.parameters()] == flags


# -- 5. the epoch the time budget cut ------------------------------------------------------------------------------


def test_a_budget_run_marks_the_epoch_the_deadline_cut_and_says_over_or_under(tmp_path: Path):
    run_dir, ds = make_report_run(tmp_path, classes=FOUR)
    history = fake_history(5, with_val=False)
    write_history(run_dir, history)
    per_epoch, last_steps = 7, 6
    lines = ["step,epoch,lr,loss"]
    step = 0
    for e in range(1, 6):
        for _ in range(per_epoch if e < 5 else last_steps):
            step += 1
            lines.append(f"{step},{e},0.001,1.0")
    (run_dir / "steps.csv").write_text("\n".join(lines) + "\n")
    budget = {
        "budget_seconds": 20.0,
        "taken_seconds": 22.1,
        "predicted_epochs": 12.03,
        "steps_per_epoch": per_epoch,
        "widths": [8, 16, 16],
        "scale": 1.0,
        "tta": "none",
        "reason": "test",
        "clock": "process start",
    }
    metrics = read_json(run_dir / METRICS)
    write_json(run_dir / METRICS, {**metrics, "budget": budget, "stopped_epoch": None, "restored_epoch": None})
    md = _markdown(run_dir, ds)
    assert f"stopped at the time budget ({last_steps} of {per_epoch} steps)" in _md_table_row(md, "5")[-1]
    rows = _table_rows(md)
    assert f"{22.1 / 20 - 1:.1%} over the budget" in rows["time budget"]
    assert rows["budget epochs"].startswith("~12.0 planned, 5 run (the last, epoch 5, 6 of its 7 steps")
    under = _budget_rows({**budget, "taken_seconds": 19.0}, history)
    assert f"{1 - 19 / 20:.1%} under the budget" in under[0][1]


# -- 6. a derived reference is not "exactly as pinned" ----------------------------------------------------------


def _fake_run(recipe: Any, config: dict[str, Any] | None = None) -> Any:
    from types import SimpleNamespace

    return SimpleNamespace(recipe=recipe, config=config or {})


def test_only_the_pinned_reference_is_described_as_pinned():
    ref = get_recipe("reference")
    assert "exactly as pinned" in ref.description
    assert _summary_text(_fake_run(ref)) == ref.description
    assert _summary_text(_fake_run(ref.replace(seed=3, dataset="/data/x"))) == ref.description  # where, not how
    tuned = ref.replace(name="reference-tuned", lr=7e-4, l2=1e-6, batch_size=256)
    text = _summary_text(_fake_run(tuned))
    assert "exactly as pinned" not in text and "Recipe reference-tuned, derived from reference, with" in text
    assert "3 settings changed from the registered reference (l2, lr, batch_size" in text
    overridden = _summary_text(_fake_run(ref.replace(bn_momentum=0.3)))  # `train --recipe reference --set ...`
    assert "exactly as pinned" not in overridden and "bn_momentum" in overridden
    notes = {r[0]: r[2] for r in _config_rows(tuned, {})}
    assert notes["lr"] == f"changed (reference's {json.dumps(ref.lr)})" and notes["epochs"] == ""
    assert notes["description"] == "reference's description; this run changed 3 settings"  # "exactly as pinned": no
    assert {r[0]: r[2] for r in _config_rows(ref, {})}["description"] == ""
    # a base recorded in config.json wins over the name
    named = {r[0]: r[2] for r in _config_rows(get_recipe("fast").replace(name="reference-x"), {"base_recipe": "fast"})}
    registered = {"model", "augment", "optimizer", "schedule", "callbacks"}  # notes: their registered description
    assert not any(v for k, v in named.items() if k not in registered)


# -- 7. Table 1's learning rate says what it is ---------------------------------------------------------------------


def test_table_1_says_which_learning_rate_it_shows_and_that_is_the_trainers():
    from cifarlab.models import build_model
    from cifarlab.registry import OPTIMIZERS

    fast = get_recipe("fast").replace(widths=(8, 16, 16))
    intro = training_section(fake_history(3), recipe=fast).blocks[0]
    assert "the SGD group's LR" in intro.text and "mean over the epoch's steps" in intro.text  # type: ignore[union-attr]
    # what the trainer logs (`Trainer.get_lr`: the last group) is that group: no conv filter, no BatchNorm
    model = build_model(fast, num_classes=4)
    opt = OPTIMIZERS.build(fast.optimizer, model, fast)
    names = {id(p): n for n, p in model.named_parameters()}
    last = opt.param_groups[-1]["params"]
    assert last and all(p.dim() != 4 and ".norm" not in names[id(p)] for p in last)
    ref = training_section(fake_history(3), recipe=get_recipe("reference")).blocks[0]
    assert "the mean over the epoch's steps of the adam optimizer's learning rate" in ref.text  # type: ignore[union-attr]


# -- 8. small misleading rows --------------------------------------------------------------------------------------


def test_no_validation_split_reads_none(tmp_path: Path):
    run_dir, ds = make_report_run(tmp_path, val_fraction=0.0, classes=FOUR)
    ev, _ = evaluate_run(run_dir, dataset=ds)
    rows = {r[0]: r[1] for r in data_section(load_run(run_dir), ev).blocks[0].rows}  # type: ignore[union-attr]
    assert rows["validation split"].startswith("none")


def test_the_temperature_fit_row_is_only_shown_while_a_temperature_applies():
    timings = {"train_seconds": 5.0, "calibration_seconds": 0.1}
    assert any(k == "softmax temperature fit" for k, _ in _phase_rows(timings, 0.5)[0])
    assert not any(k == "softmax temperature fit" for k, _ in _phase_rows(timings, 1.0)[0])


def test_a_restore_of_the_last_epoch_is_told_as_nothing_to_restore():
    history = fake_history(5)  # the last row carries early_stop and restored_best
    last = training_section(history, restored_epoch=5).blocks[1].rows[-1][-1]  # type: ignore[union-attr]
    assert "nothing to restore" in last and "best weights restored" not in last
    real = training_section(history, restored_epoch=3).blocks[1].rows[-1][-1]  # type: ignore[union-attr]
    assert "best weights restored" in real


def test_frozen_stages_are_counted_in_words():
    ref = get_recipe("reference")
    assert "the first stage frozen" in _init_rows({"source": "x"}, ref.replace(freeze_stages=1))[1][1]
    assert "the first 2 stages frozen" in _init_rows({"source": "x"}, ref.replace(freeze_stages=2))[1][1]


def test_a_top_k_row_is_hidden_when_k_covers_every_class(tmp_path: Path):
    for classes, shown in ((FOUR, False), (tuple(f"c{i}" for i in range(10)), True)):
        run_dir = make_run(tmp_path / str(len(classes)), tiny_recipe(), classes=classes)
        ev, _ = evaluate_run(run_dir, dataset=synthetic_dataset(classes=classes, n_test=40))
        rows = [r[0] for r in results_section(load_run(run_dir), ev).blocks[0].rows]  # type: ignore[union-attr]
        assert any(r.startswith("top-") for r in rows) is shown, (classes, ev.top_k)
        assert (ev.top_k < len(classes)) is shown


# -- 9. "..." only after a cut list ----------------------------------------------------------------------------------


def test_init_lists_the_source_classes_with_dots_only_when_cut():
    from cifarlab.finetune import InitResult

    def head_line(classes: list[str]) -> str:
        res = InitResult(source="src", kind="run folder", md5="", new_head=["head.weight"], source_classes=classes)
        return next(line for line in res.lines() if "new head" in line)

    assert "(blue, green, red) differ" in head_line(["blue", "green", "red"])
    assert "(a, b, c, d, ...) differ" in head_line(["a", "b", "c", "d", "e", "f"])


# -- 10. the tune report of a small study --------------------------------------------------------------------------


@pytest.fixture
def small_study(tmp_path: Path):
    optuna = pytest.importorskip("optuna")
    from cifarlab.tune import TuneSettings, open_study, space_from_dict

    recipe = get_recipe("reference").replace(widths=(8, 16, 16), dense_width=32)
    space = space_from_dict({"params": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}}, recipe)
    settings = TuneSettings(recipe=recipe, space=space, study_name="small", out_dir=tmp_path, n_trials=3)
    study = open_study(settings)

    def objective(trial: Any) -> float:
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        trial.set_user_attr("seconds", 6.25 + trial.number)  # the time the trial's console line printed
        return -abs(np.log10(lr) + 2)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=3)
    return study, settings


def test_the_tune_report_of_a_small_study_says_how_small_it_is(small_study, monkeypatch):
    from cifarlab import tune_report

    monkeypatch.setattr(tune_report, "png_bytes", lambda fig: b"png")
    study, settings = small_study
    final = [{"seed": 0, "status": "finished", "test_accuracy": 0.7875, "epochs_run": 5, "run_dir": "f"}]
    summary = tune_report.write_outputs(study, settings, final_runs=final, report=True)
    md = (settings.out_dir / tune_report.REPORT_MD).read_text().replace("\\", "")
    assert summary["sampler_counts"] == {"random": 3, "tpe": 0, "queued": 0}
    assert "3 random, 0 by TPE" in md
    assert summary["importances"] and summary["importances_caveat"] is True  # computed, and shown with a caveat
    assert "Caveat: only 3 complete trials" in md
    assert "mean test accuracy 78.75%" in md and "| 78.75% |" in md and "0.7875" not in md
    trials_md = (settings.out_dir / tune_report.TRIALS_MD).read_text()
    for n in range(3):  # the console's number, rounded as the console rounds it
        assert f"| {6.25 + n:.1f} |" in trials_md


def test_a_trial_console_line_and_trials_md_show_the_same_seconds(tmp_path: Path):
    pytest.importorskip("optuna")
    from _synth import make_dataset
    from cifarlab.tune import TuneSettings, space_from_dict, tune

    recipe = tiny_recipe().replace(epochs=1, batch_size=16, precision="fp32", early_stopping_patience=0)
    space = space_from_dict({"params": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}}, recipe)
    settings = TuneSettings(
        recipe=recipe, space=space, study_name="s", out_dir=tmp_path, n_trials=1, final_seeds=0, report=False
    )
    said: list[str] = []
    tune(settings, dataset=make_dataset(10, 4), say=said.append)
    line = next(s for s in said if "trial 0: complete" in s)
    console = re.search(r", (\d+\.\d) s ", line)
    assert console is not None
    row = next(r for r in (tmp_path / "trials.md").read_text().splitlines() if r.startswith("| 0 |"))
    assert f"| {console.group(1)} |" in row


def test_one_confused_pair_and_one_image_read_in_the_singular():
    from cifarlab.text import plural, stages_frozen

    assert (
        plural(1, "image") == "1 image" and plural(0, "image") == "0 images" and plural(1200, "epoch") == "1,200 epochs"
    )
    assert [stages_frozen(n) for n in (0, 1, 3)] == [
        "no stage frozen",
        "the first stage frozen",
        "the first 3 stages frozen",
    ]


def test_robustness_on_other_data_is_not_shown_as_the_runs(tmp_path: Path):
    """QA session 16: `evaluate --test-data X --corruptions` wrote eval_corruptions.json, and the report showed X's
    numbers as the run's robustness. A file computed on another test set, or on data whose checksum is not the
    run's, is named as such instead; the run's own (or one recording no dataset, as older files) is shown."""
    from cifarlab.report.common import read_corruptions
    from cifarlab.report.sections import robustness_section
    from test_report import CORRUPTIONS

    run_dir, ds = make_report_run(tmp_path, classes=FOUR)
    path = run_dir / "eval_corruptions.json"
    own = {"name": "synthetic", "source": "synthetic", "checksum": ds.checksum}
    for dataset in (None, own):
        write_json(path, {**CORRUPTIONS, **({"dataset": dataset} if dataset else {})})
        assert read_corruptions(run_dir)["results"]["fog"] == {1: 0.75, 2: 0.7, 3: 0.65}
    for dataset, named in (
        ({"name": "sub (test data)", "source": "/data/sub", "checksum": ""}, "sub (test data)"),
        ({**own, "checksum": "0" * 32}, "0" * 32),
    ):
        write_json(path, {**CORRUPTIONS, "dataset": dataset})
        rob = read_corruptions(run_dir)
        assert "results" not in rob and named in rob["error"] and "not this run's test set" in rob["error"]
        text = json.dumps(robustness_section(rob), default=lambda o: getattr(o, "__dict__", str(o)))
        assert "is not shown" in text and "56.67%" not in text
