"""`cifarlab tune`: search-space checks, a tiny study end to end (outputs, best config that trains), pruning, and
two worker processes killed mid-study and resumed without losing or repeating a trial."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from _synth import TINY_ARGS, write_image_folder
from cifarlab import cli
from cifarlab.config import resolve_recipe
from cifarlab.errors import ConfigError, Interrupted, UserError
from cifarlab.recipes import get_recipe
from cifarlab.registry import BUILTIN_RECIPES
from cifarlab.train import Callback

optuna = pytest.importorskip("optuna")

from cifarlab.tune import (  # noqa: E402  (after the importorskip)
    TuneSettings,
    default_space_path,
    load_space,
    open_study,
    require_optuna,
    space_from_dict,
    start_workers,
    tune,
)

TINY_RECIPE = get_recipe("reference").replace(widths=(8, 16, 16), dense_width=32, batch_size=16, precision="fp32")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of learnable synthetic images: 4 classes, 40 training and 10 test images each."""
    root = tmp_path_factory.mktemp("synth") / "synth"
    return write_image_folder(root, 40, 10)


@pytest.fixture
def one_core():
    """In-process trials: one core (prepare() sets torch's threads to the cores it may use)."""
    import torch

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = torch.get_num_threads()
    if affinity:
        os.sched_setaffinity(0, {min(affinity)})
    yield
    if affinity:
        os.sched_setaffinity(0, affinity)
    torch.set_num_threads(threads)


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _status(run_dir: Path) -> str:
    return json.loads((run_dir / "status.json").read_text())["status"]


# -- search spaces -------------------------------------------------------------------------------------------


def test_every_builtin_recipe_ships_a_valid_default_space():
    names = {"reference": {"lr", "plateau_factor", "plateau_patience", "dropout.0", "dropout.1", "l2", "batch_size"}}
    for recipe in ("reference", "fast", "air94"):
        path = default_space_path(recipe)
        assert path is not None and path.name == f"{recipe}.yaml"
        space = load_space(None, get_recipe(recipe))
        assert space.recipe == recipe and space.metric == "val_accuracy"
        if recipe in names:
            assert {p.name for p in space.params} == names[recipe]
    lr = next(p for p in load_space(None, get_recipe("reference")).params if p.name == "lr")
    assert lr.kind == "float" and lr.log
    # fast trains without a validation split: its trials hold one out, the final run does not
    assert dict(load_space(None, get_recipe("fast")).trial) == {"val_fraction": 0.1}


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"lrr": {"low": 1e-4, "high": 1e-2}}, ["unknown key 'lrr'", "did you mean 'lr'"]),
        ({"lr": {"low": 0.01, "high": 0.001}}, ["params.lr", "low=0.01 must be smaller than high=0.001"]),
        ({"l2": {"low": 0, "high": 0.01, "log": True}}, ["params.l2", "log: true needs low > 0"]),
        ({"plateau_factor": {"low": 0.5, "high": 1.5}}, ["params.plateau_factor", "high=1.5", "plateau_factor=1.5"]),
        ({"batch_size": {"low": 16.5, "high": 64}}, ["params.batch_size.low", "must be an integer"]),
        ({"lr": {"low": "abc", "high": 1}}, ["params.lr.low", "not a number"]),
        ({"lr": {"lo": 1e-4, "high": 1e-2}}, ["params.lr", "unknown key 'lo'"]),
        ({"lr": [1e-4, 1e-2]}, ["params.lr", "expected a mapping"]),
        ({"optimizer": {"low": 1, "high": 2}}, ["params.optimizer", "give choices"]),
        ({"optimizer": {"choices": ["adam", "nadam"]}}, ["params.optimizer", "'nadam'"]),
        ({"batch_size": {"choices": [64, "big"]}}, ["params.batch_size", "choice 'big'"]),
        ({"dropout.2": {"low": 0.1, "high": 0.5}}, ["params.dropout.2", "dropout.0 .. dropout.1"]),
        ({"widths.5": {"low": 8, "high": 16}}, ["params.widths.5", "widths.0 .. widths.2"]),
        ({"lr.0": {"low": 0.1, "high": 0.5}}, ["params.lr.0", "lr is not a list"]),
        ({"seed": {"low": 0, "high": 9}}, ["params.seed", "cannot be tuned"]),
        # Optuna shrank such a range with only a warning: to [1, 1] here, every trial at lr=1
        ({"lr": {"low": 1, "high": 25, "step": 100}}, ["params.lr", "step=100 does not divide", "[1, 1]"]),
        ({"batch_size": {"low": 16, "high": 64, "step": 20}}, ["params.batch_size", "or high=56"]),
        ({"val_fraction": {"low": 0.1, "high": 0.3}}, ["params.val_fraction", "draws the validation split"]),
        ({"dropout": {"choices": [[0.1, 0.2]]}, "dropout.0": {"low": 0.1, "high": 0.2}}, ["dropout both"]),
    ],
)
def test_space_errors_name_the_key(tmp_path, params, expected):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"params": params}))
    with pytest.raises(ConfigError) as e:
        load_space(path, TINY_RECIPE)
    for text in expected:
        assert text in str(e.value)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"parms": {}}, "unknown key 'parms'"),
        ({"recipe": "reference"}, "needs `params:`"),
        ({"metric": "test_accuracy", "params": {"lr": {"low": 1e-4, "high": 1e-2}}}, "metric='test_accuracy'"),
        ({"trial": {"epoch": 3}, "params": {"lr": {"low": 1e-4, "high": 1e-2}}}, "unknown recipe key 'epoch'"),
        ({"trial": {"dataset": "x"}, "params": {"lr": {"low": 1e-4, "high": 1e-2}}}, "trial.dataset"),
    ],
)
def test_space_file_structure_errors(body, expected):
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        space_from_dict(body, TINY_RECIPE, "s.yaml")


def test_an_element_of_a_list_the_recipe_leaves_empty_is_named_as_such():
    with pytest.raises(ConfigError, match=r"params.dropout.0: recipe 'fast' has no dropout \(an empty list\)"):
        space_from_dict({"params": {"dropout.0": {"low": 0.1, "high": 0.5}}}, get_recipe("fast"), "s.yaml")


def test_a_space_that_is_not_yaml_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("params:\n  lr: {low: 1, high: 2\n")
    with pytest.raises(ConfigError) as e:
        load_space(path, TINY_RECIPE)
    assert "not valid YAML (line 3: expected ',' or '}'" in str(e.value) and "\n" not in str(e.value)


def test_space_values_apply_to_the_recipe():
    space = space_from_dict(
        {
            "params": {
                "dropout.1": {"low": 0.1, "high": 0.5},
                "widths": {"choices": [[8, 16, 16], [16, 32, 32]]},
                "plateau_patience": {"low": 1, "high": 3},
                "lr": {"low": "1e-4", "high": "1e-2", "log": True},  # PyYAML reads 1e-4 (no dot) as a string
            }
        },
        TINY_RECIPE,
    )
    widths = next(p for p in space.params if p.name == "widths")
    assert widths.choices == ("8,16,16", "16,32,32")  # Optuna's categorical values are scalars
    r = space.apply(TINY_RECIPE, {"dropout.1": 0.25, "widths": "16,32,32", "plateau_patience": 2, "lr": 3e-3})
    assert r.dropout == (TINY_RECIPE.dropout[0], 0.25) and r.widths == (16, 32, 32)
    assert r.plateau_patience == 2 and r.lr == 3e-3


def test_missing_optuna_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    with pytest.raises(UserError, match=r"pip install 'cifarlab\[tune\]'"):
        require_optuna()


def test_cli_reports_a_bad_space_before_any_work(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("params:\n  lr: {low: 1.0e-2, high: 1.0e-3}\n")
    rc = cli.main(["tune", "--recipe", "reference", "--space", str(bad), "--runs-dir", str(tmp_path / "runs")])
    assert rc == 2
    assert "params.lr: low=0.01 must be smaller than high=0.001" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# -- a tiny study --------------------------------------------------------------------------------------------


@pytest.mark.long
def test_tiny_study_writes_trials_report_and_a_best_config_that_trains(folder, tmp_path, one_core, capsys):
    runs = tmp_path / "runs"
    args = [
        "tune",
        *TINY_ARGS,
        "--set",
        f"dataset={folder}",
        "--trial-set",
        "epochs=2",
        "--n-trials",
        "3",
        "--startup-trials",
        "2",
        "--final-seeds",
        "0",
        "--runs-dir",
        str(runs),
    ]
    assert cli.main(args) == 0
    # TINY_ARGS' batch_size=16 is drawn from the space in every trial: said, not silently ignored
    assert "warning: --set batch_size=16: 'batch_size' is drawn from the search space" in capsys.readouterr().err
    out = runs / "tune" / "reference"
    rows = _read_csv(out / "trials.csv")
    assert [r["number"] for r in rows] == ["0", "1", "2"]
    assert {r["state"] for r in rows} <= {"complete", "pruned"}
    assert {"lr", "dropout.0", "dropout.1", "l2", "batch_size", "epochs", "seconds", "value"} <= set(rows[0])
    assert all(int(r["epochs"]) <= 2 for r in rows)  # --trial-set epochs=2
    assert "| trial | state | val\\_accuracy | epochs | seconds |" in (out / "trials.md").read_text()

    # every trial is a run folder that trained and validated, and never saw the test set
    for r in rows:
        run_dir = out / r["run_dir"]
        assert _status(run_dir) == r["state"]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["test_accuracy"] is None and metrics["trial"] == int(r["number"])
        assert not (run_dir / "model.safetensors").exists() and not (run_dir / "report.html").exists()

    study = json.loads((out / "study.json").read_text())
    assert study["counts"]["complete"] + study["counts"]["pruned"] == 3 and study["metric"] == "val_accuracy"
    best = study["best"]
    assert best["value"] == max(float(r["value"]) for r in rows if r["state"] == "complete")
    for name in ("history", "curves", "slices_1"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    html = (out / "report.html").read_text()
    assert "Parameter importances" in html and "data:image/png;base64," in html
    if study["counts"]["complete"] >= 2:
        assert (out / "plots" / "importances.png").exists() and set(study["importances"]) <= set(best["params"])

    # best.yaml is a config `cifarlab train --config` accepts: the full recipe's epochs, the trial's values
    recipe = resolve_recipe(config_file=out / "best.yaml")
    assert recipe.name == "reference-tuned" and recipe.epochs == TINY_RECIPE.epochs
    assert recipe.lr == best["params"]["lr"] and recipe.dropout == (
        best["params"]["dropout.0"],
        best["params"]["dropout.1"],
    )
    assert recipe.widths == (8, 16, 16) and recipe.batch_size == best["params"]["batch_size"]
    capsys.readouterr()
    train = ["train", "--config", str(out / "best.yaml"), "--set", "epochs=1", "--runs-dir", str(tmp_path / "t")]
    assert cli.main([*train, "--no-report", "--quiet"]) == 0
    assert "test accuracy" in capsys.readouterr().out

    # the command run again resumes the finished study (no new trial); another recipe is another study
    assert cli.main([*args, "--no-report"]) == 0
    assert len(_read_csv(out / "trials.csv")) == 3
    assert cli.main([*args, "--set", "dense_width=16"]) == 2
    err = capsys.readouterr().err
    assert "was started with another recipe" in err and "dense_width: 32 -> 16" in err  # which setting, and how


class PruneOddTrials(optuna.pruners.BasePruner):
    """Prunes every odd-numbered trial at its first report."""

    def prune(self, study, trial) -> bool:
        return trial.number % 2 == 1


def test_pruned_trials_stop_cleanly_and_only_the_best_full_run_sees_the_test_set(folder, tmp_path, one_core):
    recipe = TINY_RECIPE.replace(dataset=str(folder), epochs=3, early_stopping_patience=0)
    space = space_from_dict({"params": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}}, recipe)
    out = tmp_path / "study"
    settings = TuneSettings(
        recipe=recipe, space=space, study_name="prune", out_dir=out, n_trials=2, final_seeds=1, report=False
    )
    result = tune(settings, pruner=PruneOddTrials(), say=lambda s: None)
    assert result.counts == {"complete": 1, "pruned": 1, "failed": 0, "running": 0, "waiting": 0}
    rows = _read_csv(out / "trials.csv")
    assert [r["state"] for r in rows] == ["complete", "pruned"] and "pruned after epoch 1" in rows[1]["note"]
    pruned = out / rows[1]["run_dir"]
    assert _status(pruned) == "pruned"  # not crashed, not diverged
    history = json.loads((pruned / "history.json").read_text())
    assert len(history) == 1 and "pruned" in history[0]["events"]  # the loop stopped cleanly after epoch 1 of 3
    assert len(json.loads((out / rows[0]["run_dir"] / "history.json").read_text())) == 3
    # trials never evaluate on the test set; the best trial's full run does, once
    for r in rows:
        assert json.loads((out / r["run_dir"] / "metrics.json").read_text())["test_accuracy"] is None
    (final,) = result.final_runs
    assert final["trial"] == 0 and final["status"] == "finished" and final["test_accuracy"] is not None
    metrics = json.loads((Path(final["run_dir"]) / "metrics.json").read_text())
    assert metrics["test_accuracy"] == final["test_accuracy"] and metrics["recipe"] == "reference-tuned"
    assert json.loads((out / "study.json").read_text())["final_mean_test_accuracy"] == final["test_accuracy"]


class _CtrlCInFinalRun(Callback):
    """Ctrl-C in epoch 2 of the study's final run (its recipe is named `<base>-tuned`), the first time only."""

    fired = False

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1 and self.trainer.recipe.name.endswith("-tuned") and not _CtrlCInFinalRun.fired:
            _CtrlCInFinalRun.fired = True
            raise KeyboardInterrupt


def _final_run_study(folder, out: Path, name: str) -> TuneSettings:
    """One trial and one final run, of 3 epochs, with the Ctrl-C callback registered as qa_ctrl_c_final."""
    recipe = TINY_RECIPE.replace(
        dataset=str(folder), epochs=3, early_stopping_patience=0, callbacks=("qa_ctrl_c_final",)
    )
    space = space_from_dict({"params": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}}, recipe)
    return TuneSettings(
        recipe=recipe, space=space, study_name=name, out_dir=out, n_trials=1, final_seeds=1, report=False
    )


def test_ctrl_c_in_the_final_run_exits_130_and_the_same_command_resumes_it(folder, tmp_path, one_core):
    """It exited 0 after the final run stopped, as if the study had finished, and a second run of the command
    started the final run again beside the stopped one (QA)."""
    from cifarlab.registry import CALLBACKS

    CALLBACKS.register("qa_ctrl_c_final", replace=True)(lambda recipe: _CtrlCInFinalRun())
    try:
        out = tmp_path / "study"
        settings = _final_run_study(folder, out, "final")
        said: list[str] = []
        with pytest.raises(Interrupted):  # the CLI's 130, without its bare "interrupted" line
            tune(settings, say=said.append)
        # One way on, not two: the final run names the tune command, not `cifarlab train --resume`
        resume_lines = [s for s in said if s.startswith("resume with:")]
        again = "the same `cifarlab tune` command (study 'final' goes on with its final run)"
        assert resume_lines == [f"resume with: {again}"]
        (stopped,) = (out / "final").iterdir()
        assert _status(stopped) == "stopped"
        result = tune(settings, say=said.append)
        (final,) = result.final_runs
        assert final["status"] == "finished" and Path(final["run_dir"]) == stopped  # continued, not started anew
        assert [p.name for p in (out / "final").iterdir()] == [stopped.name]
        assert len(json.loads((stopped / "history.json").read_text())) == 3
    finally:
        CALLBACKS.unregister("qa_ctrl_c_final")


def test_a_final_run_whose_process_was_killed_is_resumed_not_started_again(folder, tmp_path, one_core):
    """SIGKILL (or an OOM kill) in a final run: study.json never recorded it, and the same command started a second
    final run from epoch 1 beside it (QA). The folder itself tells: the final recipe, a checkpoint, a dead process."""
    from cifarlab.registry import CALLBACKS

    _CtrlCInFinalRun.fired = False
    CALLBACKS.register("qa_ctrl_c_final", replace=True)(lambda recipe: _CtrlCInFinalRun())
    try:
        out = tmp_path / "study"
        settings = _final_run_study(folder, out, "killed")
        with pytest.raises(KeyboardInterrupt):
            tune(settings, say=lambda s: None)
        (final,) = (out / "final").iterdir()
        # As a SIGKILL leaves it: status "running" of a process that is gone, and no record in study.json
        (final / "status.json").write_text(json.dumps({"status": "running", "pid": 2**22 + 12345, "time": 0}))
        study = json.loads((out / "study.json").read_text())
        study["final_runs"] = []
        (out / "study.json").write_text(json.dumps(study))
        said: list[str] = []
        result = tune(settings, say=said.append)
        (done,) = result.final_runs
        assert done["status"] == "finished" and Path(done["run_dir"]) == final  # continued, not started anew
        assert [p.name for p in (out / "final").iterdir()] == [final.name]
        assert any(f"resuming {final}" in s for s in said)
    finally:
        CALLBACKS.unregister("qa_ctrl_c_final")


class _CtrlCInFirstTrial(Callback):
    fired = False

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1 and "-trial" in self.trainer.recipe.name and not _CtrlCInFirstTrial.fired:
            _CtrlCInFirstTrial.fired = True
            raise KeyboardInterrupt


def test_a_trial_cut_short_by_ctrl_c_is_not_called_failed_on_resume(folder, tmp_path, one_core):
    """The resumed study said "1 failed" for the trial a Ctrl-C or SIGTERM interrupted, which is queued again
    (QA round 3)."""
    from cifarlab.registry import CALLBACKS

    CALLBACKS.register("qa_ctrl_c_trial", replace=True)(lambda recipe: _CtrlCInFirstTrial())
    try:
        recipe = TINY_RECIPE.replace(dataset=str(folder), epochs=2, callbacks=("qa_ctrl_c_trial",))
        space = space_from_dict({"params": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}}, recipe)
        settings = TuneSettings(
            recipe=recipe, space=space, study_name="cut", out_dir=tmp_path / "study", n_trials=1, final_seeds=0,
            report=False,
        )  # fmt: skip
        with pytest.raises(KeyboardInterrupt):
            tune(settings, say=lambda s: None)
        said: list[str] = []
        tune(settings, say=said.append)
        (line,) = [s for s in said if s.startswith("resuming:")]
        assert "0 failed, 1 interrupted (queued again)" in line
    finally:
        CALLBACKS.unregister("qa_ctrl_c_trial")


# -- two workers, killed and resumed ---------------------------------------------------------------------------


def _claim(url: str, trial_id: int, state: str, barrier, results) -> None:
    from cifarlab.tune import open_storage

    storage = open_storage(url)
    storage.get_study_id_from_name("race")  # connected before the race starts
    barrier.wait()
    try:
        results.put(storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState[state]))
    except optuna.exceptions.UpdateFinishedTrialError:
        results.put("finished")


@pytest.mark.parametrize("state", ["RUNNING", "FAIL"])
def test_only_one_worker_claims_a_waiting_trial_or_fails_a_stale_one_on_sqlite(tmp_path, state):
    """Four processes change the same trial's state at once, three times: exactly one succeeds each time. SQLite has
    no row locks, so without cifarlab's file lock two to four of them 'won' (each then ran the re-queued trial)."""
    import multiprocessing

    from cifarlab.tune import open_storage

    ctx = multiprocessing.get_context("fork")
    for race in range(3):
        url = f"sqlite:///{tmp_path / f'race{race}.db'}"
        study = optuna.create_study(storage=open_storage(url), study_name="race")
        study.enqueue_trial({"x": 1.0})
        trial_id = study.get_trials(deepcopy=False)[0]._trial_id
        if state == "FAIL":  # a RUNNING trial whose worker died: every live worker may try to fail it
            study._storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.RUNNING)
        barrier, results = ctx.Barrier(4), ctx.Queue()
        procs = [ctx.Process(target=_claim, args=(url, trial_id, state, barrier, results)) for _ in range(4)]
        for p in procs:
            p.start()
        outcomes = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        assert outcomes.count(True) == 1, outcomes
        assert study.get_trials(deepcopy=False)[0].state.name == state


@pytest.mark.long
def test_two_workers_killed_mid_study_resume_without_losing_or_repeating_a_trial(folder, tmp_path):
    recipe = TINY_RECIPE.replace(dataset=str(folder), epochs=3, early_stopping_patience=0)
    space = space_from_dict(
        {"params": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "dropout.0": {"low": 0.1, "high": 0.5}}}, recipe
    )
    out = tmp_path / "study"
    settings = TuneSettings(
        recipe=recipe,
        space=space,
        study_name="killed",
        out_dir=out,
        n_trials=5,
        workers=2,
        pruner="none",
        startup_trials=2,
        final_seeds=0,
        report=False,
    )
    study = open_study(settings)
    procs = start_workers(settings)
    killed: dict[int, int] = {}  # worker pid -> the trial it was running
    try:
        deadline = time.monotonic() + 120
        while len(killed) < len(procs):
            assert time.monotonic() < deadline, "the workers did not get going"
            trials = study.get_trials(deepcopy=False)
            if sum(t.state.name == "COMPLETE" for t in trials) < 1:
                time.sleep(0.05)
                continue
            assert all(p.poll() is None for p in procs if p.pid not in killed), "a worker ended by itself"
            for t in trials:
                w = t.user_attrs.get("worker")
                # kill each worker while its trial trains, with epochs still to go (an epoch takes a fraction of a
                # second): the trial's run folder exists and it has reported at most one epoch
                started = t.state.name == "RUNNING" and "run_dir" in t.user_attrs and len(t.intermediate_values) <= 1
                if started and w and w["pid"] not in killed:
                    os.kill(w["pid"], signal.SIGKILL)
                    killed[w["pid"]] = t.number
            time.sleep(0.02)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    before = {t.number: t for t in study.get_trials(deepcopy=False)}
    assert all(before[n].state.name == "RUNNING" for n in killed.values())
    assert all(_status(out / before[n].user_attrs["run_dir"]) == "running" for n in killed.values())

    log: list[str] = []
    # The same study again, resumed by one worker in this process (two processes claiming at once is
    # test_only_one_worker_claims_a_waiting_trial_or_fails_a_stale_one_on_sqlite's).
    result = tune(dataclasses.replace(settings, workers=1), say=log.append)

    trials = study.get_trials(deepcopy=False)
    assert [t.number for t in trials] == list(range(len(trials)))  # every number once
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and "WAITING" not in states
    assert states.count("COMPLETE") + states.count("PRUNED") == settings.n_trials  # the budget, no overshoot
    by_number = {t.number: t for t in trials}
    retries = {t.user_attrs["retry_of"]: t for t in trials if "retry_of" in t.user_attrs}
    for n in killed.values():
        t = by_number[n]
        assert t.state.name == "FAIL" and t.user_attrs["fail_reason"].startswith("killed")
        assert any(f"trial {n} was RUNNING when its worker died: marked FAILED, re-queued as trial" in s for s in log)
        retry = retries[n]  # re-queued once, with the same parameters, and run to the end
        assert retry.state.name in ("COMPLETE", "PRUNED") and retry.params == t.params
        assert _status(out / t.user_attrs["run_dir"]) == "killed"
    assert set(retries) == set(killed.values())  # nothing else was run again
    for t in trials:
        if t.state.name == "FAIL" and t.number not in killed.values():
            assert t.user_attrs["fail_reason"].startswith("surplus")  # a worker that raced past the budget
    # one run folder per trial that started, none shared, none left behind
    run_dirs = [t.user_attrs["run_dir"] for t in trials if "run_dir" in t.user_attrs]
    assert len(set(run_dirs)) == len(run_dirs) == len(list((out / "trials").iterdir()))
    assert len(_read_csv(out / "trials.csv")) == len(trials)
    assert result.counts["complete"] + result.counts["pruned"] == settings.n_trials


def test_a_resumed_study_draws_new_points_not_the_seeds_first_ones(tmp_path):
    """Running the command again (or after Ctrl-C) reopens the study: its sampler is reseeded past the trials the
    study holds, so the new trials are not copies of the first ones (they were, point for point)."""
    recipe = TINY_RECIPE.replace(epochs=1)
    space = space_from_dict({"params": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}}, recipe)
    settings = TuneSettings(recipe=recipe, space=space, study_name="again", out_dir=tmp_path, n_trials=3, report=False)

    def objective(trial):
        return trial.suggest_float("lr", 1e-4, 1e-1, log=True)

    first = open_study(settings)
    first.optimize(objective, n_trials=3)
    again = open_study(settings)
    again.optimize(objective, n_trials=3)
    lrs = [t.params["lr"] for t in again.get_trials()]
    assert len(lrs) == 6 and not set(lrs[:3]) & set(lrs[3:])
    fresh = open_study(TuneSettings(**{**vars(settings), "study_name": "fresh"}))  # a new study: the seed's points
    fresh.optimize(objective, n_trials=3)
    assert [t.params["lr"] for t in fresh.get_trials()] == lrs[:3]


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"workers": 10_000}, "--workers=10000 on a machine with"),
        ({"storage": "sqlite:///"}, "in-memory SQLite database cannot be shared"),
        ({"storage": "sqlite:///:memory:"}, "in-memory SQLite database cannot be shared"),
        ({"timeout": 0.0}, "must be a number of seconds > 0"),
        ({"timeout": float("nan")}, "must be a number of seconds > 0"),  # behaved as no timeout
        ({"timeout": float("inf")}, "leave it out for none"),
    ],
)
def test_settings_that_cannot_work_are_refused(tmp_path, change, needle):
    recipe = TINY_RECIPE.replace(epochs=1)
    space = space_from_dict({"params": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}}, recipe)
    with pytest.raises(ConfigError, match=needle):
        TuneSettings(recipe=recipe, space=space, study_name="x", out_dir=tmp_path, **change)


def test_a_split_that_holds_out_a_whole_class_is_refused_before_the_study(tmp_path):
    """Every trial would fail alike (5 failed trials, then 'run the command again', which could not help): the
    split is checked once, with the data, before the study or its folder exists; no val_fraction=0 advice."""
    import numpy as np

    from cifarlab.data import from_arrays
    from cifarlab.errors import DataError

    y = np.array([0] * 40 + [1] * 40 + [2])
    x = np.zeros((len(y), 8, 8, 3), np.uint8) + (y * 80)[:, None, None, None].astype(np.uint8)
    ds = from_arrays(x, y, x[:6], y[:6], classes=["red", "green", "blue"])
    recipe = TINY_RECIPE.replace(epochs=1, val_fraction=0.5)
    held = next(s for s in range(50) if 80 not in recipe_split_train(recipe.replace(seed=s), y))
    space = space_from_dict({"params": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}}, recipe)
    settings = TuneSettings(
        recipe=recipe.replace(seed=held), space=space, study_name="s", out_dir=tmp_path / "study", n_trials=2
    )
    with pytest.raises(DataError, match="holds out every training image of class blue") as info:
        tune(settings, dataset=ds, say=lambda s: None)
    assert "val_fraction=0" not in str(info.value)
    assert not (tmp_path / "study").exists()


def recipe_split_train(recipe, y):
    import torch

    from cifarlab.data import recipe_split

    return recipe_split(recipe, torch.as_tensor(y))[0].tolist()


def test_an_empty_validation_split_and_a_storage_that_cannot_open_leave_no_study(tmp_path):
    """val_fraction=0.01 of 6 images rounds to none: 5 trials failed alike before; a storage that cannot be opened
    left an empty study folder (QA)."""
    import numpy as np

    from cifarlab.data import from_arrays

    y = np.array([0, 1, 2] * 2)
    x = np.zeros((len(y), 8, 8, 3), np.uint8) + (y * 80)[:, None, None, None].astype(np.uint8)
    ds = from_arrays(x, y, x, y, classes=["red", "green", "blue"])
    recipe = TINY_RECIPE.replace(epochs=1, val_fraction=0.01)
    space = space_from_dict({"params": {"lr": {"low": 1e-4, "high": 1e-1, "log": True}}}, recipe)
    out = tmp_path / "runs" / "tune" / "s"
    settings = TuneSettings(recipe=recipe, space=space, study_name="s", out_dir=out, n_trials=1)
    with pytest.raises(ConfigError, match=r"val_fraction=0.01 of 6 training images is an empty validation split"):
        tune(settings, dataset=ds, say=lambda s: None)
    assert not out.exists()
    bad = TuneSettings(
        recipe=recipe.replace(val_fraction=0.5, stratified_split=True), space=space, study_name="s", out_dir=out,
        n_trials=1,
        storage="postgresql://u:pw@127.0.0.1:1/db",  # no driver here, or (with one) no server: refused either way
    )  # fmt: skip
    with pytest.raises(UserError, match="--storage"):
        tune(bad, dataset=ds, say=lambda s: None)
    assert not out.exists() and not out.parent.exists()


@pytest.mark.parametrize("name", BUILTIN_RECIPES)
def test_every_registered_builtin_recipe_has_a_default_space_its_trials_can_train(name, tmp_path):
    # `cifarlab tune --recipe NAME` with no --space: the shipped space loads against the recipe, its trials hold out
    # a validation split, and every corner of the space is a valid recipe (nothing trains here).
    recipe = get_recipe(name)
    space = load_space(None, recipe)
    assert space.recipe == name and space.metric == "val_accuracy"
    settings = TuneSettings(recipe=recipe, space=space, study_name=name, out_dir=tmp_path)
    trial = settings.trial_recipe()
    assert trial.val_fraction > 0
    for end in (0, -1):
        values = {}
        for p in space.params:
            if p.kind == "categorical":
                values[p.name] = p.choices[end]
            else:
                v = p.low if end == 0 else p.high
                values[p.name] = int(v) if p.kind == "int" else v
        tuned = space.apply(trial, values)
        assert tuned.model == recipe.model
        assert settings.final_recipe(values).val_fraction == recipe.val_fraction


def test_a_space_tuning_a_size_key_the_model_ignores_is_refused():
    with pytest.raises(ConfigError, match=r"params\.widths\.0: model preact_resnet18 does not use widths"):
        space_from_dict({"params": {"widths.0": {"low": 32, "high": 128}}}, get_recipe("resnet18"))
    with pytest.raises(ConfigError, match=r"params\.depth: model airnet does not use depth"):
        space_from_dict({"params": {"depth": {"choices": [16, 22]}}}, get_recipe("fast"))
    space_from_dict({"params": {"width_factor": {"low": 0.5, "high": 2.0}}}, get_recipe("resnet18"))


def test_local_workers_read_their_spec_file_and_it_is_gone_when_they_are(tmp_path, monkeypatch):
    from cifarlab import tune as tune_module

    started = []

    class FakeWorker:  # a worker process that read its spec and ended at once
        def __init__(self, argv):
            self.pid = 4000 + len(started)
            self.read = json.loads(Path(argv[3]).read_text())
            started.append(self)

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(tune_module.subprocess, "Popen", FakeWorker)
    space = space_from_dict({"params": {"lr": {"low": 1e-3, "high": 1e-2, "log": True}}}, TINY_RECIPE)
    settings = TuneSettings(recipe=TINY_RECIPE, space=space, study_name="w", out_dir=tmp_path, workers=2)
    log: list[str] = []
    assert tune_module.run_workers(settings, log.append) == 0
    assert len(started) == 2 and all(w.read["study_name"] == "w" for w in started)
    assert log == ["started 2 worker processes: 4000, 4001"]
    assert not (tmp_path / "tune-worker.json").exists()  # transient: not left in the study's folder
