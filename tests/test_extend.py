"""Extending cifarlab: a custom model, augmentation and callback, each a few registered lines, trained through
the CLI (`--plugin` + `--set`) and through the Python API; user data of another size (64x64) and channel count."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import cifarlab
from cifarlab.errors import UserError
from cifarlab.registry import AUGMENTS, CALLBACKS, MODELS, OPTIMIZERS, SCHEDULES
from cifarlab.train import Callback


def _readme_plugin() -> str:
    """The plugin file the README's "Extending cifarlab" shows: the test trains with the documented code."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Extending cifarlab") :]
    return section[section.index("```python\n") + len("```python\n") : section.index("\n```\n")] + "\n"


PLUGIN = _readme_plugin()

TINY = [
    "--recipe",
    "reference",
    "--set",
    "batch_size=16",
    "--set",
    "epochs=2",
    "--set",
    "precision=fp32",
    "--set",
    "early_stopping_patience=0",
]


def _image_folder(root: Path, size: int = 32) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 12)):
        for i in range(n):
            label = i % 2
            d = root / split / f"c{label}"
            d.mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 90, (size, size, 3), dtype=np.uint8) + (150 if label else 0)
            Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.png")
    return root


def test_cli_trains_a_plugin_model_augmentation_and_callback(tmp_path, capsys, monkeypatch, undrawn_figures):
    """`cifarlab --plugin FILE` through `cli.main` in this process (what `python -m cifarlab.cli` calls); what the
    plugin registers is unregistered afterwards, as if each command had been a process of its own."""
    import cifarlab.plugins
    from cifarlab import cli

    plugin = tmp_path / "myplugin.py"
    plugin.write_text(PLUGIN)
    data = _image_folder(tmp_path / "data")
    monkeypatch.setattr(cifarlab.plugins, "_loaded", {})  # a fresh process has loaded no plugin
    base = ["--plugin", str(plugin)]
    sets = ["--set", "model=tinynet", "--set", "augment=invert", "--set", "callbacks=count_steps"]
    try:
        argv = [*base, "train", *TINY, *sets, "--set", f"dataset={data}", "--runs-dir", str(tmp_path / "runs")]
        rc = cli.main(argv)
        out, err = capsys.readouterr()
        assert rc == 0, err + out
        (run,) = (tmp_path / "runs").iterdir()
        config = json.loads((run / "config.json").read_text())
        assert config["recipe"]["model"] == "tinynet" and config["recipe"]["augment"] == "invert"
        # 32 training images (val_fraction 0.2 of 40), batch 16: 2 steps per epoch, 2 epochs
        assert (run / "steps.txt").read_text() == "4"
        assert "invert every pixel" in (run / "report.md").read_text()  # the report describes the new augmentation
        # Other commands load the run with the same plugin.
        rc = cli.main([*base, "evaluate", str(run), "--json"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert json.loads(out)["accuracy"] >= 0
        # The recipe checks know the registered names (and nothing else).
        assert cli.main([*base, "config", "--set", "model=tinynett"]) == 2
        assert "tinynet" in capsys.readouterr().err
    finally:
        MODELS.unregister("tinynet")
        AUGMENTS.unregister("invert")
        CALLBACKS.unregister("count_steps")
        sys.modules.pop("cifarlab_plugin_myplugin", None)
    # Without the plugin the model is unknown: a clear error, no traceback.
    monkeypatch.setattr(cifarlab.plugins, "_loaded", {})
    assert cli.main(["evaluate", str(run)]) == 2
    err = capsys.readouterr().err
    assert "tinynet" in err and "Traceback" not in err


class _TinyNet(nn.Module):
    """A conv and a linear head on its mean: linear in the mean brightness, so a few steps learn the task."""

    def __init__(self, channels: int = 3, num_classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


class _Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_train_begin(self, logs=None):
        self.calls.append("train_begin")

    def on_epoch_begin(self, epoch, logs=None):
        self.calls.append(f"epoch_begin {epoch}")

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append("batch")

    def on_validation_begin(self, epoch, logs=None):
        self.calls.append("validation_begin")

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(f"epoch_end {epoch} {sorted(k for k in logs if k != 'events')}")

    def on_train_end(self, logs=None):
        self.calls.append("train_end")


def _arrays(n_train: int, n_test: int, shape: tuple[int, ...], seed: int = 0):
    """Two classes told apart by brightness, as uint8 NCHW arrays."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = np.arange(n) % 2
        x = rng.integers(0, 100, (n, *shape), dtype=np.uint8) + (120 * y).astype(np.uint8)[:, None, None, None]
        return x.astype(np.uint8), y

    return (*make(n_train), *make(n_test))


def test_api_trains_a_user_module_with_a_user_callback_and_augmentation(tmp_path):
    seen_shapes = []

    @AUGMENTS.register("api_flip", replace=True)
    def api_flip(recipe):
        def flip(x, *, generator, indices=None, epoch=0):
            seen_shapes.append(tuple(x.shape[1:]))
            return x.flip(-1)

        return flip

    try:
        rec = _Recorder()
        torch.manual_seed(0)  # the user's module is built (and initialised) before fit seeds anything
        x_tr, y_tr, x_te, y_te = _arrays(48, 16, (3, 32, 32))
        net = _TinyNet()
        first_weights = net.conv.weight.detach().clone()
        run = cifarlab.fit(
            "reference",
            data=(x_tr, y_tr, x_te, y_te),
            classes=["dark", "bright"],
            model=net,
            callbacks=[rec],
            runs_dir=tmp_path,
            report=False,
            epochs=2,
            batch_size=16,
            precision="fp32",
            augment="api_flip",
            early_stopping_patience=0,
            lr=0.05,
        )
        assert run.classes == ["dark", "bright"]
        assert seen_shapes and set(seen_shapes) == {(3, 32, 32)}
        # Keras' hook order, every epoch; steps: 38 training images (80%) at batch 16 -> 3 batches per epoch
        assert rec.calls[:2] == ["train_begin", "epoch_begin 0"]
        assert rec.calls[2:6] == ["batch", "batch", "batch", "validation_begin"]
        assert rec.calls[6].startswith("epoch_end 0 ['accuracy', 'epoch_seconds', 'learning_rate', 'loss', 'lr'")
        assert rec.calls[-1] == "train_end" and len(rec.calls) == 2 * 6 + 2
        # The user's own module was trained (its weights moved); how well 6 steps learn is not the point here.
        assert not torch.equal(first_weights, run.get_model().conv.weight.detach().cpu())
        probs = run.predict(x_te)
        assert probs.shape == (16, 2) and torch.allclose(probs.sum(1), torch.ones(16), atol=1e-5)
        assert (probs.argmax(1).numpy() == y_te).mean() == pytest.approx(run.test_accuracy)
        ev = run.evaluate()
        assert ev.accuracy == pytest.approx(run.test_accuracy)
        # The user's model class is recorded, and the run reloads in this process (its model is registered).
        assert json.loads((run.path / "config.json").read_text())["model_class"].endswith("_TinyNet")
        again = cifarlab.load(run.path)
        assert torch.allclose(again.predict(x_te), probs)

    finally:
        AUGMENTS.unregister("api_flip")
        MODELS.unregister("user._TinyNet")


def test_api_trains_on_64px_grayscale_images_without_resizing(tmp_path, undrawn_figures):
    x_tr, y_tr, x_te, y_te = _arrays(64, 16, (1, 64, 64), seed=1)
    run = cifarlab.fit(
        "reference",
        data={"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te},
        runs_dir=tmp_path,
        epochs=2,
        batch_size=16,
        widths=(8, 8, 8),
        dense_width=16,
        precision="fp32",
        bn_momentum=0.1,
        early_stopping_patience=0,
        device="cpu",  # the accuracy bar below holds for the CPU's random streams (on a GPU 2 epochs may not learn)
    )
    config = json.loads((run.path / "config.json").read_text())
    assert config["dataset"]["input_shape"] == [1, 64, 64]
    model = run.get_model()
    assert model.features[0].in_channels == 1
    assert model.head[2].in_features == 8 * 8 * 8  # 64 px after three 2x2 pools: an 8x8 map, not 4x4
    assert run.predict(x_te).shape == (16, 2)
    assert run.test_accuracy > 0.8
    assert (run.path / "report.html").exists()
    # written by training itself, just before status.json says finished: it reads as a finished run
    md = (run.path / "report.md").read_text()
    assert "- Training ran 2 epochs" in md and "not finish" not in md and "status | running" not in md
    with pytest.raises(UserError, match="this model takes"):
        run.predict(np.zeros((2, 1, 32, 32), dtype=np.uint8))
    # Files are decoded to the model's input (64x64, one channel); the export takes that shape too.
    from PIL import Image

    Image.fromarray(x_te[1, 0]).save(tmp_path / "bright.png")
    (result,) = run.predict([tmp_path / "bright.png"])
    assert result["top_k"][0]["class"] == run.classes[int(y_te[1])]
    ort = pytest.importorskip("onnxruntime")
    onnx_path = run.export("onnx", tmp_path / "m.onnx")
    session = ort.InferenceSession(str(onnx_path))
    (onnx_probs,) = session.run(None, {"images": x_te})
    assert np.allclose(onnx_probs, run.predict(x_te).numpy(), atol=1e-4)
    if run.recipe.tta != "none":  # the bare model on request: one view, other probabilities
        bare = ort.InferenceSession(str(run.export("onnx", tmp_path / "bare.onnx", tta="none")))
        (bare_probs,) = bare.run(None, {"images": x_te})
        assert not np.allclose(bare_probs, onnx_probs, atol=1e-4)


@pytest.mark.parametrize("store", ["default", "folder"])
def test_mlflow_logger_records_params_and_metrics(tmp_path, monkeypatch, store):
    """The default store (<runs>/mlruns) and a store folder given by plain path (MLflow 3 refuses a file store
    unless MLFLOW_ALLOW_FILE_STORE is set: it must be set for both)."""
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.chdir(tmp_path)
    x_tr, y_tr, x_te, y_te = _arrays(40, 10, (3, 32, 32))
    run = cifarlab.fit(
        "reference",
        data=(x_tr, y_tr, x_te, y_te),
        runs_dir=tmp_path / "runs",
        report=False,
        mlflow=True if store == "default" else "my-store",
        epochs=2,
        batch_size=16,
        widths=(8, 8, 8),
        dense_width=16,
        precision="fp32",
        early_stopping_patience=0,
    )
    where = tmp_path / "runs" / "mlruns" if store == "default" else tmp_path / "my-store"
    client = mlflow.tracking.MlflowClient(tracking_uri=where.as_uri())
    (found,) = client.search_runs([client.get_experiment_by_name("cifarlab").experiment_id])
    assert found.info.run_name == run.path.name and found.info.status == "FINISHED"
    assert found.data.params["lr"] == "0.001" and found.data.params["batch_size"] == "16"
    history = client.get_metric_history(found.info.run_id, "val_loss")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([row["val_loss"] for row in run.history])


def test_mlflow_location_mlflow_cannot_use_is_refused_before_any_folder(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from cifarlab import cli

    argv = ["train", "--mlflow", "foo://bar", "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "MLflow cannot store in a foo:// location" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_callbacks_registry_and_recipe_key():
    calls = []

    @CALLBACKS.register("probe_cb", replace=True)
    def probe(recipe):
        calls.append(recipe.name)
        return Callback()

    try:
        from cifarlab.train import recipe_callbacks

        r = cifarlab.get_recipe("fast").replace(callbacks=("probe_cb",))
        assert type(recipe_callbacks(r, has_val=False)[-1]) is Callback and calls == ["fast"]
    finally:
        CALLBACKS.unregister("probe_cb")


def test_an_overlay_entry_is_seen_by_its_own_thread_only():
    """`Registry.overlay` (what `cifarlab.load(run, model=...)` uses): another thread sees the registry as it
    was, even one running at the same time, and a shared entry of the same name is back afterwards."""
    import threading

    seen: dict[str, object] = {}
    inside, done = threading.Event(), threading.Event()

    def other_thread():
        inside.wait(5)
        seen["other"] = "user.Overlaid" in MODELS
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with MODELS.overlay("user.Overlaid", lambda recipe, n, shape: nn.Linear(1, 1), description="overlaid"):
        assert "user.Overlaid" in MODELS and MODELS.describe("user.Overlaid") == "overlaid"
        with MODELS.overlay("airnet", lambda recipe, n, shape: nn.Identity()):  # over a shared entry
            assert isinstance(MODELS.build("airnet", None, 10, (3, 32, 32)), nn.Identity)
        inside.set()
        done.wait(5)
    t.join()
    assert seen == {"other": False}
    assert "user.Overlaid" not in MODELS
    assert MODELS.describe("airnet") != "airnet" and not isinstance(
        MODELS.build("airnet", cifarlab.get_recipe("fast"), 10, (3, 32, 32)), nn.Identity
    )


class _Logits(nn.Module):
    def __init__(self, channels: int = 3, outputs: int = 2, wrap: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, outputs)
        self.wrap = wrap

    def forward(self, x):
        out = self.fc(self.conv(x).mean((2, 3)))
        return (out,) if self.wrap else out


@pytest.mark.parametrize(
    "model,needle",
    [
        (_Logits(outputs=10), r"returns shape \(2, 10\) for 2 images; it must return float logits of shape \(N, 2\)"),
        (_Logits(wrap=True), r"returns a tuple for 2 images"),
        (_Logits(channels=1), r"cannot take 3x16x16 images: Given groups=1"),
        (nn.Identity(), r"has no trainable parameters"),
    ],
    ids=["ten-logits-for-two-classes", "tuple", "wrong-channels", "no-parameters"],
)
def test_a_user_model_of_the_wrong_shape_is_one_line_before_any_folder(tmp_path, model, needle):
    """Ten logits for two classes trained silently to 0% before; the others failed after the run folder existed."""
    with pytest.raises(UserError, match=needle):
        cifarlab.fit("reference", data=_arrays(32, 8, (3, 16, 16)), model=model, runs_dir=tmp_path, epochs=1)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_last_batch_of_one_image_is_refused_for_a_batchnorm1d_head(tmp_path):
    """reference's dense head has a BatchNorm1d, and drop_last is off (as Keras): 17 training images at batch 16
    leave a batch of one, which BatchNorm1d cannot train on — refused before any work, with the way out."""
    kw = dict(runs_dir=tmp_path, epochs=1, batch_size=16, widths=(8, 8, 8), dense_width=16, val_fraction=0.0)
    kw |= dict(schedule="onecycle", early_stopping_patience=0)  # no validation split: nothing to watch
    with pytest.raises(UserError, match=r"leaves a last batch of 1 of the 17 training images.*drop_last=true"):
        cifarlab.fit("reference", data=_arrays(17, 4, (3, 16, 16)), **kw)
    assert not any(tmp_path.iterdir())
    # batch_size=1 leaves no last batch, but every batch is one image
    with pytest.raises(UserError, match=r"batch_size=1 trains on one image at a time.*at least 2"):
        cifarlab.fit("reference", data=_arrays(17, 4, (3, 16, 16)), **{**kw, "batch_size": 1})
    assert not any(tmp_path.iterdir())


def test_api_refuses_callbacks_that_are_not_callback_instances(tmp_path):
    data = _arrays(32, 8, (3, 16, 16))
    for bad, needle in (
        (Callback(), "pass a list of cifarlab.Callback instances, not a Callback"),
        ([Callback], r"is not a cifarlab.Callback instance \(a class: call it"),
        ([lambda *a: None], "is not a cifarlab.Callback instance"),
        ([type("Odd", (Callback,), {"order": "x"})()], r"Odd.order must be a number \(callbacks run by it\), not 'x'"),
    ):
        with pytest.raises(UserError, match=needle):
            cifarlab.fit("reference", data=data, callbacks=bad, runs_dir=tmp_path, epochs=1)
    assert not any(tmp_path.iterdir())


def test_api_holds_out_a_test_set_from_a_mapping_and_predicts_edge_cases(tmp_path):
    """{'x_train', 'y_train', 'test_fraction'} holds a test set out (the error for (x, y) says so); predicting
    no images gives no rows, a generator of paths is read once, one image without a batch axis is named."""
    x, y, _, _ = _arrays(48, 0, (3, 16, 16))
    with pytest.raises(UserError, match="'test_fraction': 0.1"):
        cifarlab.fit("reference", data=(x, y), runs_dir=tmp_path)
    kw = dict(runs_dir=tmp_path, epochs=1, batch_size=16, widths=(8, 8, 8), dense_width=16, precision="fp32")
    run = cifarlab.fit("reference", data={"x_train": x, "y_train": y, "test_fraction": 0.25}, **kw)
    assert run.metrics["test_accuracy"] >= 0 and len(run.dataset.y_test) == 12  # a quarter of 48, stratified
    assert tuple(run.predict(x[:0]).shape) == (0, 2)
    with pytest.raises(UserError, match=r"add a batch dimension"):
        run.predict(x[0].transpose(1, 2, 0))  # one HWC image: read as 16 images of (1, 16, 3) otherwise
    png = tmp_path / "one.png"
    from PIL import Image

    Image.fromarray(x[0].transpose(1, 2, 0)).save(png)
    results = run.predict(p for p in [png])  # a generator: consumed once, still classified
    assert len(results) == 1 and "top_k" in results[0]


def test_test_accuracy_of_a_run_that_did_not_finish_names_its_status(tmp_path):
    from cifarlab.runs import write_status

    data = _arrays(32, 8, (3, 16, 16))
    kw = dict(runs_dir=tmp_path, epochs=1, batch_size=16, widths=(8, 8, 8), dense_width=16, precision="fp32")
    run = cifarlab.fit("reference", data=data, report=False, **kw)
    (run.path / "metrics.json").unlink()
    with pytest.raises(UserError, match=r"finished, but its metrics.json holds no test accuracy .*`cifarlab report"):
        _ = cifarlab.load(run.path).test_accuracy  # (it said: "the run's status is 'finished', not 'finished'")
    write_status(run.path, "crashed")
    with pytest.raises(UserError, match=r"has no test accuracy: the run's status is 'crashed'"):
        _ = cifarlab.load(run.path).test_accuracy


def test_runs_of_two_user_models_of_one_class_each_load_their_own(tmp_path):
    """Two fits with instances of one class (other widths, then the same widths): loading the first run gives a
    model of its own architecture with its own weights, never the second run's object."""
    data = _arrays(32, 8, (3, 16, 16))
    kw = dict(runs_dir=tmp_path, epochs=1, batch_size=16, precision="fp32", report=False, train_scales=())
    try:
        torch.manual_seed(0)
        ra = cifarlab.fit("reference", data=data, model=_Logits(), **kw)
        torch.manual_seed(1)
        rb = cifarlab.fit("reference", data=data, model=_Logits(), **kw)  # same shapes, other weights
        rc = cifarlab.fit("reference", data=data, model=_Wider(), **kw)  # same class name, other shapes
        a_again = cifarlab.load(ra.path)
        wa, wb = a_again.get_model().conv.weight.cpu(), rb.get_model().conv.weight.cpu()  # trained on a GPU maybe
        assert a_again.get_model() is not rb.get_model()
        assert torch.equal(wa, load_file(ra.path / "model.safetensors")["conv.weight"]) and not torch.equal(wa, wb)
        assert torch.equal(rb.get_model().conv.weight.cpu(), load_file(rb.path / "model.safetensors")["conv.weight"])
        assert rc.recipe.model != ra.recipe.model and cifarlab.load(rc.path).predict(data[2]).shape == (8, 2)
        assert cifarlab.load(ra.path).predict(data[2]).shape == (8, 2)  # still loads after the wider one
    finally:
        for name in {r.recipe.model for r in (ra, rb, rc)}:
            MODELS.unregister(name)


class _Wider(_Logits):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 2)


_Wider.__qualname__ = "_Logits"  # the same class name, as a second definition in a notebook would have


def test_fit_gives_the_session_its_determinism_setting_and_random_state_back(tmp_path):
    """deterministic=True is for the run: a notebook's later work keeps torch's own (faster) algorithms; the run's
    seed is for the run: the notebook's random numbers go on where they were."""
    assert not torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(1234)
    torch.rand(3)
    expected = torch.rand(5, generator=torch.Generator().set_state(torch.get_rng_state()))
    kw = dict(runs_dir=tmp_path, epochs=1, batch_size=16, precision="fp32", report=False, widths=(8, 8, 8))
    cifarlab.fit("reference", data=_arrays(32, 8, (3, 16, 16)), deterministic=True, dense_width=16, **kw)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.rand(5), expected)


def test_classes_given_where_the_data_names_its_own_is_refused(tmp_path):
    x, y, xt, yt = _arrays(32, 8, (3, 16, 16))
    with pytest.raises(UserError, match="this data already has its own"):
        cifarlab.fit("reference", data="cifar10", classes=["a", "b"], runs_dir=tmp_path)
    mapping = {"x_train": x, "y_train": y, "x_test": xt, "y_test": yt, "classes": ["dark", "bright"]}
    with pytest.raises(UserError, match="name different classes"):
        cifarlab.fit("reference", data=mapping, classes=["a", "b"], runs_dir=tmp_path)
    assert not any(tmp_path.iterdir())


def test_evaluating_a_run_of_in_memory_data_asks_for_the_data_and_checks_its_shape(tmp_path):
    """Such a run has no folder to reload its data from: evaluate says to pass it (it said "unknown dataset
    'arrays' ... no such file or folder"); images of another shape are refused by name, not by torch."""
    data = _arrays(32, 8, (3, 16, 16))
    kw = dict(runs_dir=tmp_path, epochs=1, batch_size=16, widths=(8, 8, 8), dense_width=16, precision="fp32")
    run = cifarlab.fit("reference", data=data, report=False, **kw)
    loaded = cifarlab.load(run.path)
    with pytest.raises(UserError, match=r"trained on data given in memory \('arrays'.*evaluate\(data="):
        loaded.evaluate()
    grey = tuple(a[:, :1] if a.ndim == 4 else a for a in data)  # one channel where the run takes three
    with pytest.raises(UserError, match=r"images are 1x16x16 .*the run takes 3x16x16"):
        loaded.evaluate(data=grey)
    assert loaded.evaluate(data=data).n == len(data[3])  # the same data: its test images


class _StopAtEpoch(Callback):
    """Ctrl-C as the given epoch begins (0-based): the run stops, resumable from its last checkpoint."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def _unload_readme_plugin() -> None:
    """What the README's plugin registered is gone, as in a new process (which has loaded no plugin)."""
    import cifarlab.plugins

    for registry, name in ((MODELS, "tinynet"), (AUGMENTS, "invert"), (CALLBACKS, "count_steps")):
        if name in registry:
            registry.unregister(name)
    sys.modules.pop("cifarlab_plugin_myplugin", None)
    cifarlab.plugins._loaded.clear()


def test_a_plugin_runs_resume_line_names_its_plugin_and_resume_without_it_says_exactly_what_to_add(
    tmp_path, capsys, monkeypatch
):
    """QA round 17, M2: the "resume with:" line of a run trained with plugin pieces failed as printed (the
    plugin was not named). config.json records the plugin (absolute), the line and `resume_command` name it
    (quoted), and `--resume` without it is refused, naming the command; it is never loaded from the run folder."""
    import shlex

    import cifarlab.experiment as experiment
    import cifarlab.plugins
    from cifarlab import cli
    from cifarlab.runs import resume_command

    folder = tmp_path / "my plugins"  # a space: the printed command must quote it
    folder.mkdir()
    (folder / "myplugin.py").write_text(PLUGIN)
    plugin = str((folder / "myplugin.py").resolve())
    data = _image_folder(tmp_path / "data")
    monkeypatch.setattr(cifarlab.plugins, "_loaded", {})
    monkeypatch.delenv(cifarlab.plugins.ENV, raising=False)
    monkeypatch.chdir(folder)  # named relatively, recorded absolutely
    sets = ["--set", "model=tinynet", "--set", "augment=invert", "--set", "callbacks=count_steps"]
    argv = ["--plugin", "myplugin.py", "train", *TINY, *sets, "--set", f"dataset={data}", "--no-report"]
    made = experiment.run_callbacks
    try:
        with monkeypatch.context() as m:
            m.setattr(experiment, "run_callbacks", lambda *a, **k: [*made(*a, **k), _StopAtEpoch(1)])
            rc = cli.main([*argv, "--runs-dir", str(tmp_path / "runs")])
        out, err = capsys.readouterr()
        assert rc == 130, err + out
        (run,) = (tmp_path / "runs").iterdir()
        expected = f"cifarlab --plugin {shlex.quote(plugin)} train --resume {run}"
        assert f"resume with: {expected}\n" in out
        assert json.loads((run / "config.json").read_text())["plugins"] == [plugin]
        assert resume_command(run) == expected  # what the report and `evaluate` print
        assert cli.main(["--plugin", plugin, "evaluate", str(run)]) in (0, 1)
        assert f"{expected} continues it" in capsys.readouterr().err
    finally:
        _unload_readme_plugin()
    # Without the plugin (a new process, elsewhere): refused before anything is loaded or written, with the command.
    monkeypatch.chdir(tmp_path)
    status = (run / "status.json").read_text()
    assert cli.main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"trained with plugin code this command did not load ({plugin})" in err
    assert f"add its --plugin argument: {expected}" in err and "Traceback" not in err
    assert (run / "status.json").read_text() == status and "cifarlab_plugin_myplugin" not in sys.modules
    # Other commands name the recorded plugin too.
    assert cli.main(["evaluate", str(run)]) == 2
    assert f"load the plugins it was trained with: cifarlab --plugin {shlex.quote(plugin)} COMMAND" in (
        capsys.readouterr().err
    )
    # The printed command, as printed, finishes the run; the plugin's callback went on counting.
    try:
        rc = cli.main(shlex.split(expected)[1:])
        out, err = capsys.readouterr()
        assert rc == 0, err + out
        assert json.loads((run / "status.json").read_text())["status"] == "finished"
        assert (run / "steps.txt").read_text() == "4"  # 2 steps an epoch, 2 epochs
    finally:
        _unload_readme_plugin()


def test_command_plugins_records_the_environments_and_the_commands_plugins_once(tmp_path, monkeypatch):
    import cifarlab.plugins as plugins

    (tmp_path / "a.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(plugins.ENV, f"a.py{os.pathsep}some.module")
    assert plugins.command_plugins(["./a.py", str(tmp_path / "a.py"), "other.mod"]) == [
        str((tmp_path / "a.py").resolve()),
        "some.module",
        "other.mod",
    ]


def _api_extend_example() -> str:
    """The code of docs/API.md's "Extend" section, as shown."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "API.md").read_text()
    section = text[text.index("## Extend: one registered piece each") :]
    return section[section.index("```python\n") + len("```python\n") : section.index("\n```\n")] + "\n"


def test_the_api_docs_extend_example_trains_with_its_registrations(tmp_path, monkeypatch):
    """docs/API.md says its "Extend" example is tested here: its registrations run as shown, and its fit() runs
    with tiny data (QA round 17, L11: no test used its `adamw` and `cosine`)."""
    code = _api_extend_example()
    call = 'run = cifarlab.fit("reference", '
    assert code.count(call) == 1
    x_tr, y_tr, x_te, y_te = _arrays(40, 10, (3, 32, 32))
    # Its fit() as shown, plus tiny data and a short run: 30 epochs of CIFAR-10 are not for a test.
    tiny = (
        "data=(x_tr, y_tr, x_te, y_te), runs_dir=RUNS, report=False, epochs=2, batch_size=16, precision='fp32', "
        "early_stopping_patience=0, "
    )
    namespace = {"x_tr": x_tr, "y_tr": y_tr, "x_te": x_te, "y_te": y_te, "RUNS": tmp_path / "runs"}
    try:
        exec(compile(code.replace(call, call + tiny), "API.md", "exec"), namespace)  # noqa: S102
        run = namespace["run"]
        config = json.loads((run.path / "config.json").read_text())["recipe"]
        picked = {k: config[k] for k in ("model", "augment", "optimizer", "schedule", "callbacks")}
        assert picked == {
            "model": "tinynet",
            "augment": "invert",
            "optimizer": "adamw",
            "schedule": "cosine",
            "callbacks": ["count_steps"],
        }
        assert json.loads((run.path / "status.json").read_text())["status"] == "finished"
        lrs = [row["lr"] for row in run.history]
        assert lrs[-1] < lrs[0]  # the cosine schedule moved the LR
        assert run.predict(x_te).shape == (10, 2)
    finally:
        for registry, name in (
            (MODELS, "tinynet"),
            (AUGMENTS, "invert"),
            (OPTIMIZERS, "adamw"),
            (SCHEDULES, "cosine"),
            (CALLBACKS, "count_steps"),
        ):
            if name in registry:
                registry.unregister(name)


def test_quiet_hides_mlflows_info_lines_and_keeps_its_warnings(tmp_path):
    """QA round 17, L7: `train --quiet --mlflow sqlite:///NEW.db` printed MLflow's "Creating initial MLflow database
    tables..." lines. Recorded by a handler on the "mlflow" logger (MLflow's own handler writes to the stderr of
    whenever it was imported)."""
    import logging
    from types import SimpleNamespace

    pytest.importorskip("sqlalchemy")
    pytest.importorskip("mlflow")
    from cifarlab.train.loggers import MLflowLogger

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.addHandler(handler)
    try:
        for quiet, name in ((True, "quiet"), (False, "loud")):
            records.clear()
            cb = MLflowLogger(tmp_path / "runs" / name, tracking_uri=f"sqlite:///{tmp_path / name}.db", quiet=quiet)
            cb.trainer = SimpleNamespace(recipe=cifarlab.get_recipe("reference"))  # type: ignore[assignment]
            cb.on_train_begin()
            cb.on_train_end()
            said = [r.getMessage() for r in records if r.levelno < logging.WARNING]
            if quiet:
                assert said == [] and logger.level == level  # and the level is put back
            else:  # what --quiet hides: a new store's tables
                assert any("Creating initial MLflow database tables" in s for s in said), said
    finally:
        logger.removeHandler(handler)
