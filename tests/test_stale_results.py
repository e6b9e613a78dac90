"""Results computed from a run's weights (`evaluate`'s eval_*.json) and a run that then trains further: the model
card and the report must not show the earlier weights' numbers as the run's, and evaluate says when a run has not
finished (QA: a stopped run evaluated, resumed to 82%, kept its 58% eval_test.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _synth import make_dataset
from cifarlab import cli
from cifarlab.experiment import run_experiment
from cifarlab.recipes import get_recipe
from cifarlab.report.common import read_corruptions
from cifarlab.runs import load_run, stale_result, weights_sha256
from cifarlab.train import Callback

TINY = dict(widths=(4, 8, 8), dense_width=16, dropout=(), augment="none", batch_size=4, precision="fp32", epochs=3)


class StopAfterFirstEpoch(Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt


def test_results_of_earlier_weights_are_told_apart(tmp_path: Path, capsys) -> None:
    ds = make_dataset(n_train_per_class=4, n_test_per_class=2)
    recipe = get_recipe("reference").replace(**TINY, val_fraction=0.25, early_stopping_patience=0)
    stopped = run_experiment(
        recipe, dataset=ds, runs_root=tmp_path, callbacks=[StopAfterFirstEpoch()], quiet=True, report=False
    )
    run_dir = stopped.run_dir
    assert stopped.status == "stopped"
    # evaluate a stopped run: said, with the way on
    from cifarlab.evaluate import evaluate_run

    ev, _ = evaluate_run(run_dir, dataset=ds)
    capsys.readouterr()
    data = {**ev.to_dict(), "weights_sha256": weights_sha256(run_dir)}
    (run_dir / "eval_test.json").write_text(json.dumps(data))
    (run_dir / "eval_corruptions.json").write_text(
        json.dumps({"clean_accuracy": 0.5, "n": 8, "results": {"gaussian_noise": {"1": 0.25}}, **data})
    )
    assert not stale_result(run_dir, data, run_dir / "eval_test.json")
    assert "error" not in (read_corruptions(run_dir) or {"error": "absent"})
    cli.main(["evaluate", str(run_dir), "--json"])  # the run's own data is in memory only: the command may fail
    err = capsys.readouterr().err
    assert f"{run_dir.name} has not finished (stopped after 1 epoch)" in err
    assert f"cifarlab train --resume {run_dir} continues it" in err

    run_experiment(resume=run_dir, dataset=ds, quiet=True, report=False)  # trains epochs 2-3: new weights
    assert stale_result(run_dir, data, run_dir / "eval_test.json")
    assert "computed from earlier weights" in read_corruptions(run_dir)["error"]
    pytest.importorskip("fastapi")
    from cifarlab.serve import model_card

    card = model_card(load_run(run_dir), "m", "torch", "none")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert card["test_accuracy"] == pytest.approx(metrics["test_accuracy"])  # the finished run's, not epoch 1's
    # a file written before digests were recorded: stale when older than the weights
    legacy = {k: v for k, v in data.items() if k != "weights_sha256"}
    assert stale_result(run_dir, legacy, run_dir / "eval_test.json")
    from cifarlab.cli.evaluate import _save  # what `evaluate` writes records the weights it used

    assert _save(run_dir / "eval_test.json", ev.to_dict(), quiet=True) == 0
    saved = json.loads((run_dir / "eval_test.json").read_text())
    assert saved["weights_sha256"] == weights_sha256(run_dir) and not stale_result(run_dir, saved, "unused")
