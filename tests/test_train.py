import json

import pytest
import torch
import torch.nn.functional as F

from _synth import make_dataset
from cifarlab.experiment import run_experiment
from cifarlab.inference import predict_logits, tta_views
from cifarlab.models import build_model
from cifarlab.recipes import get_recipe
from cifarlab.train import lr_multiplier

# bn_momentum 0.1: with ~50 steps, Keras momentum 0.99 would leave the running statistics near their init
TINY_REF = dict(widths=(8, 16, 16), dense_width=32, epochs=6, batch_size=32, precision="fp32", bn_momentum=0.1)
TINY_FAST = dict(widths=(8, 16, 16), epochs=4, batch_size=32, precision="fp32", ema_start_epochs=1)


@pytest.fixture(scope="module")
def synth():
    return make_dataset(n_train_per_class=80, n_test_per_class=20)


def test_reference_recipe_learns_end_to_end(tmp_path, synth):
    recipe = get_recipe("reference").replace(**TINY_REF)
    res = run_experiment(recipe, dataset=synth, runs_root=tmp_path, quiet=True, report=False)
    hist = json.loads((res.run_dir / "history.json").read_text())
    assert res.status == "finished"
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert res.metrics["test_accuracy"] > 0.6  # 4 classes: chance is 0.25
    for name in ("config.json", "history.csv", "history.json", "metrics.json", "model.safetensors"):
        assert (res.run_dir / name).exists(), name
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["dataset"]["n_train"] == 256 and cfg["dataset"]["n_val"] == 64
    assert cfg["recipe"]["epochs"] == 6


def test_fast_recipe_learns_end_to_end(tmp_path, synth):
    recipe = get_recipe("fast").replace(**TINY_FAST)
    res = run_experiment(recipe, dataset=synth, runs_root=tmp_path, quiet=True, report=False)
    hist = json.loads((res.run_dir / "history.json").read_text())
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[0]["val_loss"] is None  # trains on all training images, no validation split
    assert res.metrics["test_accuracy"] > 0.6


def test_progressive_resizing_trains_small_then_full_size(tmp_path, synth):
    from cifarlab.errors import UserError
    from cifarlab.train.callbacks import Callback

    class Sizes(Callback):  # the size of the first training batch of each epoch, as the model receives it
        def __init__(self) -> None:
            self.sizes: list[tuple[int, int]] = []
            self.first = False

        def on_train_begin(self, logs=None):
            self.trainer.model.register_forward_pre_hook(self._record)

        def on_epoch_begin(self, epoch, logs=None):
            self.first = True

        def _record(self, module, args):
            if module.training and self.first:
                self.sizes.append(tuple(args[0].shape[-2:]))
                self.first = False

    sizes = Sizes()
    recipe = get_recipe("fast").replace(**TINY_FAST, train_scales=(0.5, 0.75, 1.0))
    res = run_experiment(recipe, dataset=synth, runs_root=tmp_path, quiet=True, report=False, callbacks=[sizes])
    assert sizes.sizes == [(16, 16), (24, 24), (32, 32), (32, 32)]  # 4 epochs; the last scale holds
    assert res.metrics["test_accuracy"] > 0.35  # learned (chance: 0.25), evaluated at full size
    assert json.loads((res.run_dir / "config.json").read_text())["recipe"]["train_scales"] == [0.5, 0.75, 1.0]

    # a model that needs full-size inputs says so before anything is written
    bad = get_recipe("reference").replace(**TINY_REF, train_scales=(0.5, 1.0))
    with pytest.raises(UserError, match="cannot train on 16x16 images"):
        run_experiment(bad, dataset=synth, runs_root=tmp_path / "bad", quiet=True, report=False)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


@pytest.mark.parametrize(("bias_epochs", "trained_steps"), [(1.5, 15), (0.25, 3), (0.0, 0), (3.0, 30)])
def test_whitening_bias_trains_for_its_fraction_of_the_steps(tmp_path, synth, bias_epochs, trained_steps):
    """whiten_bias_epochs counts in steps: 1.5 trains the bias for epoch 1 and the first half of epoch 2."""
    from cifarlab.train.callbacks import Callback

    class BiasSteps(Callback):  # at each step: did the bias change?
        def __init__(self) -> None:
            self.changed: list[bool] = []

        def on_train_batch_begin(self, batch, logs=None):
            self.before = self.trainer.model.whiten.bias.detach().clone()

        def on_train_batch_end(self, batch, logs=None):
            self.changed.append(not torch.equal(self.before, self.trainer.model.whiten.bias.detach()))

    steps = BiasSteps()
    recipe = get_recipe("fast").replace(**{**TINY_FAST, "epochs": 3}, whiten_bias_epochs=bias_epochs)
    run_experiment(recipe, dataset=synth, runs_root=tmp_path, quiet=True, report=False, callbacks=[steps])
    assert len(steps.changed) == 30  # 3 epochs of 10 steps (320 images, batch 32); 0.25 epochs: steps 0, 1, 2
    assert steps.changed == [True] * trained_steps + [False] * (30 - trained_steps)


def test_tta_equals_average_of_explicit_views():
    torch.manual_seed(0)
    recipe = get_recipe("fast").replace(widths=(8, 16, 16))
    model = build_model(recipe).eval()
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    got = predict_logits(model, x, tta="flip_translate", precision="fp32", channels_last=False)
    xf = x.float() / 255
    padded = F.pad(xf, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[..., :32, :32], padded[..., 2:, 2:]
    with torch.no_grad():
        views = [xf, xf.flip(-1), up_left, up_left.flip(-1), down_right, down_right.flip(-1)]
        logits = [model(v) for v in views]
    expected = 0.25 * (logits[0] + logits[1]) + 0.125 * sum(logits[2:])
    assert torch.allclose(got, expected, atol=1e-5)
    assert sum(w for w, _ in tta_views(xf, "flip_translate")) == pytest.approx(1.0)
    flip_only = predict_logits(model, x, tta="flip", precision="fp32", channels_last=False)
    assert torch.allclose(flip_only, 0.5 * (logits[0] + logits[1]), atol=1e-5)


@pytest.mark.parametrize("name", ["reference", "fast"])
def test_bf16_path_close_to_fp32(name):
    torch.manual_seed(0)
    recipe = get_recipe(name).replace(widths=(8, 16, 16), dense_width=32)
    model = build_model(recipe).eval()
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    fp32 = predict_logits(model, x, precision="fp32", channels_last=False)
    bf16 = predict_logits(model, x, precision="bf16", channels_last=True)
    assert bf16.dtype == torch.float32
    scale = fp32.abs().max()
    assert (bf16 - fp32).abs().max() <= 0.05 * scale
    assert (bf16.argmax(1) == fp32.argmax(1)).float().mean() >= 0.8


def test_onecycle_schedule_shape():
    r = get_recipe("fast")
    total = 100
    m = [lr_multiplier(r, s, total) for s in range(total + 1)]
    peak = int(r.warmup_fraction * total)
    assert m[0] == pytest.approx(r.start_lr_fraction)
    assert m[peak] == pytest.approx(1.0)
    assert m[-1] == pytest.approx(r.final_lr_fraction)
    assert all(a <= b for a, b in zip(m[:peak], m[1 : peak + 1]))
    assert all(a >= b for a, b in zip(m[peak:], m[peak + 1 :]))


def test_progressive_resizing_resumes_at_the_size_of_its_epoch(tmp_path, synth):
    from safetensors.torch import load_file

    from _synth import determinism_restored
    from cifarlab.train.callbacks import Callback

    class InterruptAt(Callback):  # Ctrl-C at the start of epoch 2: the checkpoint after epoch 1 is kept
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    recipe = get_recipe("fast").replace(**{**TINY_FAST, "epochs": 3}, train_scales=(0.5, 0.75, 1.0))
    kw = dict(dataset=synth, quiet=True, report=False, deterministic=True)
    with determinism_restored():
        whole = run_experiment(recipe, runs_root=tmp_path / "a", **kw)
        cut = run_experiment(recipe, runs_root=tmp_path / "b", callbacks=[InterruptAt()], **kw)
        assert cut.status == "stopped"
        resumed = run_experiment(resume=cut.run_dir, **kw)
    assert resumed.status == "finished"
    wa, wb = load_file(whole.run_dir / "model.safetensors"), load_file(cut.run_dir / "model.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # epochs 2 and 3 ran at 0.75 and 1.0 after the resume too


def test_without_cudnn_timing_switches_it_off_for_a_gpu_only_and_restores_it():
    """The model checks' 2-image forwards and inference run without cuDNN's timing on a GPU (shapes that never or
    rarely come back); the training's setting is back afterwards, also after an error."""
    from cifarlab.device import without_cudnn_timing

    was = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = True
        with without_cudnn_timing(torch.device("cuda")):
            assert not torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.benchmark
        with without_cudnn_timing(torch.device("cpu")):
            assert torch.backends.cudnn.benchmark  # no cuDNN there: nothing to change
        with pytest.raises(RuntimeError), without_cudnn_timing(torch.device("cuda")):
            raise RuntimeError("a forward that fails")
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = was


def test_whitening_init_is_the_same_on_the_weights_device():
    """The eigendecomposition runs on the CPU wherever the images are (a GPU would load a solver library for it):
    the filters land on the conv's device and dtype, equal to an all-CPU init."""
    from cifarlab.models.airnet import init_whitening

    images = torch.randn(64, 3, 8, 8)
    a, b = torch.nn.Conv2d(3, 24, 2), torch.nn.Conv2d(3, 24, 2).double()
    init_whitening(a, images)
    init_whitening(b, images)
    assert b.weight.dtype == torch.float64 and torch.allclose(a.weight.double(), b.weight, atol=1e-6)
    assert not torch.equal(a.weight, torch.nn.Conv2d(3, 24, 2).weight)
