"""DropBlock: block geometry, the drop rate against the paper's gamma and the linear schedule, identity at
evaluation, the schedule callback (and its resume), the reference CNN's wiring, and training through the API
and the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import cifarlab
from _synth import TINY_ARGS, make_dataset
from cifarlab import cli
from cifarlab.experiment import run_experiment
from cifarlab.models import build_model
from cifarlab.models.dropblock import DropBlock2d, DropPath, dropblock_gamma
from cifarlab.recipes import get_recipe
from cifarlab.registry import CALLBACKS
from cifarlab.train import Callback, recipe_callbacks
from cifarlab.train.techniques import DropBlockSchedule


@pytest.fixture(autouse=True)
def _runs_keep_one_thread(one_thread, monkeypatch):
    """Runs set one thread per core; on 2 shared cores tiny models train several times faster on one."""
    monkeypatch.setattr("cifarlab.experiment.set_threads", lambda n=None: torch.get_num_threads())


def _opened(dropped: torch.Tensor, bh: int, bw: int) -> torch.Tensor:
    """Morphological opening with a bh x bw rectangle: the union of all such rectangles lying inside the map
    and inside `dropped`. A set equals its opening exactly when it is a union of whole in-map rectangles."""
    inside = 1 - F.max_pool2d(1 - dropped, (bh, bw), stride=1)  # anchors whose whole rectangle is dropped
    return F.max_pool2d(F.pad(inside, (bw - 1, bw - 1, bh - 1, bh - 1)), (bh, bw), stride=1)


def _dropped(module: DropBlock2d, shape: tuple[int, int, int, int]) -> torch.Tensor:
    return 1.0 - module.block_mask(shape)


def test_one_seed_drops_one_whole_square_inside_the_map(monkeypatch):
    m = DropBlock2d(block_size=3, drop_prob=0.1)
    for r, c in [(0, 0), (3, 5), (7, 7)]:  # top-left corner, interior, the last valid anchor of a 10x10 map

        def one_seed(*size, device=None, r=r, c=c):
            u = torch.ones(*size)
            u[..., r, c] = 0.0  # below any gamma: exactly one seed
            return u

        monkeypatch.setattr(torch, "rand", one_seed)
        dropped = _dropped(m, (1, 1, 10, 10))[0, 0]
        expected = torch.zeros(10, 10)
        expected[r : r + 3, c : c + 3] = 1
        assert torch.equal(dropped, expected), (r, c)


def test_random_masks_are_unions_of_whole_block_squares():
    torch.manual_seed(0)
    for size, shape in [(3, (8, 4, 12, 12)), (5, (8, 4, 16, 9)), (1, (4, 4, 6, 6))]:
        dropped = _dropped(DropBlock2d(size, 0.3), shape)
        assert 0 < dropped.mean() < 0.6
        # every dropped unit lies in a fully dropped size x size square that fits in the map
        assert torch.equal(_opened(dropped, size, size), dropped), size


def test_blocks_are_clipped_to_a_map_smaller_than_the_block():
    torch.manual_seed(1)
    dropped = _dropped(DropBlock2d(3, 0.3), (16, 8, 2, 8))  # 3x3 blocks on a 2-pixel-high map: 2x3 rectangles
    assert dropped.sum() > 0
    assert torch.equal(dropped[:, :, 0], dropped[:, :, 1])  # every block spans the whole (clipped) height
    assert torch.equal(_opened(dropped, 2, 3), dropped)
    # block 5 on a 2x2 map: one valid anchor and gamma = p, so a map is dropped whole or kept whole
    whole = _dropped(DropBlock2d(5, 0.4), (4000, 1, 2, 2)).flatten(1)
    assert set(whole.sum(1).tolist()) == {0.0, 4.0}
    assert abs(whole[:, 0].mean().item() - 0.4) < 0.03
    assert dropblock_gamma(0.4, 5, 2, 2) == pytest.approx(0.4)


def _exact_drop_rate(p: float, b: int, h: int, w: int) -> float:
    """The expected dropped share: a unit covered by k possible seeds is kept with probability (1 - gamma)^k."""
    g = dropblock_gamma(p, b, h, w)
    k = F.conv2d(F.pad(torch.ones(1, 1, h - b + 1, w - b + 1), (b - 1,) * 4), torch.ones(1, 1, b, b))
    return float((1 - (1 - g) ** k).mean())


def test_gamma_is_the_papers():
    assert dropblock_gamma(0.1, 3, 16, 16) == pytest.approx(0.1 / 9 * 256 / 196)
    assert dropblock_gamma(0.1, 7, 14, 14) == pytest.approx(0.1 / 49 * 196 / 64)
    assert dropblock_gamma(0.2, 1, 5, 5) == pytest.approx(0.2)  # block 1: plain dropout


def test_drop_rate_follows_the_schedule():
    """At 0%, 50% and 100% of the ramp the share of dropped units is 0, about half the target, the target."""
    target, total = 0.2, 100
    net = nn.Sequential(nn.Identity(), DropBlock2d(3, target)).train()
    cb = DropBlockSchedule(ramp=1.0)
    cb.set_trainer(SimpleNamespace(model=net, step=0, total_steps=total))
    x = torch.ones(64, 16, 16, 16)
    torch.manual_seed(0)
    for step in (0, 50, 100):
        cb.trainer.step = step
        cb.on_train_batch_begin(0)
        p = net[1].drop_prob
        assert p == pytest.approx(target * step / total)
        out = net(x)
        measured = float((out == 0).float().mean())
        if step == 0:
            assert torch.equal(out, x)
            continue
        # against the exact expectation of the paper's gamma (fixed seed; ~4 standard errors) ...
        assert measured == pytest.approx(_exact_drop_rate(p, 3, 16, 16), abs=0.006)
        # ... which is within 10% of the nominal rate: gamma makes the share match drop_prob
        assert measured == pytest.approx(p, rel=0.1)
        # kept units are rescaled so the total activation is unchanged
        assert float(out.sum()) == pytest.approx(x.numel(), rel=1e-5)


def test_identity_in_eval_mode_and_at_zero_without_random_draws():
    x = torch.randn(4, 8, 12, 12)
    m = DropBlock2d(3, 0.5).eval()
    assert m(x) is x
    m.train()
    m.drop_prob = 0.0  # the schedule's first step
    state = torch.get_rng_state()
    assert m(x) is x
    assert torch.equal(torch.get_rng_state(), state)
    assert DropPath(0.5).eval()(x) is x


def test_dropblock_keeps_dtype_and_channels_last():
    m = DropBlock2d(3, 0.3).train()
    x = torch.randn(4, 8, 12, 12).to(memory_format=torch.channels_last)
    out = m(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert m(x.bfloat16()).dtype == torch.bfloat16


def test_schedule_callback_ramp_registry_and_resume():
    net = nn.Sequential(DropBlock2d(3, 0.2), nn.Sequential(DropBlock2d(5, 0.1)))
    cb = DropBlockSchedule(ramp=0.5)
    cb.set_trainer(SimpleNamespace(model=net, step=25, total_steps=100))
    cb.on_train_batch_begin(0)
    assert [m.drop_prob for m in (net[0], net[1][0])] == pytest.approx([0.1, 0.05])  # each module its own target
    cb.trainer.step = 60  # past the ramp (half the run): the target
    cb.on_train_batch_begin(0)
    assert [m.drop_prob for m in (net[0], net[1][0])] == pytest.approx([0.2, 0.1])
    # Resume: a fresh callback at the checkpoint's step sets the same rate; there is no state to save.
    fresh = DropBlockSchedule(ramp=0.5)
    fresh.set_trainer(SimpleNamespace(model=net, step=25, total_steps=100))
    fresh.on_train_batch_begin(0)
    assert net[0].drop_prob == pytest.approx(0.1) and fresh.state_dict() == {}

    # The recipe switches it on with dropblock_prob > 0 and a ramp; by name it serves a model of your own.
    reference = get_recipe("reference")
    assert not any(isinstance(c, DropBlockSchedule) for c in recipe_callbacks(reference, True))
    on = [c for c in recipe_callbacks(reference.replace(dropblock_prob=0.1), True) if isinstance(c, DropBlockSchedule)]
    assert len(on) == 1 and on[0].ramp == 1.0
    constant = reference.replace(dropblock_prob=0.1, dropblock_schedule=0.0)
    assert not any(isinstance(c, DropBlockSchedule) for c in recipe_callbacks(constant, True))
    named = reference.replace(dropblock_prob=0.1, callbacks=("dropblock_schedule",))
    assert sum(isinstance(c, DropBlockSchedule) for c in recipe_callbacks(named, True)) == 1
    assert "dropblock_schedule" in CALLBACKS


def test_reference_cnn_gets_dropblock_only_when_asked():
    reference = get_recipe("reference")
    torch.manual_seed(0)
    plain = build_model(reference)
    assert not any(isinstance(m, DropBlock2d) for m in plain.modules())
    torch.manual_seed(0)
    dropping = build_model(reference.replace(dropblock_prob=0.1, dropblock_size=2))
    blocks = [m for m in dropping.modules() if isinstance(m, DropBlock2d)]
    assert [(b.block_size, b.target_prob) for b in blocks] == [(2, 0.1), (2, 0.1)]
    # after the pooling of stages 2 and 3 (8x8 and 4x4 maps), in the pools' slots: same keys, same weights
    assert [i for i, m in enumerate(dropping.features) if isinstance(m, nn.Sequential)] == [7, 11]
    a, b = plain.state_dict(), dropping.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    dropping.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(dropping(x), plain.eval()(x))


@pytest.mark.parametrize(
    ("recipe", "key", "value"),
    [
        ("fast", "dropblock_prob", 0.1),
        ("fast", "stochastic_depth", 0.1),
        ("fast", "dropout", (0.2,)),
        ("reference", "stochastic_depth", 0.1),
    ],
)
def test_a_regularizer_the_model_lacks_is_refused_not_ignored(recipe, key, value):
    """airnet has no dropout, DropBlock or residual blocks, reference_cnn no residual blocks: a value for them
    would train exactly as without it, so the recipe check refuses it and names the key and the way out."""
    from cifarlab.errors import ConfigError
    from cifarlab.recipes import validate

    r = get_recipe(recipe)
    validate(r)  # the built-in recipe itself leaves them off
    with pytest.raises(ConfigError, match=rf"{key}=.*model {r.model} has no .*set {key}="):
        validate(r.replace(**{key: value}))


class _ProbeRates(Callback):
    """Records the DropBlock rate each step trains with (runs after the recipe's callbacks)."""

    def __init__(self) -> None:
        self.rates: list[tuple[int, int, float]] = []

    def on_train_batch_begin(self, batch, logs=None):
        t = self.trainer
        (p,) = {m.drop_prob for m in t.model.modules() if isinstance(m, DropBlock2d)}
        self.rates.append((t.step, t.total_steps, p))


def test_reference_with_dropblock_trains_through_the_api(tmp_path):
    ds = make_dataset(16, 4, n_classes=4)
    probe = _ProbeRates()
    run = cifarlab.fit(
        "reference",
        data=(ds.x_train.numpy(), ds.y_train.numpy(), ds.x_test.numpy(), ds.y_test.numpy()),
        runs_dir=tmp_path,
        callbacks=[probe],
        report=False,
        widths=(8, 16, 16),
        dense_width=32,
        batch_size=16,
        epochs=2,
        precision="fp32",
        early_stopping_patience=0,
        dropblock_prob=0.15,
    )
    # 51 training images (80% of 64) at batch 16: 4 steps per epoch, 8 in all, the rate rising linearly
    assert [s for s, _, _ in probe.rates] == list(range(8))
    assert [p for _, _, p in probe.rates] == pytest.approx([0.15 * s / 8 for s in range(8)])
    assert json.loads((run.path / "config.json").read_text())["recipe"]["dropblock_prob"] == 0.15
    assert sum(isinstance(m, DropBlock2d) for m in run.get_model().modules()) == 2
    probs = run.predict(ds.x_test.numpy())  # evaluation: DropBlock is the identity, predictions repeat exactly
    assert torch.equal(probs, run.predict(ds.x_test.numpy()))


class _InterruptAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_dropblock_run_resumes_to_identical_weights(tmp_path):
    recipe = get_recipe("reference").replace(
        widths=(8, 16, 16), dense_width=32, epochs=3, batch_size=16, precision="fp32", early_stopping_patience=0
    )
    recipe = recipe.replace(dropblock_prob=0.2, dropblock_schedule=0.5)
    ds = make_dataset(12, 4)
    full = run_experiment(recipe, dataset=ds, runs_root=tmp_path / "a", quiet=True, report=False, device="cpu")
    cut = run_experiment(
        recipe,
        dataset=ds,
        runs_root=tmp_path / "b",
        quiet=True,
        report=False,
        callbacks=[_InterruptAt(1)],
        device="cpu",
    )
    assert full.status == "finished" and cut.status == "stopped"
    resumed = run_experiment(resume=cut.run_dir, dataset=ds, quiet=True, report=False, device="cpu")
    assert resumed.status == "finished"
    a, b = load_file(full.run_dir / "model.safetensors"), load_file(resumed.run_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_trains_reference_with_dropblock(tmp_path, tiny_cifar10):
    runs = tmp_path / "runs"
    argv = ["train", *TINY_ARGS, "--set", "dropblock_prob=0.1", "--set", "epochs=1", "--set", "val_fraction=0"]
    argv += ["--set", "early_stopping_patience=0", "--set", "schedule=onecycle"]
    argv += ["--data-dir", str(tiny_cifar10.data_dir), "--runs-dir", str(runs), "--no-report", "--quiet"]
    assert cli.main(argv) == 0
    (run,) = runs.iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"]["dropblock_prob"] == 0.1 and config["recipe"]["dropblock_size"] == 3
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    weights = load_file(run / "model.safetensors")
    assert all(np.isfinite(v.numpy()).all() for v in weights.values())
