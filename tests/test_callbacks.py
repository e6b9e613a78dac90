"""Keras 3 semantics of EarlyStopping / ReduceLROnPlateau, driven by scripted val_loss sequences.

The fake trainer's weights are one tensor whose value is the index of the epoch that produced them,
so a restored value names the restored epoch. Epochs are 0-based throughout, like Keras' hooks.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from cifarlab.train.callbacks import Callback, CallbackList, EarlyStopping, ReduceLROnPlateau


class FakeTrainer:
    def __init__(self, lr: float = 1e-3) -> None:
        self.lr = lr
        self.stop_training = False
        self.w = torch.tensor(-1.0)

    def get_lr(self) -> float:
        return self.lr

    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {"w": self.w.detach().clone()}

    def set_weights(self, state: dict[str, torch.Tensor]) -> None:
        self.w = state["w"].clone()


def fit(callbacks, values, *, trainer=None, start_epoch=0, monitor="val_loss", begin=True, end=True):
    """Keras-like fit loop over scripted monitor values; returns (history, trainer, callback list)."""
    trainer = trainer or FakeTrainer()
    cbl = callbacks if isinstance(callbacks, CallbackList) else CallbackList(callbacks)
    cbl.set_trainer(trainer)
    if begin:
        cbl.on_train_begin()
    history = []
    for epoch in range(start_epoch, len(values)):
        cbl.on_epoch_begin(epoch)
        trained_lr = trainer.lr
        trainer.w = torch.tensor(float(epoch))  # "training" this epoch produced weights == epoch
        logs = {monitor: values[epoch]}
        cbl.on_epoch_end(epoch, logs)
        history.append({"epoch": epoch, "lr": trained_lr, "events": logs.get("events", []), "logs": logs})
        if trainer.stop_training:
            break
    if end:
        cbl.on_train_end()
    return history, trainer, cbl


def epochs_with(history, event):
    return [h["epoch"] for h in history if event in h["events"]]


# ----------------------------------------------------------------------------- ReduceLROnPlateau


def test_lr_drops_after_patience_and_by_factor():
    rl = ReduceLROnPlateau(factor=0.5, patience=2)
    # e0 best, e1 best, e2 wait 1, e3 wait 2 -> cut, e4 wait 1, e5 wait 2 -> cut
    hist, tr, _ = fit([rl], [1.0, 0.9, 0.95, 0.96, 0.97, 0.98])
    assert epochs_with(hist, "lr_reduced") == [3, 5]
    assert [h["lr"] for h in hist] == pytest.approx([1e-3] * 4 + [5e-4] * 2)
    # logs["learning_rate"] is the LR the epoch trained with, written before the cut (as Keras does)
    assert [h["logs"]["learning_rate"] for h in hist] == [h["lr"] for h in hist]
    assert tr.lr == pytest.approx(2.5e-4)


def test_lr_repeated_drops_every_epoch_with_patience_1():
    rl = ReduceLROnPlateau(factor=0.1, patience=1)
    hist, tr, _ = fit([rl], [1.0, 1.0, 1.0, 1.0])
    assert epochs_with(hist, "lr_reduced") == [1, 2, 3]
    assert tr.lr == pytest.approx(1e-6)


def test_cooldown_counts_down_before_the_check():
    # cooldown=2 only skips ONE epoch: the counter is decremented at the start of the epoch and the
    # in_cooldown() test comes after it (Keras quirk). Without cooldown every epoch would cut.
    hist, _, _ = fit([ReduceLROnPlateau(factor=0.5, patience=1, cooldown=2)], [1.0] + [1.1] * 8)
    assert epochs_with(hist, "lr_reduced") == [1, 3, 5, 7]
    hist, _, _ = fit([ReduceLROnPlateau(factor=0.5, patience=1, cooldown=0)], [1.0] + [1.1] * 4)
    assert epochs_with(hist, "lr_reduced") == [1, 2, 3, 4]


def test_improvement_during_cooldown_updates_best():
    rl = ReduceLROnPlateau(factor=0.5, patience=1, cooldown=3)
    # e1 cut (cooldown 3); e2 improves to 0.5 inside cooldown -> best=0.5; e3 still cooling (1 left);
    # e4: counter -> 0, 0.6 does not beat 0.5 -> wait 1 -> cut.
    hist, _, _ = fit([rl], [1.0, 1.1, 0.5, 0.6, 0.6])
    assert epochs_with(hist, "lr_reduced") == [1, 4]
    assert rl.best == 0.5


def test_min_lr_floor_and_float32_comparison():
    rl = ReduceLROnPlateau(factor=0.1, patience=1, min_lr=2e-5)
    hist, tr, _ = fit([rl], [1.0, 1.0, 1.0, 1.0, 1.0])
    # 1e-3 -> 1e-4 -> max(1e-5, 2e-5) = 2e-5 -> at the floor: no further cut, no event
    assert epochs_with(hist, "lr_reduced") == [1, 2]
    assert tr.lr == 2e-5
    assert rl.wait == 2  # wait keeps counting at the floor, as in Keras

    # An LR above min_lr in float64 but equal in float32 is "at the floor" for Keras (float32 LR).
    lr = 1e-4 * (1 + 1e-9)
    assert lr > 1e-4 and np.float32(lr) == np.float32(1e-4)
    rl = ReduceLROnPlateau(factor=0.5, patience=1, min_lr=1e-4)
    hist, tr, _ = fit([rl], [1.0, 1.0, 1.0], trainer=FakeTrainer(lr=lr))
    assert epochs_with(hist, "lr_reduced") == []
    assert tr.lr == lr


def test_min_delta_1e4_boundary():
    # Keras: improvement iff current < best - min_delta (strict). An improvement of exactly 1e-4
    # (as computed in float64) does not count, 2e-4 does.
    best = 1.0
    at_boundary = best - 1e-4
    hist, _, _ = fit([ReduceLROnPlateau(factor=0.5, patience=2)], [best, at_boundary, at_boundary])
    assert epochs_with(hist, "lr_reduced") == [2]
    hist, _, _ = fit([ReduceLROnPlateau(factor=0.5, patience=2)], [1.0, 1.0 - 2e-4, 1.0 - 4e-4])
    assert epochs_with(hist, "lr_reduced") == []
    # ...while EarlyStopping (min_delta 0) counts the sub-1e-4 step as a new best
    es = EarlyStopping(patience=3)
    hist, _, _ = fit([es], [1.0, 1.0 - 5e-5])
    assert epochs_with(hist, "best") == [0, 1]


def test_reduce_lr_mode_resolution():
    # auto -> max only when "acc" is in the name ...
    hist, _, _ = fit(
        [ReduceLROnPlateau(monitor="val_accuracy", factor=0.5, patience=1)],
        [0.5, 0.6, 0.7, 0.65],
        monitor="val_accuracy",
    )
    assert epochs_with(hist, "lr_reduced") == [3]
    # ... so an "up" metric without "acc" in its name is minimized (Keras' own rule)
    hist, _, _ = fit([ReduceLROnPlateau(monitor="val_auc", factor=0.5, patience=1)], [0.5, 0.6, 0.7], monitor="val_auc")
    assert epochs_with(hist, "lr_reduced") == [1, 2]
    with pytest.warns(UserWarning, match="unknown"):
        rl = ReduceLROnPlateau(mode="sideways")
    assert rl.mode == "auto"
    with pytest.raises(ValueError, match="factor"):
        ReduceLROnPlateau(factor=1.0)


def test_reduce_lr_missing_monitor_warns_and_does_nothing():
    rl = ReduceLROnPlateau(factor=0.5, patience=1)
    rl.set_trainer(tr := FakeTrainer())
    rl.on_train_begin()
    logs = {"loss": 1.0}
    with pytest.warns(UserWarning, match="not available"):
        for epoch in range(3):
            rl.on_epoch_end(epoch, logs)
    assert tr.lr == 1e-3 and "events" not in logs
    assert logs["learning_rate"] == 1e-3


# ----------------------------------------------------------------------------- EarlyStopping


def test_early_stopping_patience_3_exact_sequence():
    es = EarlyStopping(patience=3, restore_best_weights=True)
    # e0 best (wait 0), e1 best, e2 0.95 wait 1, e3 0.92 wait 2, e4 0.91 wait 3 >= 3 -> stop at e4
    hist, tr, _ = fit([es], [1.0, 0.9, 0.95, 0.92, 0.91, 0.5, 0.4])
    assert len(hist) == 5 and tr.stop_training
    assert epochs_with(hist, "early_stop") == [4] and es.stopped_epoch == 4
    assert epochs_with(hist, "best") == [0, 1]
    assert es.best == 0.9 and es.best_epoch == 1
    assert es.restored_epoch == 1 and tr.w.item() == 1.0


def test_early_stopping_never_stops_at_epoch_0():
    es = EarlyStopping(patience=0)
    # e0: NaN is no improvement, wait=1 >= 0, but the `epoch > 0` guard holds; e1 stops.
    hist, _, _ = fit([es], [math.nan, math.nan, math.nan])
    assert epochs_with(hist, "early_stop") == [1]
    es = EarlyStopping(patience=0)
    hist, _, _ = fit([es], [1.0, 1.0])  # equal is not better: stop at e1
    assert epochs_with(hist, "early_stop") == [1]


def test_restores_best_when_training_runs_to_the_end():
    es = EarlyStopping(patience=3, restore_best_weights=True)
    hist, tr, _ = fit([es], [1.0, 0.8, 0.7, 0.75, 0.72])
    assert not tr.stop_training and es.stopped_epoch == 0
    assert es.restored_epoch == 2 and tr.w.item() == 2.0


def test_no_restore_without_flag():
    es = EarlyStopping(patience=1)
    _, tr, _ = fit([es], [1.0, 0.8, 0.9, 0.9])  # stops at e2 and keeps e2's weights
    assert es.stopped_epoch == 2 and es.restored_epoch is None and es.best_weights is None
    assert tr.w.item() == 2.0


def test_first_epoch_snapshot_when_nothing_improves():
    es = EarlyStopping(patience=5, restore_best_weights=True)
    hist, tr, _ = fit([es], [math.nan] * 3)
    assert epochs_with(hist, "best") == [] and es.best == math.inf
    assert es.restored_epoch == 0 and tr.w.item() == 0.0
    # with a warm-up the snapshot is the first *monitored* epoch
    es = EarlyStopping(patience=5, restore_best_weights=True, start_from_epoch=2)
    _, tr, _ = fit([es], [math.nan] * 4)
    assert es.restored_epoch == 2 and tr.w.item() == 2.0


def test_start_from_epoch_ignores_warmup():
    es = EarlyStopping(patience=2, start_from_epoch=3)
    hist, _, _ = fit([es], [5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 3.8])
    # e0-e2 ignored; e3 first monitored -> best 3.5; e4 wait 1; e5 wait 2 -> stop
    assert epochs_with(hist, "best") == [3]
    assert epochs_with(hist, "early_stop") == [5] and es.best_epoch == 3


def test_baseline_keeps_wait_running_until_beaten():
    es = EarlyStopping(patience=2, baseline=0.5)
    # Improvements over `best` that miss the baseline do not reset wait, but an improvement returns
    # before the stop check: e0..e2 improve (wait 1, 2, 3), e3 does not -> wait 4 -> stop at e3.
    hist, _, _ = fit([es], [1.0, 0.9, 0.8, 0.85, 0.1])
    assert epochs_with(hist, "best") == [0, 1, 2]
    assert epochs_with(hist, "early_stop") == [3]
    # beating the baseline resets wait as usual
    es = EarlyStopping(patience=2, baseline=0.5)
    hist, _, _ = fit([es], [1.0, 0.4, 0.45, 0.45, 0.45])
    assert epochs_with(hist, "early_stop") == [3]


def test_mode_and_min_delta_sign():
    es = EarlyStopping(monitor="val_accuracy", min_delta=-0.01, patience=5)  # abs(); auto -> max for accuracy
    hist, _, _ = fit([es], [0.5, 0.505, 0.52], monitor="val_accuracy")
    assert epochs_with(hist, "best") == [0, 2]  # 0.505 - 0.01 > 0.5 is false
    es = EarlyStopping(min_delta=0.01, patience=5)  # min: current + 0.01 < best
    hist, _, _ = fit([es], [1.0, 0.995, 0.985])
    assert epochs_with(hist, "best") == [0, 2]
    es = EarlyStopping(monitor="val_loss", mode="max", patience=5)
    hist, _, _ = fit([es], [1.0, 2.0, 1.5])
    assert epochs_with(hist, "best") == [0, 1]
    with pytest.raises(ValueError, match="mode='max'"):
        EarlyStopping(monitor="val_mystery")
    with pytest.warns(UserWarning, match="unknown"):
        assert EarlyStopping(mode="sideways").mode == "auto"


def test_early_stopping_missing_monitor_warns_and_does_nothing():
    es = EarlyStopping(patience=0, restore_best_weights=True)
    with pytest.warns(UserWarning, match="not available"):
        hist, tr, _ = fit([es], [1.0, 1.0, 1.0], monitor="loss")
    assert not tr.stop_training and es.best_weights is None and es.restored_epoch is None
    assert all(h["events"] == [] for h in hist)


# ----------------------------------------------------------------------------- the pinned recipe

# A realistic val_loss curve, built so that Keras' rules reproduce the event pattern of the SPEC's
# Keras 3 run (LR halved after 1-based epochs 7, 10, 17; best epoch 15; stopped after 18 epochs).
# fmt: off
RECIPE_VAL_LOSS = [
    1.60, 1.20, 1.00, 0.90, 0.85,  # e0-e4: improving (each by > 1e-4)
    0.87, 0.86,                    # e5-e6: plateau
    0.78, 0.77995, 0.79,           # e7: new best; e8: better by only 5e-5; e9: worse
    0.72, 0.73, 0.70, 0.69, 0.68,  # e10-e14
    0.69, 0.685, 0.6801,           # e15-e17
]
# fmt: on
# Derivation, 0-based epochs. ES = EarlyStopping(patience=3, min_delta=0): wait += 1 every epoch,
# reset to 0 on `v < best`, stop when wait >= 3 and epoch > 0. RL = ReduceLROnPlateau(factor=0.5,
# patience=2, min_delta=1e-4, cooldown=0): reset wait on `v < best - 1e-4`, else wait += 1; cut the
# LR and zero wait at wait >= 2.
#  e0-e4  both: new best each epoch                              ES wait 0    RL wait 0
#  e5 0.87   ES wait 1                                           RL wait 1
#  e6 0.86   ES wait 2 (< 3, go on)                              RL wait 2 -> LR 1e-3 -> 5e-4
#  e7 0.78   both: best                                          ES 0         RL 0
#  e8 0.77995 ES: 0.77995 < 0.78 -> best, wait 0                 RL: not < 0.7799 -> wait 1
#  e9 0.79   ES wait 1                                           RL wait 2 -> LR 5e-4 -> 2.5e-4
#  e10 0.72  both best; e11 0.73 ES wait 1, RL wait 1; e12-e14 both best (e14 = 0.68 is ES best)
#  e15 0.69  ES wait 1                                           RL wait 1
#  e16 0.685 ES wait 2                                           RL wait 2 -> LR 2.5e-4 -> 1.25e-4
#  e17 0.6801 ES: not < 0.68 -> wait 3 >= 3 -> early_stop       RL wait 1 (no cut)
#  train end: restore the weights of e14.
RECIPE_EXPECTED = {
    "lr_reduced": [6, 9, 16],
    "early_stop": [17],
    "best": [0, 1, 2, 3, 4, 7, 8, 10, 12, 13, 14],
    "lr_trained": [1e-3] * 7 + [5e-4] * 3 + [2.5e-4] * 7 + [1.25e-4],
    "restored_epoch": 14,
}


def recipe_callbacks():
    return [EarlyStopping(patience=3, restore_best_weights=True), ReduceLROnPlateau(factor=0.5, patience=2)]


def check_recipe_run(hist, tr, es):
    assert [h["epoch"] for h in hist] == list(range(18))
    for event in ("lr_reduced", "early_stop", "best"):
        assert epochs_with(hist, event) == RECIPE_EXPECTED[event], event
    assert [h["lr"] for h in hist] == pytest.approx(RECIPE_EXPECTED["lr_trained"], rel=1e-12)
    assert [h["logs"]["learning_rate"] for h in hist] == [h["lr"] for h in hist]
    assert tr.lr == pytest.approx(1.25e-4) and tr.stop_training
    assert es.best_epoch == 14 and es.stopped_epoch == 17
    assert es.restored_epoch == RECIPE_EXPECTED["restored_epoch"] and tr.w.item() == 14.0
    # on the stop epoch both callbacks still run, in list order
    assert hist[16]["events"] == ["lr_reduced"] and hist[17]["events"] == ["early_stop"]


def test_pinned_recipe_on_realistic_sequence():
    cbs = recipe_callbacks()
    hist, tr, _ = fit(cbs, RECIPE_VAL_LOSS + [0.5, 0.4])  # later values must never be reached
    check_recipe_run(hist, tr, cbs[0])


@pytest.mark.parametrize("load_before_begin", [True, False])
def test_state_dict_round_trip_mid_sequence(load_before_begin):
    # Run to the end of e8, checkpoint (through torch.save / weights_only load, as runs.py does),
    # then resume into fresh objects: every later decision must equal the uninterrupted run's.
    cbs = recipe_callbacks()
    hist_a, tr_a, cbl_a = fit(cbs, RECIPE_VAL_LOSS[:9], end=False)
    buf = io.BytesIO()
    torch.save({"callbacks": cbl_a.state_dict(), "lr": tr_a.lr, "w": tr_a.w}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    cbs_b = recipe_callbacks()
    cbl_b = CallbackList(cbs_b)
    tr_b = FakeTrainer(lr=ckpt["lr"])
    cbl_b.set_trainer(tr_b)
    if load_before_begin:
        cbl_b.load_state_dict(ckpt["callbacks"])
        cbl_b.on_train_begin()  # must not wipe the loaded state
    else:
        cbl_b.on_train_begin()
        cbl_b.load_state_dict(ckpt["callbacks"])
    hist_b, tr_b, _ = fit(cbl_b, RECIPE_VAL_LOSS, trainer=tr_b, start_epoch=9, begin=False)
    check_recipe_run(hist_a + hist_b, tr_b, cbs_b[0])
    # once training continued, reusing the callbacks for a new run resets them as usual
    cbl_b.on_train_begin()
    assert cbs_b[0].wait == 0 and cbs_b[0].best_weights is None and cbs_b[1].wait == 0


def test_resume_without_on_train_begin():
    # train.py's resume path skips on_train_begin: loading alone must be enough
    cbs = recipe_callbacks()
    hist_a, tr_a, cbl_a = fit(cbs, RECIPE_VAL_LOSS[:12], end=False)
    cbs_b = recipe_callbacks()
    cbl_b = CallbackList(cbs_b)
    cbl_b.load_state_dict(cbl_a.state_dict())
    tr_b = FakeTrainer(lr=tr_a.lr)
    hist_b, tr_b, _ = fit(cbl_b, RECIPE_VAL_LOSS, trainer=tr_b, start_epoch=12, begin=False)
    check_recipe_run(hist_a + hist_b, tr_b, cbs_b[0])


def test_callback_list_order_and_checks():
    calls = []

    class Rec(Callback):
        def __init__(self, name):
            self.name = name

        def on_epoch_end(self, epoch, logs=None):
            calls.append((self.name, epoch))

    cbl = CallbackList([Rec("a"), Rec("b")], trainer=FakeTrainer())
    cbl.on_epoch_end(0, {})
    assert calls == [("a", 0), ("b", 0)] and len(cbl) == 2
    # Saved state goes to the callback of the same class, whatever the order; a stateful callback that finds no
    # saved state (the run is resumed with other callbacks) is an error.
    saved = CallbackList(recipe_callbacks()).state_dict()
    CallbackList(recipe_callbacks()[::-1]).load_state_dict(saved)
    with pytest.raises(ValueError, match="no state for callback EarlyStopping"):
        CallbackList(recipe_callbacks()).load_state_dict({"callbacks": []})

    class Late(Rec):
        order = 100  # runs after the default-order callbacks, as the checkpoint does

    calls.clear()
    CallbackList([Late("z"), Rec("a")], trainer=FakeTrainer()).on_epoch_end(1, {})
    assert calls == [("a", 1), ("z", 1)]
