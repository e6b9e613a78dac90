"""What the real training loop (`Trainer` through `run_experiment`) does with the LR, the weights, the history and the
run files: the Keras callbacks acting on a real optimizer and model, metrics.json's summary, the history numbers
recomputed by hand, and the weights a stopped or resumed run leaves.

Every run here trains the tiny reference CNN on 16 synthetic images (10 train, 6 validation) in a few batches of 4,
so the whole module takes a few seconds. Where a test needs a known sequence of validation losses, a callback
ordered before EarlyStopping/ReduceLROnPlateau (order -1; those run at order 0) overwrites `logs["val_loss"]`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from _synth import make_dataset
from cifarlab.errors import UserError
from cifarlab.experiment import run_experiment
from cifarlab.models import build_model
from cifarlab.recipes import get_recipe
from cifarlab.runs import load_checkpoint
from cifarlab.train import Callback
from test_callbacks import RECIPE_EXPECTED, RECIPE_VAL_LOSS

# 4 classes x 4 images; val_fraction 0.375 -> exactly 6 validation and 10 training images (batches of 4, 4, 2).
N_TRAIN, N_VAL = 10, 6
# The reference recipe, tiny: no dropout and no augmentation, so a training step's loss is a function of its
# weights and its images alone (BatchNorm in train mode uses the batch's statistics, which we recompute).
TINY = dict(
    widths=(4, 8, 8),
    dense_width=16,
    dropout=(),
    augment="none",
    batch_size=4,
    precision="fp32",
    val_fraction=0.375,
    bn_momentum=0.1,
)
RUN = dict(quiet=True, report=False, device="cpu")  # the hand computations here are on the CPU


@pytest.fixture(scope="module")
def ds():
    return make_dataset(n_train_per_class=4, n_test_per_class=2)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def _pixels(ds) -> torch.Tensor:
    """The dataset's training images as the model sees them with scaling='unit': x / 255."""
    return ds.x_train.float() / 255


def _which(batch: torch.Tensor, ds) -> torch.Tensor:
    """The indices into ds.x_train of a batch's rows (every synthetic image is unique), found by exact match."""
    dist = (_pixels(ds)[None] - batch.float()[:, None]).abs().flatten(2).amax(-1)
    best = dist.min(1)
    assert float(best.values.max()) == 0.0, "a batch row is not one of the dataset's images, unchanged"
    return best.indices


def _kernel_l2(state: dict[str, torch.Tensor]) -> float:
    """Keras' kernel_regularizer sum: the squares of the conv and dense kernels (the >= 2-D `weight`s); biases and
    BatchNorm parameters are not regularized."""
    return sum(float(v.double().pow(2).sum()) for k, v in state.items() if k.endswith("weight") and v.dim() >= 2)


class ScriptedValLoss(Callback):
    """Replaces each epoch's val_loss by `values[epoch]` before EarlyStopping/ReduceLROnPlateau read it (order -1),
    and keeps a copy of the weights at the end of each epoch (what EarlyStopping would snapshot then)."""

    order = -1

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.weights: dict[int, dict[str, torch.Tensor]] = {}
        self.lr_trained: list[list[float]] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.lr_trained.append([g["lr"] for g in self.trainer.optimizer.param_groups])

    def on_epoch_end(self, epoch, logs=None):
        logs["val_loss"] = self.values[epoch]
        self.weights[epoch] = _state(self.trainer.model)


class LrAfterEpoch(Callback):
    """Every param group's LR once the epoch's callbacks (ReduceLROnPlateau included) are done: after the history
    row (90), before the checkpoint (100)."""

    order = 97

    def __init__(self) -> None:
        self.base: list[float] = []
        self.after: list[list[float]] = []

    def on_train_begin(self, logs=None):
        self.base = [g["lr"] for g in self.trainer.optimizer.param_groups]

    def on_epoch_end(self, epoch, logs=None):
        self.after.append([g["lr"] for g in self.trainer.optimizer.param_groups])


class EvalInputs(Callback):
    """The images the first validation pass feeds the model (a forward pre-hook, eval mode only)."""

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []
        self._on = False

    def on_train_begin(self, logs=None):
        self.trainer.model.register_forward_pre_hook(self._record)

    def on_validation_begin(self, epoch, logs=None):
        self._on = epoch == 0

    def on_epoch_end(self, epoch, logs=None):
        self._on = False

    def _record(self, module, args):
        if self._on and not module.training:
            self.batches.append(args[0].detach().clone())


# ------------------------------------------------------------------ 1, 2: EarlyStopping + ReduceLROnPlateau, for real


@pytest.fixture(scope="module")
def plateau_run(tmp_path_factory, ds):
    """The tiny reference recipe (Adam, EarlyStopping(patience 3, restore best), ReduceLROnPlateau(0.5, patience
    2)) driven by test_callbacks' hand-derived RECIPE_VAL_LOSS. It is fine-tuned from a 3-class weights file with
    pretrained_lr_scale=0.1, so the optimizer has two param groups: the loaded weights at 1e-4, the new 4-class
    head at 1e-3."""
    tmp = tmp_path_factory.mktemp("plateau")
    recipe = get_recipe("reference").replace(**TINY, epochs=25, pretrained_lr_scale=0.1)
    torch.manual_seed(1)
    source = tmp / "source.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(recipe, 3, (3, 32, 32)).state_dict().items()}, source)
    # values after the 18th must never be read: training stops after epoch 18
    script = ScriptedValLoss(RECIPE_VAL_LOSS + [0.1] * 7)
    lrs, val = LrAfterEpoch(), EvalInputs()
    res = run_experiment(recipe, dataset=ds, runs_root=tmp, init=source, callbacks=[script, lrs, val], **RUN)
    return res, script, lrs, val


def test_real_trainer_lowers_every_groups_lr_and_restores_the_best_weights(plateau_run):
    """ReduceLROnPlateau halves every param group's LR in the real optimizer (the pretrained group keeps its 0.1x
    ratio) after exactly the epochs the script implies, EarlyStopping stops after epoch 18, and the saved
    model.safetensors is the model as it was at the end of the best epoch (15), not the last one; history.json
    records the cuts (new_lr), the stop and the restore."""
    res, script, lrs, _ = plateau_run
    assert res.status == "finished"
    run = res.run_dir
    hist = json.loads((run / "history.json").read_text())
    assert len(hist) == 18 and len(lrs.after) == 18

    # LR: base (pretrained 1e-3 * 0.1, head 1e-3), halved after 0-based epochs 6, 9 and 16
    assert lrs.base == pytest.approx([1e-4, 1e-3], rel=1e-12)
    cuts = RECIPE_EXPECTED["lr_reduced"]
    for e in range(18):
        halvings = sum(c <= e for c in cuts)
        assert lrs.after[e] == pytest.approx([1e-4 * 0.5**halvings, 1e-3 * 0.5**halvings], rel=1e-12), e
        trained = sum(c < e for c in cuts)  # the LR epoch e trained with: the cuts before it
        assert script.lr_trained[e] == pytest.approx([1e-4 * 0.5**trained, 1e-3 * 0.5**trained], rel=1e-12), e
    assert [h["lr"] for h in hist] == pytest.approx(RECIPE_EXPECTED["lr_trained"], rel=1e-12)  # the head's LR
    assert [h["epoch"] - 1 for h in hist if "lr_reduced" in h["events"]] == cuts
    for c in cuts:  # the row of a cut says the LR the next epoch trains with
        assert hist[c]["new_lr"] == pytest.approx(lrs.after[c][-1], rel=1e-12)
    assert all("new_lr" not in h for i, h in enumerate(hist) if i not in cuts)

    # weights: those at the end of 0-based epoch 14 (val_loss 0.68, the last strict improvement)
    best, last = script.weights[14], script.weights[17]
    assert _differs(best, last)  # else restoring could not be told from not restoring
    _assert_same_weights(load_file(run / "model.safetensors"), best)
    _assert_same_weights(load_checkpoint(run / "checkpoint.pt")["model"], last)  # written before the restore
    assert [h["epoch"] - 1 for h in hist if "best" in h["events"]] == RECIPE_EXPECTED["best"]
    assert hist[17]["events"] == ["early_stop", "restored_best"]
    assert hist[16]["events"] == ["lr_reduced"]
    assert [h["val_loss"] for h in hist] == RECIPE_VAL_LOSS  # the history shows the values the callbacks saw


def test_metrics_summary_matches_the_controlled_history(plateau_run, ds):
    """metrics.json's summary of the same run: best_epoch 15 (1-based), best_val_loss the scripted 0.68,
    best_val_accuracy the accuracy of the best epoch's weights on the 6 validation images (recomputed here),
    train_accuracy the last epoch's, LR drops after 1-based epochs 7, 10, 17, and the stop/restore epochs."""
    res, script, _, val = plateau_run
    metrics = json.loads((res.run_dir / "metrics.json").read_text())
    hist = json.loads((res.run_dir / "history.json").read_text())
    assert metrics["epochs_run"] == 18
    assert metrics["best_epoch"] == 15
    assert metrics["stopped_epoch"] == 18
    assert metrics["restored_epoch"] == 15
    assert metrics["lr_drops_after_epochs"] == [7, 10, 17]
    assert metrics["best_val_loss"] == 0.68
    assert metrics["train_accuracy"] == hist[17]["accuracy"]

    # best_val_accuracy, independently: the best epoch's weights in eval mode on the validation images
    idx = _which(torch.cat(val.batches), ds)
    assert len(set(idx.tolist())) == N_VAL
    model = build_model(get_recipe("reference").replace(**TINY), 4, (3, 32, 32))
    model.load_state_dict(script.weights[14])
    model.eval()
    with torch.no_grad():
        acc = (model(_pixels(ds)[idx]).argmax(1) == ds.y_train[idx]).double().mean().item()
    assert metrics["best_val_accuracy"] == pytest.approx(acc, abs=1e-9)
    assert hist[14]["val_accuracy"] == pytest.approx(acc, abs=1e-9)


# ------------------------------------------------------------------ 3: the history numbers, recomputed


class StepRecorder(Callback):
    """Each training step's input batch and the weights it ran with (a forward pre-hook, train mode only)."""

    def __init__(self) -> None:
        self.steps: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []

    def on_train_begin(self, logs=None):
        self.trainer.model.register_forward_pre_hook(self._record)

    def _record(self, module, args):
        if module.training:
            self.steps.append((args[0].detach().clone(), _state(module)))


def test_history_row_recomputed_by_hand(tmp_path, ds):
    """history[0] of a real one-epoch run equals what we compute from the weights each step used:

    - loss: the epoch's mean over its 10 images of (cross-entropy with label smoothing + l2 * sum of squared
      kernels), each step's value weighted by its batch size (4, 4, 2: drop_last is off), in train mode as the
      loop computes it before the step's update (BatchNorm on the batch's statistics);
    - accuracy: the share of those 10 images that step's logits got right;
    - val_loss: the mean cross-entropy (smoothed too) over the 6 validation images in eval mode, in batches of 4
      and 2, plus the L2 term of the final weights (Keras adds the regularization penalty to val_loss);
    - lr: the mean of the three steps' LRs under the onecycle schedule.
    """
    l2, smoothing, lr = 0.01, 0.1, 1e-3
    recipe = get_recipe("reference").replace(
        **TINY,
        epochs=1,
        lr=lr,
        l2=l2,
        label_smoothing=smoothing,
        eval_batch_size=4,
        schedule="onecycle",
        warmup_fraction=0.5,
        start_lr_fraction=0.2,
        final_lr_fraction=0.0,
        early_stopping_patience=0,
    )
    rec = StepRecorder()
    res = run_experiment(recipe, dataset=ds, runs_root=tmp_path, callbacks=[rec], **RUN)
    row = json.loads((res.run_dir / "history.json").read_text())[0]

    assert [len(x) for x, _ in rec.steps] == [4, 4, 2]
    model = build_model(recipe, 4, (3, 32, 32))
    seen: list[int] = []
    step_losses, n_correct = [], 0
    for x, state in rec.steps:
        idx = _which(x, ds)
        seen += idx.tolist()
        model.load_state_dict(state)
        model.train()
        with torch.no_grad():
            logits = model(_pixels(ds)[idx]).double()
        y = ds.y_train[idx]
        ce = F.cross_entropy(logits, y, label_smoothing=smoothing)
        step_losses.append((float(ce) + l2 * _kernel_l2(state), len(idx)))
        n_correct += int((logits.argmax(1) == y).sum())
    assert len(set(seen)) == N_TRAIN  # each training image once
    expected_loss = sum(v * n for v, n in step_losses) / N_TRAIN
    unweighted = sum(v for v, _ in step_losses) / 3
    assert abs(unweighted - expected_loss) > 1e-4  # the batch weighting is visible in this data
    assert row["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert row["accuracy"] == pytest.approx(n_correct / N_TRAIN, abs=1e-12)

    # validation: the images the training steps never saw, with the final weights (no restore: ES is off)
    val_idx = torch.tensor(sorted(set(range(len(ds.y_train))) - set(seen)))
    assert len(val_idx) == N_VAL
    final = load_file(res.run_dir / "model.safetensors")
    model.load_state_dict(final)
    model.eval()
    with torch.no_grad():
        logits = model(_pixels(ds)[val_idx]).double()
    y = ds.y_train[val_idx]
    val_ce = float(F.cross_entropy(logits, y, label_smoothing=smoothing))
    assert row["val_loss"] == pytest.approx(val_ce + l2 * _kernel_l2(final), rel=1e-5)
    assert row["val_accuracy"] == pytest.approx(float((logits.argmax(1) == y).double().mean()), abs=1e-12)

    # onecycle over 3 steps: warmup over int(0.5 * 3) = 1 step from 0.2 * lr, the peak lr at step 1, then linear
    # decay towards 0 reached at step 3, so 0.5 * lr at step 2
    assert row["lr"] == pytest.approx(lr * (0.2 + 1.0 + 0.5) / 3, rel=1e-12)


# ------------------------------------------------------------------ 4: a stopped run stays stopped on resume


class InterruptAtTrainEnd(Callback):
    """Ctrl-C right after the early-stop epoch's checkpoint: in on_train_end, before EarlyStopping restores."""

    order = -1

    def on_train_end(self, logs=None):
        raise KeyboardInterrupt


def test_resume_after_early_stop_trains_no_more(tmp_path, ds):
    """EarlyStopping(patience 1) fires after epoch 3 (val_loss 1.0, 0.5, 0.6) and its checkpoint is written; the
    process is interrupted before the run finishes. The resumed run must not train again (the checkpoint's
    stop_training holds): 3 epochs run, the checkpoint untouched, and model.safetensors the best epoch's (2)."""
    recipe = get_recipe("reference").replace(**TINY, epochs=6, early_stopping_patience=1)
    script = ScriptedValLoss([1.0, 0.5, 0.6, 0.9, 0.9, 0.9])
    with pytest.raises(KeyboardInterrupt):
        run_experiment(recipe, dataset=ds, runs_root=tmp_path, callbacks=[script, InterruptAtTrainEnd()], **RUN)
    (run,) = tmp_path.iterdir()
    ckpt_bytes = (run / "checkpoint.pt").read_bytes()
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["epoch"] == 3 and ckpt["stop_training"] is True
    assert not (run / "model.safetensors").exists()

    resumed = run_experiment(resume=run, dataset=ds, callbacks=[ScriptedValLoss([1.0, 0.5, 0.6, 0.9, 0.9, 0.9])], **RUN)
    assert resumed.status == "finished"
    assert resumed.metrics["epochs_run"] == 3
    assert resumed.metrics["stopped_epoch"] == 3 and resumed.metrics["best_epoch"] == 2
    assert (run / "checkpoint.pt").read_bytes() == ckpt_bytes  # no epoch ran
    assert _differs(script.weights[1], script.weights[2])
    _assert_same_weights(load_file(run / "model.safetensors"), script.weights[1])
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]


# ------------------------------------------------------------------ 5: Ctrl-C keeps the weights


class CtrlC(Callback):
    """KeyboardInterrupt at the start of 0-based epoch 1, or after its first training step (mid-epoch)."""

    def __init__(self, mid_epoch: bool) -> None:
        self.mid_epoch = mid_epoch
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        if epoch == 1 and not self.mid_epoch:
            raise KeyboardInterrupt

    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 1 and self.mid_epoch:
            raise KeyboardInterrupt


@pytest.mark.parametrize("mid_epoch", [False, True], ids=["between-epochs", "mid-epoch"])
def test_ctrl_c_saves_the_checkpointed_weights(tmp_path, ds, mid_epoch):
    """A run stopped with Ctrl-C in its second epoch is 'stopped' and writes model.safetensors, equal to the
    checkpoint's model: the weights after the last whole epoch (1), which the history and the resume start from."""
    recipe = get_recipe("reference").replace(**TINY, epochs=3, early_stopping_patience=0)
    res = run_experiment(recipe, dataset=ds, runs_root=tmp_path, callbacks=[CtrlC(mid_epoch)], **RUN)
    assert res.status == "stopped"
    run = Path(res.run_dir)
    assert json.loads((run / "status.json").read_text())["status"] == "stopped"
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["epoch"] == 1
    assert (run / "model.safetensors").exists()
    _assert_same_weights(load_file(run / "model.safetensors"), ckpt["model"])


def test_ctrl_c_in_the_first_epoch_keeps_no_weights_and_offers_no_resume(tmp_path, ds, capsys):
    """Interrupted before any epoch ended: no checkpoint, so no weights file (it would match no epoch) and no
    resume hint that could only fail."""
    recipe = get_recipe("reference").replace(**TINY, epochs=3, early_stopping_patience=0)

    class CtrlCFirstStep(Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise KeyboardInterrupt

    res = run_experiment(
        recipe, dataset=ds, runs_root=tmp_path, callbacks=[CtrlCFirstStep()], **{**RUN, "quiet": False}
    )
    out = capsys.readouterr().out
    assert res.status == "stopped"
    assert not (Path(res.run_dir) / "model.safetensors").exists()
    assert "resume with" not in out and "nothing to resume" in out


def test_ctrl_c_during_the_test_evaluation_is_a_stopped_run_that_resumes(tmp_path, ds, monkeypatch):
    """Ctrl-C after the last epoch, while the test set is evaluated: the run is marked stopped (not left
    'running', which `cifarlab runs` would call crashed), and --resume then evaluates and finishes it."""
    import cifarlab.experiment

    recipe = get_recipe("reference").replace(**TINY, epochs=2, early_stopping_patience=0)
    real = cifarlab.experiment.predict_logits

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cifarlab.experiment, "predict_logits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(recipe, dataset=ds, runs_root=tmp_path, **RUN)
    (run,) = tmp_path.iterdir()
    assert json.loads((run / "status.json").read_text())["status"] == "stopped"
    monkeypatch.setattr(cifarlab.experiment, "predict_logits", real)
    resumed = run_experiment(resume=run, dataset=ds, **RUN)
    assert resumed.status == "finished" and resumed.metrics["epochs_run"] == 2
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


def test_resuming_a_finished_run_changes_nothing(tmp_path, ds, capsys):
    """--resume of a run that finished (a requeued job, a second click): it says so and leaves every file as it
    was, instead of evaluating again and adding a session to its wall time."""
    recipe = get_recipe("reference").replace(**TINY, epochs=1, early_stopping_patience=0)
    res = run_experiment(recipe, dataset=ds, runs_root=tmp_path, **RUN)
    run = Path(res.run_dir)
    before = {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()}
    again = run_experiment(resume=run, dataset=ds, report=False, device="cpu")
    assert again.status == "finished" and again.metrics == res.metrics
    assert "already finished" in capsys.readouterr().out
    assert {f.name: f.read_bytes() for f in run.iterdir() if f.is_file()} == before


def test_resuming_a_finished_run_whose_weights_are_lost_writes_them_again(tmp_path, ds):
    """model.safetensors deleted or overwritten after the run finished: --resume is the repair (it evaluates
    from the checkpoint again and writes the weights), not "nothing to do"."""
    recipe = get_recipe("reference").replace(**TINY, epochs=1, early_stopping_patience=0)
    res = run_experiment(recipe, dataset=ds, runs_root=tmp_path, **RUN)
    run = Path(res.run_dir)
    good = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(b"not a safetensors file")
    again = run_experiment(resume=run, dataset=ds, **RUN)
    assert again.status == "finished" and again.metrics["test_accuracy"] == res.metrics["test_accuracy"]
    assert (run / "model.safetensors").read_bytes() == good


# ------------------------------------------------------------------ a callback's stop_training


class StopAt(Callback):
    """Sets stop_training after global step `step` (0: in on_train_begin)."""

    def __init__(self, step: int) -> None:
        self.stop_step = step

    def on_train_begin(self, logs=None):
        if self.stop_step == 0:
            self.trainer.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        if self.trainer.step == self.stop_step:
            self.trainer.stop_training = True


def test_stop_training_mid_epoch_ends_after_the_batch_and_marks_the_cut_epoch(tmp_path, ds, caplog):
    """As Keras 3's fit: the loop ends after the batch that set it, the partial epoch is validated and recorded
    (on_epoch_end runs), and its row says it was cut short; a stop before any epoch warns that nothing trained."""
    recipe = get_recipe("reference").replace(**TINY, epochs=4, early_stopping_patience=0)
    res = run_experiment(recipe, dataset=ds, runs_root=tmp_path / "a", callbacks=[StopAt(4)], **RUN)  # 3 steps/epoch
    hist = json.loads((res.run_dir / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    assert "partial_epoch" not in hist[0]["events"] and "partial_epoch" in hist[1]["events"]
    steps = (res.run_dir / "steps.csv").read_text().splitlines()
    assert len(steps) == 1 + 4  # header, 3 steps of epoch 1, 1 of epoch 2
    with caplog.at_level("WARNING", logger="cifarlab"):
        none = run_experiment(recipe, dataset=ds, runs_root=tmp_path / "b", callbacks=[StopAt(0)], **RUN)
    assert none.metrics["epochs_run"] == 0
    assert "stop_training before the first epoch ended: the model was not trained" in caplog.text


class InterruptAfterEpoch(Callback):
    order = 101  # after the checkpoint of epoch 1

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise KeyboardInterrupt


@pytest.mark.parametrize("first_report", [False, True])
def test_resume_keeps_the_runs_report_choice(tmp_path, ds, first_report):
    """A run started with --no-report (report=False) and resumed without it still writes no report, and says how to
    write one; a run started with a report gets one after its resume."""
    recipe = get_recipe("reference").replace(**TINY, epochs=2)
    run_opts = {**RUN, "report": first_report}
    result = run_experiment(recipe, dataset=ds, runs_root=tmp_path, callbacks=[InterruptAfterEpoch()], **run_opts)
    assert result.status == "stopped"
    assert json.loads((result.run_dir / "config.json").read_text())["report"] is first_report
    said: list[str] = []
    resumed = run_experiment(
        resume=result.run_dir, dataset=ds, **{**RUN, "report": True, "quiet": False, "log": said.append}
    )
    assert resumed.status == "finished"
    assert (result.run_dir / "report.md").exists() is first_report
    no_report_lines = [s for s in said if s.startswith("no report at the end")]
    assert len(no_report_lines) == (0 if first_report else 1)
    if not first_report:
        assert f"cifarlab report {result.run_dir}" in no_report_lines[0]


def test_a_resume_refuses_an_edited_recipe_and_clears_killed_writes(tmp_path, ds):
    """config.json edited after a stop (early_stopping_patience 2 -> 0) was resumed without a word: the run went on
    without early stopping, its saved state dropped (QA). A temp file of a checkpoint write cut by SIGKILL stayed in
    the folder forever, a checkpoint's size each (QA)."""
    recipe = get_recipe("reference").replace(**TINY, epochs=3, early_stopping_patience=2)
    result = run_experiment(recipe, dataset=ds, runs_root=tmp_path, callbacks=[InterruptAfterEpoch()], **RUN)
    run = result.run_dir
    config_path = run / "config.json"
    original = config_path.read_text()
    edited = json.loads(original)
    edited["recipe"]["early_stopping_patience"] = 0
    config_path.write_text(json.dumps(edited))
    status_before = (run / "status.json").read_text()
    with pytest.raises(UserError, match=r"recipe is not the one its checkpoint trained with: early_stopping_patience"):
        run_experiment(resume=run, dataset=ds, **RUN)
    assert (run / "status.json").read_text() == status_before  # refused before anything was written

    config_path.write_text(original)
    killed = run / ".checkpoint.pt.k1ll3d.tmp"
    killed.write_bytes(b"half a checkpoint")
    other = run / ".report.html.x.tmp"  # not the training's: left alone
    other.write_bytes(b"")
    assert run_experiment(resume=run, dataset=ds, **RUN).status == "finished"
    assert not killed.exists() and other.exists()


def test_a_run_without_a_checkpoint_says_how_to_start_it_again(tmp_path, ds):
    recipe = get_recipe("reference").replace(**TINY, epochs=2)
    result = run_experiment(recipe, dataset=ds, runs_root=tmp_path, callbacks=[InterruptAfterEpoch()], **RUN)
    (result.run_dir / "checkpoint.pt").unlink()
    with pytest.raises(UserError, match="nothing to resume; start the run again"):
        run_experiment(resume=result.run_dir, dataset=ds, **RUN)
