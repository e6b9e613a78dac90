"""Fine-tuning (`--init`, `cifarlab.fit(init=...)`): what loads from a run folder, a safetensors file and a
.pt state dict; refusing pickles; a new head; input-channel adaptation; errors naming the layers; frozen
stages; LR param groups for pretrained weights; resume; the CLI and the report."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import cifarlab
from _runfolder import make_run, tiny_recipe
from _synth import make_dataset
from cifarlab import cli
from cifarlab.data import Dataset, from_arrays
from cifarlab.errors import ConfigError, UserError
from cifarlab.experiment import prepare, run_experiment
from cifarlab.finetune import apply_init, read_init_source
from cifarlab.models import build_model, init_whitening
from cifarlab.train import Callback
from cifarlab.train.optim import build_optimizer, mark_pretrained, pretrained_names
from test_idx import fake_arrays, write_fashion

REF = tiny_recipe("reference_cnn").replace(precision="fp32", batch_size=16, epochs=1)
AIR = tiny_recipe("airnet").replace(precision="fp32", batch_size=16, epochs=1)


def _grey(ds: Dataset, size: int = 32) -> Dataset:
    """The synthetic set as one grey channel of `size` px (a Fashion-MNIST stand-in)."""

    def g(x: torch.Tensor) -> torch.Tensor:
        grey = x.float().mean(1, keepdim=True)
        return torch.nn.functional.interpolate(grey, size=(size, size)).round().to(torch.uint8)

    return from_arrays(g(ds.x_train), ds.y_train, g(ds.x_test), ds.y_test, classes=ds.classes, name="grey")


@pytest.fixture(scope="module")
def synth() -> Dataset:
    return make_dataset(n_train_per_class=24, n_test_per_class=8)  # 4 classes, 3x32x32


@pytest.fixture
def ref_run(tmp_path) -> Path:
    return make_run(tmp_path / "src-ref", REF, classes=("class0", "class1", "class2", "class3"))


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


# -- sources ---------------------------------------------------------------------------------------------------


def test_init_from_a_run_folder_loads_every_layer(ref_run, synth):
    plan = prepare(REF, dataset=synth, init=ref_run, device="cpu")
    src, got = _weights(ref_run), plan.model.state_dict()
    assert all(torch.equal(got[k], src[k]) for k in src)
    assert plan.init is not None and not plan.init.new_head and not plan.init.adapted
    assert len(plan.init.loaded) == len(src) and plan.init.kind == "run folder"
    assert set(plan.init.pretrained) == {n for n, _ in plan.model.named_parameters()}


@pytest.mark.parametrize("kind", ["safetensors", "pt", "checkpoint"])
def test_init_from_weights_files(tmp_path, ref_run, synth, kind):
    src = _weights(ref_run)
    if kind == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(src, path)
    else:
        path = tmp_path / "w.pt"
        obj = {k: v.clone() for k, v in src.items()}
        if kind == "checkpoint":  # a cifarlab checkpoint.pt (or another trainer's), weights under "model"
            obj = {"model": {f"module.{k}": v for k, v in obj.items()}, "epoch": 3, "history": [{"loss": 1.0}]}
        torch.save(obj, path)
    plan = prepare(REF, dataset=synth, init=path, device="cpu")
    got = plan.model.state_dict()
    assert all(torch.equal(got[k], src[k]) for k in src)
    assert plan.init.kind == ("safetensors" if kind == "safetensors" else "state dict")
    assert plan.init.source_classes is None  # a bare file names no classes: the head loads when its shape fits


def _touch(path: Path) -> None:
    path.write_text("pwned")


class _Evil:
    """Unpickling this calls _touch(marker): any code, as far as a loader is concerned."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_a_pickle_with_arbitrary_objects_is_refused_not_run(tmp_path, ref_run):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({**_weights(ref_run), "payload": _Evil(marker)}, path)
    with pytest.raises(UserError, match="refusing to load .*evil.pt.*weights_only") as e:
        read_init_source(path)
    assert "asks to import test_finetune._touch" in str(e.value) and "weights_only=False" not in str(e.value)
    assert not marker.exists()
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        read_init_source(tmp_path / "junk.safetensors")
    with pytest.raises(UserError, match="no such run folder or weights file"):
        read_init_source(tmp_path / "nothing-here")


# -- what is loaded, adapted, made new ---------------------------------------------------------------------------


def test_new_head_when_the_classes_differ(tmp_path, synth):
    ten = make_run(tmp_path / "ten", REF)  # CIFAR-10 classes
    plan = prepare(REF, dataset=synth, init=ten, device="cpu")  # 4 classes
    assert plan.init.new_head == ["head.6.weight", "head.6.bias"]
    src, got = _weights(ten), plan.model.state_dict()
    assert got["head.6.weight"].shape == (4, 32)
    assert all(torch.equal(got[k], src[k]) for k in src if not k.startswith("head.6."))
    # Same number of classes but other names: a new head too (a run folder knows its classes).
    renamed = make_run(tmp_path / "renamed", REF, classes=("a", "b", "c", "d"))
    plan = prepare(REF, dataset=synth, init=renamed, device="cpu")
    assert plan.init.new_head == ["head.6.weight", "head.6.bias"]
    assert not torch.equal(plan.model.state_dict()["head.6.weight"], _weights(renamed)["head.6.weight"])
    assert any("new head head.6" in line and "differ" in line for line in plan.init.lines())


def test_rgb_to_grey_sums_the_first_conv_over_channels(ref_run, synth):
    grey = _grey(synth)
    plan = prepare(REF, dataset=grey, init=ref_run, device="cpu")
    src, got = _weights(ref_run), plan.model.state_dict()
    assert plan.init.adapted == ["features.0.weight"] and plan.init.channels == (3, 1)
    assert torch.allclose(got["features.0.weight"], src["features.0.weight"].sum(1, keepdim=True))
    # A grey image gives what the source gave for the same image as R = G = B (the layer's exact rule).
    x = torch.rand(2, 1, 32, 32)
    conv_src = nn.Conv2d(3, 8, 3, padding=1)
    conv_src.load_state_dict({"weight": src["features.0.weight"], "bias": src["features.0.bias"]})
    assert torch.allclose(plan.model.features[0](x), conv_src(x.expand(-1, 3, -1, -1)), atol=1e-5)
    assert any("adapted from 3 to 1 input channels by summing" in line for line in plan.init.lines())
    # 28x28: the dense layer after the flatten follows the image size, so it keeps its fresh init (reported).
    plan = prepare(REF, dataset=_grey(synth, 28), init=ref_run, device="cpu")
    assert plan.init.reinitialized == ["head.2.weight"] and plan.init.adapted == ["features.0.weight"]
    assert "head.2.bias" in plan.init.loaded


def test_airnet_grey_keeps_data_whitening_and_rgb_keeps_loaded_whitening(tmp_path, synth):
    src_run = make_run(tmp_path / "air", AIR, classes=synth.classes)
    src = _weights(src_run)
    # same channels: the loaded whitening is not overwritten
    plan = prepare(AIR, dataset=synth, init=src_run, device="cpu")
    assert torch.equal(plan.model.state_dict()["whiten.weight"], src["whiten.weight"])
    fresh = prepare(AIR, dataset=synth, device="cpu")
    assert not torch.equal(fresh.model.state_dict()["whiten.weight"], src["whiten.weight"])
    # 3 -> 1 channel: the whitening's width follows the channels, so it and the conv reading it stay fresh
    # (the whitening from the grey data); everything after them loads.
    plan = prepare(AIR, dataset=_grey(synth), init=src_run, device="cpu")
    assert set(plan.init.reinitialized) == {"whiten.weight", "whiten.bias", "groups.0.conv1.weight"}
    got = plan.model.state_dict()
    assert got["whiten.weight"].shape == (8, 1, 2, 2) and got["whiten.weight"].abs().sum() > 0
    assert all(torch.equal(got[k], src[k]) for k in src if k not in plan.init.reinitialized)


def test_airnet_with_the_source_whitening_width_transfers_exactly_to_grey(tmp_path, synth):
    """whiten_width=24 (the RGB source's) on grey images: the whitening is adapted by summing over channels and
    every other layer loads, so the grey model computes what the RGB model computes on R = G = B."""
    src_run = make_run(tmp_path / "air", AIR, classes=synth.classes)
    recipe = AIR.replace(whiten_width=24)
    plan = prepare(recipe, dataset=_grey(synth), init=src_run, device="cpu")
    assert plan.init.adapted == ["whiten.weight"] and not plan.init.reinitialized and not plan.init.new_head
    source = build_model(AIR, 4, (3, 32, 32))
    source.load_state_dict(_weights(src_run))
    x = torch.randn(3, 1, 32, 32)
    model = plan.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), source.eval()(x.expand(-1, 3, -1, -1)), atol=1e-4)


def test_a_wider_whitening_repeats_its_filters_and_trains_from_scratch(tmp_path, synth, one_thread):
    conv = nn.Conv2d(1, 24, 2)
    init_whitening(conv, torch.rand(16, 1, 12, 12))
    w = conv.weight.detach()
    assert torch.equal(w[:4], -w[4:8]) and torch.equal(w[:8], w[8:16]) and torch.equal(w[:8], w[16:])
    assert bool((w.flatten(1).norm(dim=1) > 0).all())  # no constant (zero-filter) channel for BatchNorm to blow up
    res = run_experiment(
        AIR.replace(whiten_width=24, epochs=2),
        dataset=_grey(synth),
        runs_root=tmp_path,
        quiet=True,
        report=False,
        device="cpu",
    )
    assert res.status == "finished" and np.isfinite(res.metrics["test_loss"])


def test_mismatch_errors_name_the_layers(tmp_path, synth):
    wide = make_run(tmp_path / "wide", REF.replace(widths=(16, 16, 16)), classes=synth.classes)
    with pytest.raises(UserError) as e:
        prepare(REF, dataset=synth, init=wide, device="cpu")
    msg = str(e.value)
    assert "features.0.weight is (16, 3, 3, 3), expected (8, 3, 3, 3)" in msg and "widths" in msg
    # What differs, by the source run's recorded recipe, and the --set that matches it (QA17 M3); no advice to
    # compare with `cifarlab model summary`, which cannot show a run or --set widths.
    assert "the source's reference_cnn has widths=16,16,16, this recipe's has widths=8,16,16" in msg
    assert "Add --set widths=16,16,16 to match the source" in msg and "model summary" not in msg
    # A bare weights file (no recipe recorded): the first differing layers, no model summary either.
    save_file(_weights(wide), tmp_path / "wide.safetensors")
    with pytest.raises(UserError, match=r"features.0.weight is \(16, 3, 3, 3\)") as e:
        prepare(REF, dataset=synth, init=tmp_path / "wide.safetensors", device="cpu")
    assert "model summary" not in str(e.value) and "model/widths" in str(e.value)
    # Another architecture altogether.
    air = make_run(tmp_path / "air", AIR, classes=synth.classes)
    with pytest.raises(
        UserError,
        match="the source trained model 'airnet', this recipe builds 'reference_cnn'.*features.0.weight is missing",
    ):
        prepare(REF, dataset=synth, init=air, device="cpu")
    # A user's own module: only the head and the first conv's channels may differ.
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    save_file(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(UserError, match=r"2.weight is \(5, 8, 3, 3\), the model needs \(4, 8, 3, 3\)"):
        apply_init(
            net, read_init_source(tmp_path / "other.safetensors"), classes=synth.classes, input_shape=(3, 32, 32)
        )
    save_file({"unrelated.weight": torch.zeros(3)}, tmp_path / "unrelated.safetensors")
    with pytest.raises(UserError, match="0.weight is missing"):
        apply_init(net, read_init_source(tmp_path / "unrelated.safetensors"), classes=("a",), input_shape=(3, 32, 32))


# -- freezing and learning rates -----------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", [REF.replace(epochs=2, bn_momentum=0.1), AIR.replace(epochs=2)], ids=["ref", "air"])
def test_frozen_stages_do_not_change_while_training(tmp_path, synth, one_thread, recipe):
    src_run = make_run(tmp_path / "src", recipe, classes=synth.classes)
    res = run_experiment(
        recipe.replace(freeze_stages=2),
        dataset=synth,
        init=src_run,
        runs_root=tmp_path,
        quiet=True,
        report=False,
        device="cpu",
    )
    assert res.status == "finished"
    src, got = _weights(src_run), _weights(res.run_dir)
    frozen = ("features.0.", "features.2.", "features.4.", "features.6.") if recipe.model == "reference_cnn" else ()
    frozen = frozen or ("whiten.", "groups.0.", "groups.1.")
    # Weights, biases and BatchNorm statistics of the frozen stages: exactly the source's (the airnet's whitening
    # bias too, which WhitenBiasFreeze would otherwise train for 3 epochs).
    assert [k for k in src if k.startswith(frozen) and not torch.equal(got[k], src[k])] == []
    changed = [k for k in src if not k.startswith(frozen) and not torch.equal(got[k], src[k])]
    assert changed  # the rest trained


def test_freeze_stages_needs_a_model_with_stages(tmp_path, synth):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
    with pytest.raises(ConfigError, match="does not define stages"):
        cifarlab.fit(REF, synth, model=net, freeze_stages=1, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="has 3 stages"):
        cifarlab.fit(REF, synth, init=make_run(tmp_path / "src", REF, classes=synth.classes), freeze_stages=4)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_pretrained_lr_scale_builds_param_groups(synth, optimizer):
    recipe = (AIR if optimizer == "sgd" else REF).replace(pretrained_lr_scale=0.1)
    model = prepare(recipe.replace(pretrained_lr_scale=1.0), dataset=synth, device="cpu").model  # nothing loaded
    plain = build_optimizer(model, recipe)  # nothing marked: the optimizer of today, whatever the scale
    head = {n for n, _ in model.named_parameters() if n.startswith(("head.6.", "fc."))}
    mark_pretrained(model, [n for n, _ in model.named_parameters() if n not in head])
    opt = build_optimizer(model, recipe)
    ids = {id(p): n for n, p in model.named_parameters()}
    assert len(opt.param_groups) == len(plain.param_groups) + 1
    base = {id(p): g["lr"] for g in plain.param_groups for p in g["params"]}
    for g in opt.param_groups:
        for p in g["params"]:
            want = base[id(p)] * (1.0 if ids[id(p)] in head else 0.1)
            assert g["lr"] == pytest.approx(want), ids[id(p)]
    assert {ids[id(p)] for p in opt.param_groups[-1]["params"]} == head  # Trainer.get_lr reports the new head's
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(len(g["params"]) for g in plain.param_groups)
    # Scale 1: the same groups as without fine-tuning, so default runs are unchanged.
    same = build_optimizer(model, recipe.replace(pretrained_lr_scale=1.0))
    assert [[id(p) for p in g["params"]] for g in same.param_groups] == [
        [id(p) for p in g["params"]] for g in plain.param_groups
    ]


class _InterruptAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_a_fine_tuned_run_resumes_to_identical_weights(tmp_path, ref_run, synth, one_thread):
    recipe = REF.replace(epochs=2, freeze_stages=1, pretrained_lr_scale=0.3, early_stopping_patience=0)
    grey = _grey(synth)
    full = run_experiment(
        recipe, dataset=grey, init=ref_run, runs_root=tmp_path / "a", quiet=True, report=False, device="cpu"
    )
    cut = run_experiment(
        recipe,
        dataset=grey,
        init=ref_run,
        runs_root=tmp_path / "b",
        quiet=True,
        report=False,
        callbacks=[_InterruptAt(1)],
        device="cpu",
    )
    assert cut.status == "stopped"
    with pytest.raises(ConfigError, match="--init cannot be combined"):
        run_experiment(device="cpu", resume=cut.run_dir, dataset=grey, init=ref_run, quiet=True, report=False)
    resumed = run_experiment(device="cpu", resume=cut.run_dir, dataset=grey, quiet=True, report=False)
    assert resumed.status == "finished"
    a, b = _weights(full.run_dir), _weights(resumed.run_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- the CLI, the API, config.json and the report ------------------------------------------------------------------


def test_cli_init_records_the_source_and_the_report_shows_it(tmp_path, one_thread, monkeypatch, undrawn_figures):
    from cifarlab.data import idx

    monkeypatch.setattr(idx, "FASHION_MNIST_DIRS", ())
    src_run = make_run(tmp_path / "cifar-run", REF)  # CIFAR-10 classes, 3x32x32
    data = write_fashion(tmp_path / "data", fake_arrays(n_train=48, n_test=20))  # 1x28x28, Fashion's classes
    runs = tmp_path / "runs"
    argv = ["train", "--recipe", "reference", "--set", "widths=8,16,16", "--set", "dense_width=32"]
    argv += ["--set", "dataset=fashion_mnist", "--set", "epochs=1", "--set", "batch_size=16", "--set", "precision=fp32"]
    argv += ["--set", "freeze_stages=1", "--set", "pretrained_lr_scale=0.5", "--init", str(src_run)]
    assert cli.main([*argv, "--data-dir", str(data), "--runs-dir", str(runs)]) == 0
    (run,) = runs.iterdir()
    init = json.loads((run / "config.json").read_text())["init"]
    assert init["source"] == str(src_run) and init["kind"] == "run folder" and len(init["md5"]) == 32
    assert init["new_head"] == ["head.6.weight", "head.6.bias"] and init["adapted"] == ["features.0.weight"]
    assert init["reinitialized"] == ["head.2.weight"] and init["channels"] == [3, 1]
    html = (run / "report.html").read_text()
    assert "initialized from" in html and str(src_run) in html and "the first stage frozen" in html
    # --init with --resume is refused before anything runs.
    assert cli.main(["train", "--resume", str(run), "--init", str(src_run)]) == 2


def test_fit_init_from_python(tmp_path, ref_run, synth, one_thread):
    run = cifarlab.fit(REF, synth, init=ref_run, runs_dir=tmp_path, report=False, pretrained_lr_scale=0.5)
    assert run.run.config["init"]["source"] == str(ref_run)
    assert np.isfinite(run.test_accuracy)
    assert pretrained_names(run.get_model()) == frozenset()  # a reloaded model carries no fine-tuning marks


def test_the_init_lines_count_one_layer_and_several_in_good_english():
    """`init: 1 layers loaded` and `head.2 keep their fresh init` read wrong; singular and plural now agree."""
    from cifarlab.finetune import InitResult

    one = InitResult(
        source="w.safetensors",
        kind="safetensors",
        md5="",
        loaded=["conv.weight", "conv.bias"],
        adapted=["whiten.weight"],
        reinitialized=["head.2.weight", "head.2.bias"],
        channels=(3, 1),
        source_input_shape=[3, 32, 32],
    )
    lines = one.lines()
    assert lines[0] == "init: 2 layers loaded from w.safetensors"
    assert lines[1] == "init: whiten adapted from 3 to 1 input channels by summing its kernels over the input channels"
    assert lines[2] == "init: head.2 keeps its fresh init: its shape follows the input shape (3x32x32 in the source)"
    two = InitResult(
        source="w.safetensors",
        kind="safetensors",
        md5="",
        loaded=["conv.weight"],
        reinitialized=["head.2.weight", "head.5.weight"],
        source_input_shape=[3, 32, 32],
    )
    assert two.lines()[0] == "init: 1 layer loaded from w.safetensors"
    assert two.lines()[1].startswith("init: head.2, head.5 keep their fresh init: their shape follows")
    assert (
        two.summary() == "w.safetensors (safetensors): 1 layer loaded; head.2, head.5 re-initialized (shape "
        "follows the input)"
    )


# -- fine-tuning keys need pretrained weights (QA17 H1, M5, L6), exports are not sources (L12) --------------------


@pytest.mark.parametrize("key", [{"freeze_stages": 1}, {"pretrained_lr_scale": 0.3}], ids=["freeze", "lr_scale"])
def test_finetune_keys_without_init_are_refused_before_any_data(tmp_path, synth, key):
    """Without --init, freeze_stages froze random weights and pretrained_lr_scale applied to nothing, silently."""
    with pytest.raises(ConfigError, match=r"no pretrained weights \(no --init\)"):
        prepare(REF.replace(**key), dataset=synth, device="cpu")
    with pytest.raises(ConfigError, match="no pretrained weights"):
        cifarlab.fit(REF, synth, runs_dir=tmp_path / "runs", **key)
    assert not (tmp_path / "runs").exists()


def test_a_model_of_ones_own_may_be_frozen_without_init(synth):
    """A module passed in may hold pretrained weights: freeze_stages is not refused for it."""
    net = build_model(REF, num_classes=len(synth.classes))
    plan = prepare(REF.replace(freeze_stages=1), dataset=synth, model=net, device="cpu")
    assert not plan.model.features[0].weight.requires_grad


def test_cli_refuses_freeze_stages_without_init(tmp_path, capsys):
    argv = ["train", "--recipe", "reference", "--set", "freeze_stages=1", "--data-dir", str(tmp_path / "nodata")]
    assert cli.main([*argv, "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "freeze_stages=1: fine-tuning settings, but there are no pretrained weights" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_fine_tuned_runs_config_json_names_its_init_source(tmp_path, capsys):
    """`--config RUN/config.json` re-created the recipe but not its --init source: it trained from scratch with a
    random first stage frozen. Now the error names the source to pass."""
    run = make_run(tmp_path / "ft", REF.replace(freeze_stages=1, pretrained_lr_scale=0.3))
    cfg = json.loads((run / "config.json").read_text())
    cfg["init"] = {"source": str(tmp_path / "source run"), "kind": "run folder"}
    (run / "config.json").write_text(json.dumps(cfg))
    argv = ["train", "--config", str(run / "config.json"), "--runs-dir", str(tmp_path / "runs")]
    assert cli.main([*argv, "--data-dir", str(tmp_path / "nodata")]) == 2
    err = capsys.readouterr().err
    assert f"fine-tuned from {tmp_path / 'source run'}" in err
    assert f"Add --init '{tmp_path / 'source run'}'" in err and "freeze_stages=1 and pretrained_lr_scale=0.3" in err
    assert not (tmp_path / "runs").exists()


def test_freeze_stages_beyond_the_models_stages_fails_with_the_recipe_checks(capsys):
    from cifarlab.config import resolve_recipe

    with pytest.raises(ConfigError, match="freeze_stages=9: the model airnet has 3 stages"):
        resolve_recipe("fast", None, ["freeze_stages=9"])
    assert resolve_recipe("fast", None, ["freeze_stages=3"]).freeze_stages == 3
    assert cli.main(["config", "--set", "freeze_stages=9"]) == 2
    assert "has 3 stages" in capsys.readouterr().err


def test_init_from_an_export_says_exports_cannot_be_fine_tuned_from(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated for torch.export
        net = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3)))
        torch.jit.save(net, str(tmp_path / "model.torchscript.pt"))
    with pytest.raises(UserError, match="is a TorchScript export.*cannot be fine-tuned from.*run folder") as e:
        read_init_source(tmp_path / "model.torchscript.pt")
    assert "refusing" not in str(e.value)
    onnx_head = b"\x08\x08\x12\x07pytorch\x1a\x052.0.0"  # an ONNX ModelProto's start: ir_version, producer
    (tmp_path / "m.onnx").write_bytes(onnx_head)
    (tmp_path / "m.bin").write_bytes(onnx_head)
    for name in ("m.onnx", "m.bin"):
        with pytest.raises(UserError, match="is an ONNX export.*model.safetensors"):
            read_init_source(tmp_path / name)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="is not a PyTorch weights file"):
        read_init_source(tmp_path / "notes.txt")
