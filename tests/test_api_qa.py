"""The Python API's QA list: a run of your own nn.Module loaded in another process (`load(run, model=...)`, or a
plugin for the command), registered callback names in `fit(callbacks=...)`, `data=` for calibrate/report, what
`predict` accepts, a failed fit naming its folder and status, messages in Python's words, `TrainedRun.explain`,
and `stop_training`'s documented behaviour."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import cifarlab
from cifarlab.api import python_wording, unregistered_model_message
from cifarlab.errors import ConfigError, DataError, UserError
from cifarlab.registry import CALLBACKS, MODELS
from cifarlab.train import Callback

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(epochs=1, batch_size=16, precision="fp32", report=False)
REF = dict(TINY, widths=(8, 8, 8), dense_width=16)  # the reference CNN, tiny


def _arrays(n_train: int = 32, n_test: int = 8, size: int = 16, seed: int = 0):
    """Two classes told apart by brightness, uint8 NCHW."""
    rng = np.random.default_rng(seed)

    def make(n):
        y = np.arange(n) % 2
        x = rng.integers(0, 100, (n, 3, size, size), dtype=np.uint8) + (120 * y).astype(np.uint8)[:, None, None, None]
        return x.astype(np.uint8), y

    return (*make(n_train), *make(n_test))


class _QANet(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.fc = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture
def user_run(tmp_path):
    """A run of `fit(model=_QANet())`, then its model unregistered: this process is now as a new one."""
    data = _arrays()
    torch.manual_seed(0)
    run = cifarlab.fit("reference", data=data, model=_QANet(), runs_dir=tmp_path / "runs", train_scales=(), **TINY)
    name = run.recipe.model
    MODELS.unregister(name)
    yield run, data, name
    MODELS.unregister(name)


# -- 1. a run of your own nn.Module, from another process ---------------------------------------------------------


def test_a_user_module_run_loads_with_the_model_given_and_says_both_ways_without(user_run, capsys):
    run, data, name = user_run
    assert name == "user._QANet"
    with pytest.raises(UserError) as e:
        cifarlab.load(run.path)
    msg = str(e.value)
    assert f"recorded as model {name!r}" in msg and "_QANet" in msg
    assert f"cifarlab.load({str(run.path)!r}, model=_QANet(...))" in msg  # the Python way
    assert f"MODELS.register({name!r})(lambda recipe, num_classes, input_shape: _QANet(...))" in msg  # the plugin
    assert f"cifarlab --plugin FILE predict {run.path} IMAGE" in msg
    # the command says the same (it used to say only "pieces not registered here")
    from cifarlab import cli

    assert cli.main(["predict", str(run.path), str(run.path / "nothing.png")]) == 2
    assert f"recorded as model {name!r}" in capsys.readouterr().err

    loaded = cifarlab.load(run.path, model=_QANet())
    assert name not in MODELS  # the process's registry is as it was
    expected = run.predict(data[2])
    assert torch.allclose(loaded.predict(data[2]), expected, atol=1e-6)
    assert loaded.get_model() is loaded.model and isinstance(loaded.model, _QANet)
    # Methods that read the run folder again build its model from the instance given
    assert loaded.evaluate(data=data).accuracy == pytest.approx(run.test_accuracy)
    assert loaded.export("torchscript", run.path / "m.pt").exists()
    assert name not in MODELS


def test_a_model_given_that_does_not_fit_the_run_is_one_clear_line(user_run):
    run, _, _ = user_run
    with pytest.raises(UserError, match=r"does not match the weights .*conv.weight is \(4, 3, 3, 3\) in model=, "
                       r"\(8, 3, 3, 3\) in the run.*the same arguments"):  # fmt: skip
        cifarlab.load(run.path, model=_QANet(width=4))
    with pytest.raises(UserError, match=r"was trained with a .*_QANet; model= is a torch.nn.modules.linear.Linear"):
        cifarlab.load(run.path, model=nn.Linear(2, 2))
    with pytest.raises(UserError, match=r"pass an nn.Module instance, not a type \(a class: create one, _QANet"):
        cifarlab.load(run.path, model=_QANet)  # type: ignore[arg-type]


def test_the_message_names_the_recorded_name_as_code_writes_the_class():
    """`user.MyNet.2` (a second architecture of the class in one session) and nested classes."""
    config = {"recipe": {"model": "user.Outer.MyNet.2", "augment": "nope"}, "model_class": "nb.Outer.MyNet"}
    msg = unregistered_model_message(Path("runs/r"), config)
    assert msg is not None and "your own nn.Module nb.Outer.MyNet, recorded as model 'user.Outer.MyNet.2'" in msg
    assert "model=Outer.MyNet(...)" in msg and "MODELS.register('user.Outer.MyNet.2')" in msg
    assert msg.endswith("the run also needs augment 'nope': load the plugin that registers them")
    assert unregistered_model_message(Path("runs/r"), {"recipe": {"model": "airnet"}}) is None


def test_the_documented_plugin_serves_the_command(user_run, tmp_path, monkeypatch, capsys):
    """docs/API.md's plugin: a factory under the recorded name; `cifarlab --plugin FILE predict RUN IMAGE`."""
    import cifarlab.plugins
    from cifarlab import cli

    run, data, name = user_run
    png = tmp_path / "one.png"
    Image.fromarray(data[2][1].transpose(1, 2, 0)).save(png)
    plugin = tmp_path / "qanet_plugin.py"
    plugin.write_text(
        "import torch\nfrom torch import nn\nfrom cifarlab.registry import MODELS\n\n"
        "class _QANet(nn.Module):\n"
        "    def __init__(self, width=8):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(3, width, 3, padding=1)\n"
        "        self.fc = nn.Linear(width, 2)\n"
        "    def forward(self, x):\n"
        "        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))\n\n"
        f"MODELS.register({name!r})(lambda recipe, num_classes, input_shape: _QANet())\n"
    )
    monkeypatch.setattr(cifarlab.plugins, "_loaded", {})
    try:
        assert cli.main(["--plugin", str(plugin), "predict", str(run.path), str(png), "--json"]) == 0
        (result,) = json.loads(capsys.readouterr().out)
        assert result["top_k"][0]["probability"] == pytest.approx(float(run.predict(data[2][1:2]).max()), abs=1e-5)
    finally:
        MODELS.unregister(name)
        for module in [m for m in sys.modules if m.startswith("cifarlab_plugin_qanet_plugin")]:
            sys.modules.pop(module)


# -- 2. registered callback names in fit(callbacks=...) ------------------------------------------------------------


def test_fit_takes_registered_callback_names_beside_instances(tmp_path):
    built, steps = [], []

    class Count(Callback):
        def on_train_batch_end(self, batch, logs=None):
            steps.append(batch)

    @CALLBACKS.register("qa_count", replace=True)
    def qa_count(recipe):
        built.append(recipe.name)
        return Count()

    seen = []

    class Mine(Callback):
        def on_train_begin(self, logs=None):
            seen.append("begin")

    try:
        run = cifarlab.fit("reference", data=_arrays(), callbacks=["qa_count", Mine()], runs_dir=tmp_path, **REF)
        assert built == ["reference"] and len(steps) == 2 and seen == ["begin"]  # 26 training images, batch 16
        assert json.loads((run.path / "config.json").read_text())["recipe"]["callbacks"] == ["qa_count"]
        for bad, needle in (
            (["qa_cuont"], r"'qa_cuont' is not a registered callback name \(registered: .*qa_count.*Callback instance"),
            ([3], r"3 is not a cifarlab.Callback instance nor a registered callback name"),
            ("qa_count", r"pass a list of cifarlab.Callback instances, not a str; .*names of registered callbacks"),
        ):
            with pytest.raises(UserError, match=needle):
                cifarlab.fit("reference", data=_arrays(), callbacks=bad, runs_dir=tmp_path / "refused", **REF)
        assert not (tmp_path / "refused").exists()
    finally:
        CALLBACKS.unregister("qa_count")


# -- 3. calibrate() and report() take data= ------------------------------------------------------------------------


def test_calibrate_and_report_of_an_in_memory_run_take_its_data(tmp_path, undrawn_figures):
    data = _arrays()
    run = cifarlab.fit("reference", data=data, runs_dir=tmp_path, **REF)
    loaded = cifarlab.load(run.path)
    for method in ("calibrate", "report"):
        with pytest.raises(UserError, match=rf"pass the same data, e.g. cifarlab.load\(run\).{method}\(data="):
            getattr(loaded, method)()
    t = loaded.calibrate(data=data)
    assert t > 0 and t == loaded.temperature == cifarlab.load(run.path).temperature
    assert loaded.report(data=data) == run.path / "report.html" and (run.path / "report.html").exists()
    assert (
        "calibrate(data_dir=None, off=False, *, data=None)" in (Path(__file__).parents[1] / "docs/API.md").read_text()
    )


# -- 4. what predict accepts --------------------------------------------------------------------------------------


def test_predict_takes_one_pil_image_and_an_empty_list_and_names_what_it_takes(tmp_path):
    x, y, xt, yt = _arrays()
    run = cifarlab.fit("reference", data=(x, y, xt, yt), runs_dir=tmp_path, **REF)
    image = Image.fromarray(xt[1].transpose(1, 2, 0))
    one = run.predict(image)
    assert (
        one.shape == (1, 2) and torch.allclose(one, run.predict([image])) and torch.allclose(one, run.predict(xt[1:2]))
    )
    assert tuple(run.predict([]).shape) == (0, 2) == tuple(run.predict(xt[:0]).shape)
    for bad in (None, 5):
        with pytest.raises(UserError, match=r"images: cannot use .*; pass uint8 \(0..255\) or float \(0..1\) arrays"):
            run.predict(bad)
    nan = xt[:3].astype(np.float32) / 255
    nan[2, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match=r"NaN pixels \(images 2\): .*np.nan_to_num\(images, nan=0.0\)"):
        run.predict(nan)


# -- 5. a fit that fails after creating its folder ----------------------------------------------------------------


class _NaNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3))) * float("nan")


def test_a_fit_that_did_not_finish_names_its_folder_and_the_status_it_records(tmp_path):
    try:
        with pytest.raises(UserError) as e:
            cifarlab.fit("reference", data=_arrays(), model=_NaNNet(), runs_dir=tmp_path, train_scales=(), **TINY)
        assert "user._NaNNet" in MODELS  # the folder it left records that name: it stays loadable in this session
    finally:
        MODELS.unregister("user._NaNNet")
    (folder,) = tmp_path.iterdir()
    status = json.loads((folder / "status.json").read_text())["status"]
    assert status == "crashed"
    msg = str(e.value)
    assert msg.startswith("training did not finish: crashed (training diverged): loss became nan")
    assert msg.endswith(f"Run folder: {folder}") and "(lr=...)" in msg and "--set" not in msg

    class Boom(Callback):
        def on_train_batch_end(self, batch, logs=None):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom") as crash:
        cifarlab.fit("reference", data=_arrays(), callbacks=[Boom()], runs_dir=tmp_path / "b", **REF)
    (left,) = (tmp_path / "b").iterdir()
    if sys.version_info >= (3, 11):
        assert crash.value.__notes__ == [f"cifarlab.fit: Run folder: {left} (status 'crashed')"]


# -- 6. Python's words ---------------------------------------------------------------------------------------------


def test_fit_and_evaluate_name_their_arguments_not_the_commands_options(tmp_path):
    data = _arrays()
    cases = (
        (dict(device="tpu"), ConfigError, r"^device='tpu' is not a device; use auto, cpu, cuda or cuda:N$"),
        (dict(init="nope.safetensors"), UserError, r"^init='nope.safetensors': no such run folder or weights file$"),
        (dict(runs_dir="/etc/hostname"), UserError, r"^runs_dir='/etc/hostname' is a file, not a folder$"),
    )
    for extra, kind, needle in cases:
        with pytest.raises(kind, match=needle):
            cifarlab.fit("reference", data=data, **{"runs_dir": tmp_path, **REF, **extra})
    run = cifarlab.fit("reference", data=data, runs_dir=tmp_path, **REF)
    small = tuple(a[:, :, :8, :8] if a.ndim == 4 else a for a in data)
    with pytest.raises(UserError, match=r"the run takes 3x16x16: pass the data the run was trained on \(data= or "):
        cifarlab.load(run.path).evaluate(data=small)
    with pytest.raises(ConfigError, match=r"^device='tpu' is not a device"):
        run.predict(data[2], device="tpu")
    # The command's own messages are unchanged
    from cifarlab.device import resolve_device

    with pytest.raises(ConfigError, match=r"^--device 'tpu' is not a device"):
        resolve_device("tpu")


@pytest.mark.parametrize(
    "cli,python",
    [
        (
            "--device cuda: CUDA is not available; use --device cpu",
            "device='cuda': CUDA is not available; use device='cpu'",
        ),
        ("lower the learning rate (--set lr=...) and retry", "lower the learning rate (lr=...) and retry"),
        ("pass its data folder (--data-dir; data_dir= in Python)", "pass its data folder (data_dir=)"),
        ("a writable --data-dir (data_dir= in Python) or", "a writable data_dir= or"),
        ("e.g. --set timm_name=resnet18 (timm_name='resnet18' in Python)", "e.g. timm_name='resnet18'"),
        ("--set train_scales= (cifarlab.fit: train_scales=())", "train_scales=()"),
        ("--budget cannot be combined", "budget= cannot be combined"),  # the next word is prose, not a value
        ("run `cifarlab report r --data-dir d` again", "run `cifarlab report r --data-dir d` again"),  # a command
    ],
)
def test_python_wording_rewrites_options_but_not_commands(cli, python):
    assert python_wording(cli) == python


# -- 7. TrainedRun.explain ----------------------------------------------------------------------------------------


def test_explain_gives_maps_for_arrays_and_the_commands_rows_for_files(tmp_path):
    pytest.importorskip("captum")
    from cifarlab.explain import saliency

    x, y, xt, yt = _arrays()
    run = cifarlab.fit("reference", data=(x, y, xt, yt), runs_dir=tmp_path / "runs", **REF)
    maps = run.explain(xt[:3])
    assert maps.shape == (3, 16, 16) and float(maps.min()) >= 0 and float(maps.max()) <= 1
    mean, std = run.run.normalization
    assert torch.equal(maps, saliency(run.get_model(), torch.from_numpy(xt[:3]), mean=mean, std=std))
    ig = run.explain(xt[:2], tmp_path / "maps", method="integrated_gradients", target="1", steps=4)
    assert ig.shape == (2, 16, 16)
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        "0.integrated_gradients.png",
        "1.integrated_gradients.png",
    ]
    png = tmp_path / "cat.png"
    Image.fromarray(xt[1].transpose(1, 2, 0)).save(png)
    rows = run.explain([png, tmp_path / "missing.png"], method="both")
    assert [r.get("method") for r in rows] == ["gradcam", "integrated_gradients", None]
    assert Path(rows[0]["written"]) == run.path / "explain" / "cat.gradcam.png" and "error" in rows[2]
    with pytest.raises(UserError, match="method='both' is for image files"):
        run.explain(xt[:1], method="both")
    with pytest.raises(UserError, match=r"^target='zz' is not one of the run's classes"):
        run.explain(xt[:1], target="zz")


# -- 8. stop_training, as docs/API.md says ------------------------------------------------------------------------


class _StopAt(Callback):
    def __init__(self, hook: str) -> None:
        self.hook, self.calls = hook, []

    def on_train_begin(self, logs=None):
        self.calls.append("train_begin")
        self.trainer.stop_training = self.hook == "on_train_begin"

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append("batch")
        self.trainer.stop_training = self.hook == "on_train_batch_end"

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(f"epoch_end {epoch}")

    def on_train_end(self, logs=None):
        self.calls.append("train_end")


def test_stop_training_stops_after_the_batch_and_records_the_partial_epoch(tmp_path):
    doc = " ".join((Path(__file__).parents[1] / "docs/API.md").read_text().split())
    assert "training stops after the current batch" in doc and "finishes with 0 epochs" in doc
    data = _arrays(64)  # 51 training images at batch 16: 4 batches per epoch, 2 epochs
    stop = _StopAt("on_train_batch_end")
    run = cifarlab.fit("reference", data=data, callbacks=[stop], runs_dir=tmp_path, **{**REF, "epochs": 2})
    assert stop.calls == ["train_begin", "batch", "epoch_end 0", "train_end"]
    assert len(run.history) == 1 and "partial_epoch" in run.history[0]["events"]
    assert json.loads((run.path / "status.json").read_text())["status"] == "finished"
    stop = _StopAt("on_train_begin")
    run = cifarlab.fit("reference", data=data, callbacks=[stop], runs_dir=tmp_path, **{**REF, "epochs": 2})
    assert stop.calls == ["train_begin", "train_end"] and run.history == []


def test_threads_sharing_a_loaded_run_explain_and_export_one_at_a_time(user_run, tmp_path):
    """Threads calling explain on one run loaded with `load(run, model=...)` shared its model instance: one
    thread's Grad-CAM hooks caught another's activations ("appears to not have been used in the graph"); threads
    exporting at once broke torch.onnx's process-wide state (QA round 3)."""
    pytest.importorskip("captum")
    from concurrent.futures import ThreadPoolExecutor

    run, data, _ = user_run
    loaded = cifarlab.load(run.path, model=_QANet())
    xt = data[2][:2]
    expected = loaded.explain(xt)
    with ThreadPoolExecutor(4) as pool:
        maps = list(pool.map(lambda _: loaded.explain(xt), range(8)))
    for m in maps:
        assert torch.allclose(m, expected)
    pytest.importorskip("onnx")
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda i: loaded.export("onnx", out=tmp_path / f"m{i}.onnx"), range(3)))
    assert all(p.is_file() and p.stat().st_size > 0 for p in outs)


def test_every_registry_is_exported_at_the_top_level():
    # ARCHITECTURE: `cifarlab` exports "the registries"; each by the name its messages use (`MODELS`, `CALLBACKS`)
    from cifarlab.registry import REGISTRIES

    for reg in REGISTRIES:
        assert getattr(cifarlab, reg.var) is reg
        assert reg.var in cifarlab.__all__
    assert cifarlab.CALLBACKS is CALLBACKS
