"""`--budget`: duration parsing, the width/TTA choice, the deadline keeper, and a whole budgeted run."""

from __future__ import annotations

import csv
import json
import time

import pytest
import torch
from torch import nn

import cifarlab
from _synth import FixedClock, SizedSlow, make_dataset
from cifarlab import cli
from cifarlab.budget import (
    EXIT_SECONDS,
    MARGIN,
    Clock,
    Probe,
    TimeBudget,
    _choose,
    _options,
    epochs_that_fit,
    image_scale_costs,
    parse_duration,
    plan_budget,
    process_age,
    scaled_widths,
    steps_that_fit,
)
from cifarlab.data import BatchLoader
from cifarlab.errors import ConfigError
from cifarlab.experiment import run_experiment
from cifarlab.recipes import get_recipe
from cifarlab.runs import load_checkpoint, load_run
from cifarlab.train import Trainer, recipe_callbacks
from cifarlab.train.callbacks import Callback
from cifarlab.train.optim import lr_multiplier


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("2m", 120), ("1.5min", 90), ("1h30m", 5400), ("1m30", 90), ("10 minutes", 600)],
)
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10x", "5s5x", "-5s", "2", "nan", "1.5.2m", "30 30", "1m1m", "30s2m"])
def test_bad_durations_are_refused_with_examples(text):
    with pytest.raises(ConfigError, match="--budget"):
        parse_duration(text)


def test_the_api_names_its_own_argument(tmp_path):
    with pytest.raises(ConfigError, match=r"^budget= 'soon' is not a duration"):
        cifarlab.fit("fast", make_dataset(4, 2), runs_dir=tmp_path, budget="soon")
    assert not any(tmp_path.iterdir())


def test_cli_refuses_a_bad_budget_before_any_work(tmp_path, capsys):
    assert cli.main(["train", "--budget", "soon", "--runs-dir", str(tmp_path)]) == 2
    assert "not a duration" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_process_age_counts_from_process_start():
    age = process_age()
    assert 0 < age < 24 * 3600
    time.sleep(0.05)
    assert process_age() >= age  # /proc/uptime ticks in 10 ms steps


def test_scaled_widths_round_to_multiples_of_eight():
    assert scaled_widths((32, 64, 128), 0.375) == (16, 24, 48)
    assert scaled_widths((32, 64, 128), 0.1) == (8, 8, 16)
    assert scaled_widths((64, 256, 256), 2.0) == (128, 512, 512)


def _probes(step_1x: float) -> list[Probe]:
    """Measured-like probes where step time is proportional to FLOPs (2x width ~ 4x FLOPs)."""
    out = []
    for scale in (2.0, 1.0, 0.5, 0.25):
        flops = 1e8 * scale**2
        out.append(Probe(scale, (8,), flops, step_1x * scale**2, 1e-3 * scale**2))
    return out


def test_choice_narrows_and_drops_tta_as_the_budget_shrinks():
    recipe = get_recipe("fast").replace(epochs=3, tta="flip_translate")  # 6 TTA views
    n = {"test": 10_000, "val": 0, "steps": 100}
    picks = {}
    for budget in (30, 60, 120, 600, 3600):
        o = _choose(_options(_probes(2.0), 0, 0, 0, recipe, budget, now=5.0, n=n), recipe.epochs)
        picks[budget] = o
        # everything but the margin, the exit's reserve and the 5 s already gone
        assert o.train_seconds + o.eval_seconds == pytest.approx(budget * (1 - MARGIN) - EXIT_SECONDS - 5.0)
        assert o.eval_seconds <= 0.1 * budget or o.tta == "none"
    scales = [picks[b].probe.scale for b in sorted(picks)]
    assert scales == sorted(scales)  # a larger budget never gets a narrower net
    assert picks[30].probe.scale == 0.25 and picks[30].epochs < 3  # even the narrowest is short of 3 epochs
    assert picks[30].tta == "flip"  # 6 views would take 3.75 s of a 30 s budget; 2 views 1.25 s
    assert picks[600].probe.scale == 0.5 and picks[600].epochs >= 3  # 1x would train only 2.6 epochs
    assert picks[3600].probe.scale == 2.0 and picks[3600].epochs > 3  # widest, and more epochs with the rest
    assert picks[3600].tta == "flip_translate"


def test_image_scale_costs_follow_the_pixel_count_plus_a_fixed_part():
    assert image_scale_costs((1.0, 1.0), 1.0) == [1.0, 1.0]
    # a 16-pixel step measured at 0.25 of a full one: all of the step follows the pixel count
    assert image_scale_costs((0.5, 1.0), 0.25) == pytest.approx([0.25, 1.0])
    # measured at 0.4: alpha = (0.4 - 0.25) / 0.75 = 0.2 of the step does not shrink; 3/4 size costs 0.2 + 0.8 * 0.5625
    assert image_scale_costs((0.5, 0.75, 1.0), 0.4) == pytest.approx([0.4, 0.65, 1.0])
    assert image_scale_costs((0.5, 1.0), 1.3) == pytest.approx([1.0, 1.0])  # slower when smaller: no saving


def test_epochs_and_steps_that_fit_count_each_epoch_at_its_own_cost():
    assert epochs_that_fit(10.0, lambda e: 4.0) == pytest.approx(2.5)
    assert epochs_that_fit(10.0, lambda e: 2.0 if e == 0 else 4.0) == pytest.approx(3.0)
    assert epochs_that_fit(0.0, lambda e: 4.0) == 0.0
    # 10 steps an epoch, one done; a step now (epoch 0, cost 0.5) takes 0.1 s, so one at full size 0.2 s
    assert steps_that_fit(2.4, 0.1, 0, 1, 10, 0.0, [0.5, 1.0]) == 9 + 7  # epoch 0's rest (0.9 s), 1.5 s / 0.2 s
    assert steps_that_fit(2.4, 0.1, 0, 1, 10, 0.0) == 24  # every epoch at the same cost
    assert steps_that_fit(2.4, 0.1, 0, 1, 10, 0.5, [0.5, 1.0]) == 9 + 5  # the boundary costs 0.5 s
    assert steps_that_fit(1.0, 0.2, 1, 15, 10, 0.0, [0.5, 1.0]) == 5  # mid-epoch 1: 5 steps left in it
    assert steps_that_fit(1.0, 0.2, 0, 10, 10, 0.0, [0.5, 1.0]) == 2  # epoch 0 just ended: the next, 0.4 s a step


# The budgets that leave 3.9 s and 0.4 s to train, whatever the margin and the exit's reserve
@pytest.mark.parametrize(("train_s", "kept"), [(3.9, True), (0.4, False)])
def test_budget_keeps_progressive_resizing_while_the_final_size_gets_half_an_epoch(one_thread, train_s, kept):
    budget = (train_s + EXIT_SECONDS) / (1 - MARGIN)
    ds = make_dataset(16, 4)  # 64 images, batch 8: 8 steps per epoch; a full-size epoch takes 0.8 s
    recipe = get_recipe("fast").replace(batch_size=8, epochs=2, train_scales=(0.5, 1.0), tta="none")

    def loader(r):
        return BatchLoader(ds.x_train, ds.y_train, 8, shuffle=True, drop_last=True, scales=r.train_scales)

    chosen, plan = plan_budget(
        recipe,
        budget,
        build=lambda r: SizedSlow(0.1),
        loader=loader,
        x_eval=ds.x_test[:8],
        n_test=len(ds.y_test),
        n_val=0,
        steps_per_epoch=8,
        device=torch.device("cpu"),
        clock=FixedClock("the test"),
    )
    if kept:  # 3.9 s to train: epoch 1 at 16 x 16 (~0.2 s), then full-size epochs
        assert chosen.train_scales == (0.5, 1.0) and "kept" in plan.reason
        assert plan.epoch_costs[1] == 1.0 and 0.2 < plan.epoch_costs[0] < 0.4
        assert plan.predicted_epochs == pytest.approx(1 + (train_s - 0.8 * plan.epoch_costs[0]) / 0.8, rel=0.1)
    else:  # 0.4 s: 16 x 16 for 0.2 s, then only a quarter epoch at full size; so full size throughout
        assert chosen.train_scales == () and plan.epoch_costs == []
        assert "left out" in plan.reason
        assert plan.predicted_epochs == pytest.approx(train_s / 0.8, rel=0.15)


class Slow(nn.Module):
    """A tiny model whose steps take a known time, so the deadline keeper can be checked against the clock."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.fc = nn.Linear(3 * 32 * 32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            time.sleep(self.seconds)
        return self.fc(x.flatten(1))


def test_time_budget_ends_training_at_the_deadline_with_the_schedule_annealed(one_thread):
    ds = make_dataset(16, 4)  # 64 images, batch 8: 8 steps per epoch
    recipe = get_recipe("fast").replace(model="reference_cnn", epochs=2, batch_size=8, ema_decay=0.0, whiten_init=False)
    recipe = recipe.replace(whiten_bias_epochs=0.0)
    loader = BatchLoader(ds.x_train, ds.y_train, 8, shuffle=True, drop_last=True)
    Trainer(Slow(0.0), recipe, loader).fit()  # warm up: a fresh process's first steps can take seconds
    keeper = TimeBudget(deadline=process_age() + 1.5)
    lrs: list[float] = []

    class LR(Callback):
        def on_train_batch_end(self, batch, logs=None):
            lrs.append(self.trainer.get_lr())

    trainer = Trainer(Slow(0.02), recipe, loader, callbacks=[*recipe_callbacks(recipe, False), keeper, LR()])
    t0 = time.perf_counter()
    result = trainer.fit()
    took = time.perf_counter() - t0
    assert result.status == "finished"
    # 2 planned epochs are 16 steps (~0.35 s); the deadline keeps it going to ~1.5 s, i.e. many more epochs
    assert 1.2 < took < 3.0, took
    assert len(result.history) > 2 and trainer.step == trainer.total_steps == keeper.stopped_at_step
    # onecycle ends near its final LR fraction: the schedule ran over the re-estimated step count
    peak = max(lrs)
    assert lrs[-1] < 0.25 * peak
    assert lrs.index(peak) < len(lrs) // 2


@pytest.mark.long
def test_a_budgeted_run_finishes_within_its_budget(tmp_path, monkeypatch, one_thread):
    # Through the API: its budget counts from the fit() call (the test process started long ago), as the CLI's
    # counts from the start of a fresh `cifarlab train` process.
    monkeypatch.setattr("cifarlab.experiment.set_threads", lambda: 1)
    budget = 8.0
    # On the CPU: on a GPU machine, CUDA's start-up (seconds, with other tests sharing the GPU) is not this test's.
    run = cifarlab.fit(
        "fast", make_dataset(48, 8), batch_size=32, runs_dir=tmp_path, budget=budget, report=False, device="cpu"
    )
    b = run.metrics["budget"]
    assert b["budget_seconds"] == budget and b["clock"] == "the fit() call"
    assert 0.7 * budget < b["taken_seconds"] < 1.1 * budget, b
    assert b["scale"] in (2.0, 1.5, 1.0, 0.75, 0.5, 0.375, 0.25)
    measured = [p["scale"] for p in b["probes"] if p["step_seconds"] is not None]
    assert len(measured) == 2 and 1.0 in measured  # the recipe's own width and one other
    cfg = json.loads((run.path / "config.json").read_text())
    assert cfg["recipe"]["widths"] == b["widths"] and cfg["budget"]["scale"] == b["scale"]  # the run is what it planned
    # fast's progressive resizing is kept (many epochs fit), each epoch's step cost in the plan
    assert cfg["recipe"]["train_scales"] == list(get_recipe("fast").train_scales) == [0.75, 1.0]
    assert "train_scales=[0.75, 1.0] kept" in b["reason"] and len(b["epoch_costs"]) == 2


def test_budget_refuses_resume_and_a_too_small_budget(tmp_path, monkeypatch, one_thread, capsys):
    # Refused on the command line before any data is read (no data exists here) or any process is started.
    for extra, needle in (
        (["--resume", str(tmp_path)], "--budget cannot be combined with it"),
        (["--init", str(tmp_path)], "cannot be combined with --init"),
        (["--nproc", "2"], "cannot run under torchrun"),
    ):
        assert cli.main(["train", "--budget", "60s", "--data-dir", str(tmp_path / "none"), *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    monkeypatch.setattr("cifarlab.budget.process_age", lambda: 100.0)  # as if start-up had eaten the budget
    with pytest.raises(ConfigError, match="no time to train.*give a larger --budget"):
        run_experiment(
            get_recipe("fast").replace(batch_size=32), dataset=make_dataset(48, 8), runs_root=tmp_path, budget=30.0
        )
    assert not any(tmp_path.iterdir())  # nothing written
    # fit()'s budget counts from the call, and the message names fit()'s argument
    monkeypatch.setattr("cifarlab.budget.Clock.elapsed", lambda self: 100.0)
    with pytest.raises(ConfigError, match="no time to train.*give a larger budget="):
        cifarlab.fit("fast", make_dataset(48, 8), batch_size=32, runs_dir=tmp_path, budget=30.0, device="cpu")
    assert not any(tmp_path.iterdir())


class _CtrlCAtEpoch2(Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt


@pytest.mark.long
def test_a_budget_run_stopped_and_resumed_keeps_its_plan_and_says_the_time_is_not_comparable(
    tmp_path, monkeypatch, one_thread
):
    """The resumed run lost its budget record (metrics.json, the line, the report's rows) though the README says
    a budget run stores it (QA)."""
    monkeypatch.setattr("cifarlab.experiment.set_threads", lambda: 1)
    recipe = get_recipe("fast").replace(batch_size=32)
    stopped = run_experiment(
        recipe, dataset=make_dataset(48, 8), runs_root=tmp_path, budget=6.0, callbacks=[_CtrlCAtEpoch2()],
        budget_clock=Clock.from_now("the test"), report=False, device="cpu", quiet=True,
    )  # fmt: skip
    assert stopped.status == "stopped"
    ckpt = load_checkpoint(stopped.run_dir / "checkpoint.pt")
    (saved,) = [e["state"] for e in ckpt["callbacks"]["callbacks"] if e["class"] == "TimeBudget"]
    assert saved["seconds_left"] > 0 and saved["total_steps"] > ckpt["step"]
    lines: list[str] = []
    done = run_experiment(
        resume=stopped.run_dir, dataset=make_dataset(48, 8), report=False, device="cpu", log=lines.append
    )
    b = done.metrics["budget"]
    planned = json.loads((stopped.run_dir / "config.json").read_text())["budget"]
    # The resumed session trains for the time the budget had left, on the same schedule: it trained the recipe's
    # epoch count (hundreds, for a budget plan) with a jump in the LR at the resume (QA)
    assert done.metrics["timings"]["session_seconds"][-1] < saved["seconds_left"] + 5
    with open(stopped.run_dir / "steps.csv") as f:
        rows = list(csv.DictReader(f))
    after = [float(r["lr"]) for r in rows if int(r["step"]) > ckpt["step"]]
    # The schedule goes on over the step count the budget had estimated (saved), not the recipe's epochs: the first
    # two resumed steps (before the deadline keeper has two timings to re-estimate from) follow it exactly. A row's
    # LR was set at its batch's start, one step before its label.
    k, total = ckpt["step"], saved["total_steps"]
    recipe = load_run(stopped.run_dir).recipe
    expected = lr_multiplier(recipe, k + 1, total) / lr_multiplier(recipe, k, total)
    assert len(after) >= 2 and after[1] / after[0] == pytest.approx(expected, rel=1e-9)
    assert b["resumed"] is True and b["taken_seconds"] is None and b["widths"] == planned["widths"]
    assert any("this run was resumed, so its time is not compared with the budget" in s for s in lines)
    assert any("epochs until the budget's deadline" in s for s in lines)  # not "N epochs max": not a cap (QA)
    from cifarlab.report.sections import _budget_rows

    assert "stopped and resumed" in _budget_rows(b)[0][1]
