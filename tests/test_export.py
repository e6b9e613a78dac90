"""`cifarlab export`: ONNX and TorchScript reproduce the PyTorch probabilities with each TTA, dynamic batch,
metadata, and the files an export may not replace."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch

from _runfolder import CLASSES, make_run, tiny_recipe
from _synth import make_images
from cifarlab import __version__, cli, export
from cifarlab.inference import predict_proba
from cifarlab.runs import load_run

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
TOL = 1e-4


@pytest.fixture(scope="module", params=["reference_cnn", "airnet"])
def run_dir(request, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Both model families: the airnet has a whitening conv, GELU, global max pool and a scaled head, and a
    # standardizing normalization; the reference CNN has BatchNorm1d, Flatten and dropout.
    name = "fast" if request.param == "airnet" else "reference"
    return make_run(tmp_path_factory.mktemp("runs") / f"20260101-120000-{name}", tiny_recipe(request.param))


def images(n: int, seed: int = 3) -> torch.Tensor:
    """Structured images (bright squares, colour tints) mixed with plain noise, uint8 NCHW."""
    x, _ = make_images(n_per_class=(n + 3) // 4, n_classes=4, seed=seed)
    x = x[:n].clone()
    x[::3] = torch.randint(0, 256, x[::3].shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return x


def reference_probs(run_dir: Path, x: torch.Tensor, tta: str = "recipe") -> torch.Tensor:
    """What `predict` computes (in fp32): the run's TTA unless `tta` names another, at its temperature."""
    run = load_run(run_dir)
    mean, std = run.normalization
    tta = run.recipe.tta if tta == "recipe" else tta
    return predict_proba(
        run.build_model(), x, mean=mean, std=std, tta=tta, precision="fp32", temperature=run.temperature
    )


def test_the_run_fixtures_evaluate_with_different_ttas(run_dir: Path):
    """The parity tests below cover the recipe default for both TTA paths: none (reference) and 6 views (airnet)."""
    assert load_run(run_dir).recipe.tta == ("flip_translate" if run_dir.name.endswith("fast") else "none")


@pytest.mark.parametrize("tta", ["recipe", "none", "flip", "flip_translate"])
def test_onnx_reproduces_pytorch_probabilities(run_dir: Path, tmp_path: Path, tta: str):
    path = export.export_onnx(run_dir, tmp_path / "m.onnx", tta=tta)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    [inp] = session.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)"
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]  # dynamic batch
    assert onnx.load(str(path)).opset_import[0].version == 17
    recipe_tta = load_run(run_dir).recipe.tta
    assert export.read_onnx_metadata(path)["tta"] == (recipe_tta if tta == "recipe" else tta)
    for n in (1, 7, 64):  # the export's dummy batch is 2
        x = images(n, seed=n)
        expected = reference_probs(run_dir, x, tta)
        [got] = session.run(None, {"images": x.numpy()})
        assert got.shape == (n, len(CLASSES))
        diff = (torch.from_numpy(got) - expected).abs().max().item()
        assert diff <= TOL, diff
        assert torch.equal(torch.from_numpy(got).argmax(1), expected.argmax(1))
    assert expected.max() > 0.3  # not a near-uniform output that would hide a mismatch
    if tta != "none" and (tta != "recipe" or recipe_tta != "none"):  # the views matter: far more than TOL
        assert (expected - reference_probs(run_dir, x, "none")).abs().max() > 100 * TOL


@pytest.mark.parametrize("tta", ["recipe", "none", "flip_translate"])
def test_torchscript_reproduces_pytorch_probabilities_for_uint8_and_float(run_dir: Path, tmp_path: Path, tta: str):
    path = export.export_torchscript(run_dir, tmp_path / "m.pt", tta=tta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path))
    for n in (1, 9):
        x = images(n, seed=10 + n)
        expected = reference_probs(run_dir, x, tta)
        with torch.no_grad():
            for inp in (x, x.float()):
                diff = (module(inp) - expected).abs().max().item()
                assert diff <= TOL, diff
            assert torch.equal(inp, x.float())  # a float input is the caller's tensor: left as it was
    recipe_tta = load_run(run_dir).recipe.tta
    assert export.read_torchscript_metadata(path)["tta"] == (recipe_tta if tta == "recipe" else tta)


def test_metadata_records_classes_preprocessing_recipe_and_version(run_dir: Path, tmp_path: Path):
    run = load_run(run_dir)
    mean, std = run.normalization
    for meta in (
        export.read_onnx_metadata(export.export_onnx(run_dir, tmp_path)),
        export.read_torchscript_metadata(export.export_torchscript(run_dir, tmp_path)),
    ):
        assert json.loads(meta["class_names"]) == list(CLASSES)
        pre = json.loads(meta["preprocessing"])
        assert pre["mean"] == mean and pre["std"] == std and pre["scale"] == "x / 255"
        assert json.loads(meta["input"])["shape"] == ["batch", 3, 32, 32]
        assert json.loads(meta["input"])["range"] == [0, 255]
        assert meta["recipe"] == run.recipe.name and meta["cifarlab_version"] == __version__
        assert meta["tta"] == run.recipe.tta and meta["run"] == run_dir.name
    assert (tmp_path / "model.onnx").exists() and (tmp_path / "model.torchscript.pt").exists()


def _main(argv: list[str]) -> int:
    args = cli.build_parser(["runs", "predict", "export", "config"]).parse_args(argv)
    return args.func(args)


def test_cli_default_and_explicit_paths(tmp_path: Path, capsys):
    run_dir = make_run(tmp_path / "20260101-120000-reference", tiny_recipe())
    assert _main(["export", str(run_dir)]) == 0
    assert (run_dir / "model.onnx").exists() and "model.onnx" in capsys.readouterr().out
    out = tmp_path / "exports" / "ts.pt"
    assert _main(["export", str(run_dir), "--format", "torchscript", "--out", str(out)]) == 0
    assert out.exists()
    # A folder that does not exist yet, named with a trailing slash, is a folder (not a file named "new").
    assert _main(["export", str(run_dir), "--out", f"{tmp_path / 'new'}/"]) == 0
    assert (tmp_path / "new" / "model.onnx").is_file()


def test_cli_never_writes_over_the_runs_own_files_or_a_device(tmp_path: Path, capsys):
    """--out naming the run's weights or config would destroy the run; a device or a folder in the way is not a
    file to replace; any other file that is not an earlier export (notes, a photo, another run's weights) is
    someone's data. Each is one error line and leaves everything as it was; an earlier export is replaced, saying
    so."""
    run_dir = make_run(tmp_path / "20260101-120000-reference", tiny_recipe())
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    (tmp_path / "afile").write_text("x")
    for out, needle in (
        (run_dir / "model.safetensors", "is one of the run's own files"),
        (run_dir / "config.json", "is one of the run's own files"),
        (Path("/dev/null"), "is not a regular file"),
        (tmp_path / "afile" / "x.onnx", "cannot create the folder"),
    ):
        assert cli.main(["export", str(run_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert Path("/dev/null").is_char_device()
    other = make_run(tmp_path / "20260101-130000-reference", tiny_recipe())
    notes = tmp_path / "notes.onnx"
    notes.write_text("my notes")
    kept = {p: p.read_bytes() for p in (notes, other / "model.safetensors", other / "config.json")}
    for out, fmt in [(p, f) for p in kept for f in ("onnx", "torchscript")] + [(tmp_path / "afile", "onnx")]:
        assert cli.main(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"is not a cifarlab {fmt} export" in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in kept} == kept and (tmp_path / "afile").read_text() == "x"
    assert cli.main(["export", str(run_dir), "--out", ""]) == 2 and "--out is empty" in capsys.readouterr().err
    for fmt, name in (("onnx", "mine.onnx"), ("torchscript", "mine.pt")):
        mine = tmp_path / name
        assert cli.main(["export", str(run_dir), "--format", fmt, "--out", str(mine)]) == 0
        assert capsys.readouterr().out.startswith(f"wrote {mine}")
        assert cli.main(["export", str(run_dir), "--format", fmt, "--out", str(mine)]) == 0  # its own earlier export
        assert capsys.readouterr().out.startswith(f"replaced {mine}")
        other_fmt = "torchscript" if fmt == "onnx" else "onnx"  # an export of the other format is not replaced
        assert cli.main(["export", str(run_dir), "--format", other_fmt, "--out", str(mine)]) == 2
        assert f"is not a cifarlab {other_fmt} export" in capsys.readouterr().err
    # The format is what --format says; a name that says otherwise gets a warning, not a silent surprise.
    assert cli.main(["export", str(run_dir), "--format", "torchscript", "--out", str(tmp_path / "ts.onnx")]) == 0
    assert "holds a TorchScript model, though its name ends in '.onnx', not .pt\n" in capsys.readouterr().err


def test_cli_export_says_which_folders_it_created_and_words_the_suffix_warning(tmp_path: Path, capsys):
    """`--out exports/newdir` (no suffix) said "though its name ends in 'no suffix'"; missing parent folders were
    created without a word."""
    run_dir = make_run(tmp_path / "20260101-120000-reference", tiny_recipe())
    out = tmp_path / "exports" / "new" / "model"
    assert cli.main(["export", str(run_dir), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"warning: {out} holds an ONNX model, though its name has no .onnx suffix\n"
    assert captured.out.startswith(f"wrote {out} (created the folder {tmp_path / 'exports'}) (")
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "exports" / "again.onnx")]) == 0
    assert "created the folder" not in capsys.readouterr().out  # it exists now


def test_cli_tta_option_and_summary(tmp_path: Path, capsys):
    """The graph holds the recipe's TTA unless --tta says otherwise; the metadata and the summary line say which."""
    run_dir = make_run(tmp_path / "20260101-120000-fast", tiny_recipe("airnet").replace(tta="flip"))
    x = images(5, seed=21)
    for tta, words in (
        ([], "of TTA flip (2 forward passes, as the run evaluates)"),
        (["--tta", "recipe"], "of TTA flip (2 forward passes, as the run evaluates)"),
        (["--tta", "none"], "without TTA (the run evaluates with TTA flip)"),
        (["--tta", "flip_translate"], "of TTA flip_translate (6 forward passes, the run evaluates with TTA flip)"),
    ):
        out = tmp_path / f"{'-'.join(tta) or 'default'}.onnx"
        assert cli.main(["export", str(run_dir), "--out", str(out), *tta]) == 0
        line = capsys.readouterr().out
        assert words in line and line.count("\n") == 1, line
        in_graph = tta[-1] if tta and tta[-1] != "recipe" else "flip"
        assert export.read_onnx_metadata(out)["tta"] == in_graph
        [got] = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})
        assert (torch.from_numpy(got) - reference_probs(run_dir, x, in_graph)).abs().max() <= TOL
    plain = make_run(tmp_path / "20260101-130000-reference", tiny_recipe())  # tta none: nothing to say
    assert cli.main(["export", str(plain)]) == 0
    line = capsys.readouterr().out
    assert "output softmax probabilities; class names" in line and "TTA" not in line, line
    with pytest.raises(SystemExit) as exc:  # argparse's usage error
        cli.main(["export", str(plain), "--tta", "sideways"])
    assert exc.value.code == 2 and "invalid choice: 'sideways'" in capsys.readouterr().err


def test_cli_refuses_to_replace_another_runs_export_in_its_folder(tmp_path: Path, capsys):
    """`--out runs/B/model.onnx` while exporting run A replaced B's own export (a cifarlab export, so it looked
    replaceable): what `serve --backend onnx` and anyone using B would then pick up. Refused in one line naming
    both runs; the same run's export there, and another run's export outside a run folder, are still replaced."""
    a = make_run(tmp_path / "runs" / "20260101-120000-fast", tiny_recipe("airnet"), seed=1)
    b = make_run(tmp_path / "runs" / "20260101-130000-reference", tiny_recipe(), seed=2)
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.torchscript.pt")):
        assert cli.main(["export", str(b), "--format", fmt]) == 0
        capsys.readouterr()
        kept = (b / name).read_bytes()
        for out in (str(b / name), f"{b}/"):  # the file, or B's folder (its default name inside)
            assert cli.main(["export", str(a), "--format", fmt, "--out", out]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert f"is run {b.name}'s own export; exporting run {a.name} would replace it" in err, err
            assert f"Give another path (default: {a / name})" in err, err
        assert (b / name).read_bytes() == kept
    # A's export that was put in B's folder is A's to replace.
    (b / "model.onnx").unlink()
    assert cli.main(["export", str(a), "--out", str(b / "model.onnx")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {b / 'model.onnx'} (")
    assert cli.main(["export", str(a), "--out", str(b / "model.onnx")]) == 0
    assert capsys.readouterr().out.startswith(f"replaced {b / 'model.onnx'} (")
    assert export.read_onnx_metadata(b / "model.onnx")["run"] == a.name
    c = make_run(tmp_path / "runs" / "20260101-140000-reference", tiny_recipe(), seed=3)  # a third run may not
    assert cli.main(["export", str(c), "--out", str(b / "model.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"is run {a.name}'s export in run {b.name}'s folder; exporting run {c.name} would replace it" in err, err
    # Outside a run folder (a deployment path), one run's export replaces another's, saying whose it was.
    shared = tmp_path / "exports" / "deploy.onnx"
    assert cli.main(["export", str(b), "--out", str(shared)]) == 0
    capsys.readouterr()
    assert cli.main(["export", str(a), "--out", str(shared)]) == 0
    assert capsys.readouterr().out.startswith(f"replaced {shared} (it held run {b.name}'s export) (")
    assert export.read_onnx_metadata(shared)["run"] == a.name


def test_cli_missing_weights_is_a_user_error(tmp_path: Path, capsys):
    run_dir = make_run(tmp_path / "run", tiny_recipe())
    (run_dir / "model.safetensors").unlink()
    assert cli.main(["export", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is missing" in err and "Traceback" not in err


def test_parity_benchmark_script(tmp_path: Path, tiny_cifar10, capsys):
    """benchmarks/check_export_parity.py on a tiny official-layout archive (the lead runs it on real data)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "check_export_parity.py"
    spec = importlib.util.spec_from_file_location("check_export_parity", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run_dir = make_run(tmp_path / "run", tiny_recipe("airnet"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny archive's MD5 is not the official one
        rc = mod.main([str(run_dir), "--data-dir", str(tiny_cifar10.data_dir), "--n", "10"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "onnx" in out and "torchscript" in out and "max abs diff" in out
    assert "(TTA flip_translate)" in out  # the recipe's, as the exports hold it
