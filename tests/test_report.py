"""The run report: files, content (every class, every metric), metrics.json merge, self-containment, the
computed reading, the `cifarlab report` command. Fake run folders: a tiny random-init model, synthetic data."""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import json
import re
import shutil
import types
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from _runfolder import CLASSES, make_run, tiny_recipe
from cifarlab import cli
from cifarlab.data import Dataset
from cifarlab.evaluate import evaluate_predictions
from cifarlab.recipes import Recipe
from cifarlab.report import (
    FIGURES,
    Bullets,
    Document,
    Paragraph,
    Section,
    Table,
    build_report,
    plain_reading,
    render_html,
    render_markdown,
)
from cifarlab.report.common import png_size
from cifarlab.runs import CONFIG, METRICS, machine_info, read_json, write_history, write_json
from conftest import skip_rasterizing

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_dataset(classes: tuple[str, ...] = CLASSES, n_train: int = 200, n_test: int = 300) -> Dataset:
    g = torch.Generator().manual_seed(0)
    k = len(classes)
    return Dataset(
        name="synthetic",
        classes=classes,
        x_train=torch.randint(0, 256, (n_train, 3, 32, 32), generator=g, dtype=torch.uint8),
        y_train=torch.arange(n_train) % k,
        x_test=torch.randint(0, 256, (n_test, 3, 32, 32), generator=g, dtype=torch.uint8),
        y_test=torch.arange(n_test) % k,
        source="synthetic",
        checksum="synthetic-md5",
        cache_dir="",
    )


def fake_history(n: int = 5, with_val: bool = True) -> list[dict]:
    rows, lr = [], 1e-3
    for e in range(1, n + 1):
        events = []
        if with_val:
            events += ["best"] if e in (1, 3) else []
            events += ["lr_reduced"] if e == 2 else []
            events += ["early_stop", "restored_best"] if e == n else []
        row = {
            "epoch": e,
            "loss": 2.0 / e,
            "accuracy": 0.3 + 0.05 * e,
            "val_loss": (2.1 / e + 0.05 * max(0, e - 3)) if with_val else None,
            "val_accuracy": (0.28 + 0.045 * e) if with_val else None,
            "lr": lr,
            "epoch_seconds": 61.5,
            "events": events,
        }
        if "lr_reduced" in events:
            lr /= 2
            row["new_lr"] = lr
        rows.append(row)
    return rows


def make_report_run(
    tmp_path: Path,
    val_fraction: float = 0.2,
    dataset_name: str = "synthetic",
    history: bool = True,
    recipe: Recipe | None = None,
    steps: bool = False,
    corruptions: bool = False,
    classes: tuple[str, ...] = CLASSES,
) -> tuple[Path, Dataset]:
    """A run folder as training leaves it (config, history, metrics, weights) and the data it 'trained' on;
    `steps`: with steps.csv (StepLog), `corruptions`: with eval_corruptions.json (evaluate --corruptions).
    Tests that do not need ten classes take four: a report of 4 classes draws its figures ~30% faster."""
    recipe = recipe or tiny_recipe()
    if val_fraction == 0:
        recipe = recipe.replace(val_fraction=0.0, schedule="onecycle", early_stopping_patience=0)
    run_dir = make_run(tmp_path / "20260101-120000-reference", recipe, classes=classes)
    ds = synthetic_dataset(classes=classes)
    n = len(ds.y_train)
    n_val = round(n * val_fraction)
    config = read_json(run_dir / CONFIG)
    config.update(
        {
            "dataset": {
                "name": dataset_name,
                "classes": list(classes),
                "source": "synthetic",
                "checksum": ds.checksum if dataset_name == "synthetic" else "",
                "n_train": n - n_val,
                "n_val": n_val,
                "n_test": len(ds.y_test),
                "split": {"val_fraction": val_fraction, "seed": recipe.seed, "stratified": False},
            },
            "machine": machine_info(),
            "command": "cifarlab train --recipe reference",
        }
    )
    write_json(run_dir / CONFIG, config)
    if history:
        write_history(run_dir, fake_history(with_val=val_fraction > 0))
        write_json(
            run_dir / METRICS,
            {
                "status": "finished",
                "test_accuracy": 0.123,  # training's number: the report must keep it
                "test_loss": 2.5,
                "epochs_run": 5,
                "best_epoch": 3 if val_fraction else None,
                "stopped_epoch": 5 if val_fraction else None,
                "restored_epoch": 3 if val_fraction else None,
                "timings": {"data_seconds": 1.5, "train_seconds": 307.5, "eval_seconds": 2.0},
                "training_step": "CUDA graph (2 captures)",
            },
        )
    if steps:
        write_steps(run_dir)
    if corruptions:
        write_json(run_dir / "eval_corruptions.json", CORRUPTIONS)
    return run_dir, ds


STEPS_PER_EPOCH, N_EPOCHS = 7, 5
# JSON severity keys are strings, as `cifarlab evaluate --corruptions` writes them
CORRUPTIONS = {
    "clean_accuracy": 0.8,
    "n": 300,
    "seed": 0,
    "results": {
        "gaussian_noise": {"1": 0.7, "2": 0.6, "3": 0.5},
        "fog": {"1": 0.75, "2": 0.7, "3": 0.65},
        "pixelate": {"1": 0.6, "2": 0.4, "3": 0.2},  # the most damaging: mean 40%
    },
    "mean_accuracy": 0.5667,
    "relative_drop": 1 - 0.5667 / 0.8,
}


def write_steps(run_dir: Path, n_epochs: int = N_EPOCHS, per_epoch: int = STEPS_PER_EPOCH) -> int:
    """steps.csv as StepLog writes it: a linear warmup over the first epoch, then a decay; returns the steps."""
    lines = ["step,epoch,lr,loss"]
    n = n_epochs * per_epoch
    for s in range(1, n + 1):
        lr = 1e-3 * min(1.0, s / per_epoch) * (1 - (s - 1) / n)
        lines.append(f"{s},{(s - 1) // per_epoch + 1},{lr},{2.5 - 1.5 * s / n + 0.1 * (s % 3)}")
    (run_dir / "steps.csv").write_text("\n".join(lines) + "\n")
    return n


@pytest.fixture(scope="module")
def built(report_built: tuple[Path, dict]) -> tuple[Path, dict]:
    """The full report (steps.csv and eval_corruptions.json too), built once per session (conftest.py); tests read
    it, and copy it (`copy_run`) before changing anything."""
    return report_built


def copy_run(run_dir: Path, dest_parent: Path) -> Path:
    """A copy of a run folder (its report included), to change without touching the shared one."""
    return Path(shutil.copytree(run_dir, dest_parent / run_dir.name))


def test_report_files_exist(built):
    run_dir, metrics = built
    assert (run_dir / "report.html").stat().st_size > 10_000
    assert (run_dir / "report.md").stat().st_size > 1_000
    # every figure but the per-epoch LR, which steps.csv's per-step curves replace; 3 confused pairs
    assert set(metrics["report"]["plots"]) == set(FIGURES) - {"lr"}
    for rel in metrics["report"]["plots"].values():
        data = (run_dir / rel).read_bytes()
        assert data.startswith(PNG_MAGIC), rel
    assert json.loads((run_dir / METRICS).read_text()) == json.loads(json.dumps(metrics))


def _number_strings(ev: dict) -> list[str]:
    """How the report prints each headline and per-class number."""
    out = [
        f"{ev['accuracy'] * 100:.2f}%",
        f"{ev['top5_accuracy'] * 100:.2f}%",
        f"{ev['loss']:.4f}",
        f"{ev['calibration']['ece'] * 100:.2f}%",
        f"{ev['macro_avg']['f1']:.4f}",
        f"{ev['weighted_avg']['f1']:.4f}",
        f"{ev['balanced_accuracy'] * 100:.2f}%",
    ]
    for m in ev["per_class"].values():
        out += [f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}"]
    return out


def test_report_contains_every_class_and_metric(built):
    run_dir, metrics = built
    ev = metrics["evaluation"]
    html_text = (run_dir / "report.html").read_text()
    md_text = (run_dir / "report.md").read_text()
    for text in (html_text, md_text):
        for c in CLASSES:
            assert c in text
        for s in _number_strings(ev):
            assert s in text, s
        for heading in (
            "Summary",
            "Training",
            "Test results",
            "Per-class",
            "Confusions",
            "Calibration",
            "mistakes",
            "Data and augmentation",
            "Config",
            "Machine",
            "Why: the most confused pairs",
            "Top losses",
            "Least certain predictions",
            "Model",
            "Robustness",
        ):
            assert heading in text, heading
        for word in ("top-5", "macro avg", "weighted avg", "support", "expected calibration error", "learning rate"):
            assert word in text, word
        assert "LR → 0.0005 after this epoch" in text and "early stop" in text
        assert "synthetic-md5" in text  # dataset checksum
        assert "307.5 s" in text  # training wall time
        assert "torch" in text and machine_info()["cpu"] in text
        for sentence in metrics["report"]["reading"]:
            assert sentence in text or sentence.replace("&", "&amp;") in text
    # every recipe field is in the config table
    for key in read_json(run_dir / CONFIG)["recipe"]:
        assert f"<td>{key}</td>" in html_text


def test_metrics_json_keeps_training_keys_and_adds_every_number(built):
    run_dir, metrics = built
    saved = json.loads((run_dir / METRICS).read_text())
    assert saved["test_accuracy"] == 0.123  # training's keys untouched
    assert saved["test_loss"] == saved["evaluation"]["loss"]  # but the loss is the report's (at its temperature)
    assert saved["timings"]["train_seconds"] == 307.5 and saved["restored_epoch"] == 3
    ev = saved["evaluation"]
    for key in (
        "loss",
        "accuracy",
        "top5_accuracy",
        "confusion_matrix",
        "confusion_matrix_normalized",
        "per_class",
        "macro_avg",
        "weighted_avg",
        "top_confusions",
        "confused_pairs",
        "calibration",
        "split",
        "dataset",
    ):
        assert key in ev, key
    assert set(ev["per_class"]) == set(CLASSES)
    assert saved["test_top5_accuracy"] == ev["top5_accuracy"] and saved["test_ece"] == ev["calibration"]["ece"]
    assert saved["history"][1]["events"] == ["lr_reduced"]
    assert saved["run"]["machine"]["torch"] == torch.__version__
    for rel in saved["report"]["plots"].values():
        assert (run_dir / rel).is_file()
    assert len(saved["report"]["most_confident_mistakes"]) == min(24, round((1 - ev["accuracy"]) * ev["n"]))


def test_html_is_self_contained(built):
    run_dir, metrics = built
    text = (run_dir / "report.html").read_text()
    assert not re.search(r"https?://", text)
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text
    assert not re.search(r"url\(", text)
    for attr, value in re.findall(r"""\b(src|href|srcset|action|poster)\s*=\s*["']?([^"' >]*)""", text, re.I):
        assert (attr == "src" and value.startswith("data:image/png;base64,")) or (
            attr == "href" and value.startswith("#")
        ), (attr, value[:40])
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)" width="(\d+)" height="(\d+)"', text)
    assert len(images) == len(metrics["report"]["plots"]) == text.count("<img ")
    for b64, width, height in images:
        data = base64.b64decode(b64)
        assert data.startswith(PNG_MAGIC)
        # saved at 2x (sharp on high-resolution screens), shown at 1x
        w, h = png_size(data)
        assert abs(w - 2 * int(width)) <= 1 and abs(h - 2 * int(height)) <= 1, (w, h, width, height)
    # section anchors exist for every nav link
    for target in re.findall(r'href="#([^"]+)"', text):
        assert f'id="{target}"' in text


def test_markdown_links_the_plots(built):
    run_dir, metrics = built
    md = (run_dir / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(metrics["report"]["plots"].values())
    assert all((run_dir / link).is_file() for link in links)
    assert "| epoch |" in md  # table 1


@pytest.fixture(scope="module")
def rebuilt(built, once) -> types.SimpleNamespace:
    """A copy of the built run, rebuilt by `cifarlab report` on other data with the same classes (a warning), then
    by `build_report` on its own data again; the report files and the command's output of each build are kept.
    Built once (conftest.Once)."""
    import dataclasses

    def build(parent: Path) -> types.SimpleNamespace:
        run_dir = copy_run(built[0], parent)
        other = dataclasses.replace(synthetic_dataset(), checksum="other-md5", source="elsewhere")
        with pytest.MonkeyPatch.context() as mp, _captured() as (out, err):
            skip_rasterizing(mp)  # what the report says is under test here, not its pixels
            mp.setattr("cifarlab.evaluate.load_run_dataset", lambda run, data_dir=None: other)
            rc = cli.main(["report", str(run_dir)])
            on_other = read_json(run_dir / METRICS)
            other_html, other_md = (run_dir / "report.html").read_text(), (run_dir / "report.md").read_text()
            warned: list[str] = []
            again = build_report(run_dir, dataset=synthetic_dataset(), on_warning=warned.append)
        return types.SimpleNamespace(
            run_dir=run_dir,
            rc=rc,
            out=out.getvalue(),
            err=err.getvalue(),
            warned=warned,
            on_other=on_other,
            other_html=other_html,
            other_md=other_md,
            again=again,
        )

    return once("rebuilt", build)


@contextlib.contextmanager
def _captured() -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """stdout and stderr of the block (for a module-scoped fixture, which cannot use capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield out, err


def test_rebuilding_is_idempotent(built, rebuilt):
    _, first = built
    again = rebuilt.again  # rebuilt on its own data (after a build on other data)
    assert again["evaluation"]["accuracy"] == first["evaluation"]["accuracy"]
    assert again["evaluation"]["per_class"] == first["evaluation"]["per_class"]
    assert again["test_accuracy"] == 0.123
    assert "evaluation" not in again["evaluation"]  # merging does not nest reports in reports
    assert again["report"]["reading"] == first["report"]["reading"]


NOVAL_CLASSES = CLASSES[:4]


@pytest.fixture(scope="module")
def noval_airnet(once) -> tuple[Path, Recipe, dict]:
    """An airnet run (flip_translate) of 4 classes trained without validation; no steps.csv, no
    eval_corruptions.json. The full-disk tests rebuild copies of it."""
    recipe = tiny_recipe("airnet")

    def build(parent: Path) -> tuple[Path, Recipe, dict]:
        run_dir, ds = make_report_run(parent, recipe=recipe, val_fraction=0.0, classes=NOVAL_CLASSES)
        with pytest.MonkeyPatch.context() as mp:
            skip_rasterizing(mp)  # its figures that differ from the full report's are drawn by the test below
            return run_dir, recipe, build_report(run_dir, dataset=ds, split="test")

    return once("noval", build)


def test_figures_of_a_run_without_validation_are_drawn() -> None:
    """What a run without validation draws differently (training curves alone, the per-epoch LR where there is
    no steps.csv) and airnet's flip+translate augmentation, rasterized for real at the report's size."""
    import matplotlib

    from cifarlab.report import figures

    history = fake_history(4, with_val=False)
    ds = synthetic_dataset(classes=NOVAL_CLASSES)
    with matplotlib.rc_context(figures.STYLE):  # type: ignore[arg-type]
        drawn = {
            "curves": figures.plot_curves(history, {}, {"accuracy": 0.5, "loss": 1.2}),
            "lr": figures.plot_lr(history),
            "augment": figures.plot_augment(ds.x_train, ds.y_train, NOVAL_CLASSES, tiny_recipe("airnet")),
        }
        for key, fig in drawn.items():
            size = tuple(round(v * figures.SAVE_DPI) for v in fig.get_size_inches())
            assert png_size(figures.png_bytes(fig)) == size, key
    assert [line.get_label() for line in drawn["curves"].axes[0].get_lines()][:1] == ["train accuracy"]
    assert not any("validation" in str(line.get_label()) for ax in drawn["curves"].axes for line in ax.get_lines())


@pytest.fixture(scope="module")
def nohist_noaug_val(once) -> tuple[Path, Recipe, dict]:
    """A reference run without augmentation and without history.json or metrics.json, reported on its
    validation split (40 of the 200 training images)."""
    recipe = tiny_recipe().replace(augment="none")

    def build(parent: Path) -> tuple[Path, Recipe, dict]:
        run_dir, ds = make_report_run(parent, recipe=recipe, history=False)
        with pytest.MonkeyPatch.context() as mp:
            skip_rasterizing(mp)  # its tests read what the report says; the other fixtures draw for real
            return run_dir, recipe, build_report(run_dir, dataset=ds, split="val")

    return once("nohist", build)


def test_run_without_validation(noval_airnet):
    run_dir, _, metrics = noval_airnet
    header = next(line for line in (run_dir / "report.md").read_text().splitlines() if line.startswith("| epoch |"))
    assert "val_loss" not in header and "learning rate" in header
    assert metrics["evaluation"]["split"] == "test"
    # an older run: no steps.csv -> the per-epoch LR curve; no eval_corruptions.json -> no robustness section
    assert "lr" in metrics["report"]["plots"] and "steps" not in metrics["report"]["plots"]
    assert metrics["report"]["steps"] is None and metrics["report"]["robustness"] is None
    assert "robustness" not in metrics["report"]["plots"]
    html_text = (run_dir / "report.html").read_text()
    assert 'id="robustness"' not in html_text and "Robustness" not in (run_dir / "report.md").read_text()
    assert "Robustness:" not in " ".join(metrics["report"]["reading"])
    assert "| training step | CUDA graph (2 captures) |" in (run_dir / "report.md").read_text()  # training's record


def test_run_without_history(nohist_noaug_val):
    run_dir, _, metrics = nohist_noaug_val
    assert "curves" not in metrics["report"]["plots"]
    assert "no training history" in (run_dir / "report.html").read_text()


@pytest.mark.parametrize("kind,run", [("flip_translate", "noval_airnet"), ("none", "nohist_noaug_val")])
def test_other_augmentations_and_models(request, kind: str, run: str):
    run_dir, recipe, metrics = request.getfixturevalue(run)
    assert recipe.augment == kind
    assert (run_dir / "plots" / FIGURES["augment"]).read_bytes().startswith(PNG_MAGIC)
    assert metrics["evaluation"]["inference"]["tta"] == recipe.tta


def test_val_split_report(nohist_noaug_val):
    run_dir, _, metrics = nohist_noaug_val
    assert metrics["evaluation"]["split"] == "val" and metrics["evaluation"]["n"] == 40
    assert "Val results" in (run_dir / "report.html").read_text()


def test_reading_is_computed_from_the_numbers():
    # Invented class names: nothing about them can be hard-coded.
    classes = ["ant", "bee", "cow", "eel", "fox", "gnu", "hen", "yak"]
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(8), 100)
    pred = y.copy()
    # eel (3) is the weakest: 40% taken for fox (4), 10% for ant; fox is next (low precision: 40 eels called fox)
    pred[300:340] = 4
    pred[340:350] = 0
    pred[500:520] = 6
    z = rng.normal(0, 0.1, (len(y), 8))
    z[np.arange(len(y)), pred] += 5.0
    ev = evaluate_predictions(y, z, classes)
    assert ev.split is None and ev.split_name == "test"
    history = fake_history(5)
    reading = plain_reading(ev, history, {"restored_epoch": 3})
    text = " ".join(reading)
    assert "Weak: eel" in text and "fox (40%)" in text and "ant (10%)" in text
    assert "Weak: fox" in text and "over-predicts this class" in text and "eel (40)" in text
    assert "eel ↔ fox: 40 mistakes" in text
    assert "over-confident" in text  # ~99% confident, 91% right
    assert "at least 90% confidence (100% of images) are right 91.2% of the time" in text
    assert "reduced after epoch 2" in text and "early stopping ended it after epoch 5" in text
    assert "epoch 3" in text  # the restored weights' train/val accuracy is the one compared
    for c in ("ant", "bee", "cow", "gnu", "hen", "yak"):
        assert f"Weak: {c}" not in text
    # Renaming the classes renames the reading: the text follows the data, not a list of names.
    renamed = evaluate_predictions(y, z, [c.upper() for c in classes])
    assert "Weak: EEL" in " ".join(plain_reading(renamed, [], {}))


def test_html_escapes_names():
    blocks = (Paragraph('a <script>alert("x")</script> b'), Bullets(("<img src=x>",)), Table(("<th>",), (("<td>&",),)))
    doc = Document("t<i>", "meta", (Section("s", "Section <1>", blocks),), warnings=("<b>w</b>",))
    text = render_html(doc, {})
    assert "<script>" not in text and "<img src=x>" not in text and "&lt;td&gt;&amp;" in text
    assert "<b>w</b>" not in text and "&lt;b&gt;w&lt;/b&gt;" in text
    md = render_markdown(Document("t", "m", (Section("s", "S", (Table(("a|b",), (("c|d",),)),)),)), {})
    assert "a\\|b" in md and "c\\|d" in md


def test_report_command(tmp_path: Path, tiny_cifar10, capsys, undrawn_figures):
    run_dir, _ = make_report_run(tmp_path / "run", dataset_name="cifar10")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny archive's MD5 is not the official one
        assert cli.main(["report", str(run_dir), "--data-dir", str(tiny_cifar10.data_dir)]) == 0
    out = capsys.readouterr().out
    assert str(run_dir / "report.html") in out and "test accuracy" in out
    assert (run_dir / "report.html").is_file()
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_training_writes_the_report(tmp_path: Path, undrawn_figures):
    """`run_experiment` (what `cifarlab train` runs) ends with the report; its test numbers are the evaluation's."""
    from _synth import make_dataset
    from cifarlab.experiment import run_experiment

    recipe = tiny_recipe().replace(epochs=2, batch_size=32, precision="fp32", bn_momentum=0.1)
    res = run_experiment(recipe, dataset=make_dataset(20, 10), runs_root=tmp_path, quiet=True)
    assert res.status == "finished"
    saved = json.loads((res.run_dir / METRICS).read_text())
    assert "steps" in saved["report"]["plots"] and "lr" not in saved["report"]["plots"]  # StepLog wrote steps.csv
    assert saved["report"]["steps"]["n"] == len((res.run_dir / "steps.csv").read_text().splitlines()) - 1
    for name in ("report.html", "report.md", *saved["report"]["plots"].values()):
        assert (res.run_dir / name).is_file(), name
    assert saved["evaluation"]["accuracy"] == pytest.approx(saved["test_accuracy"], abs=1e-6)
    assert saved["evaluation"]["loss"] == pytest.approx(saved["test_loss"], rel=1e-4)
    assert saved["timings"]["report_seconds"] > 0 and saved["epochs_run"] == 2
    # The report reuses the run's test logits: its inference row says so, with the evaluation's own time.
    took = f"({saved['timings']['eval_seconds']:.1f} s)"
    row = next(line for line in (res.run_dir / "report.md").read_text().splitlines() if line.startswith("| inference"))
    assert "the logits of the run's evaluation at the end of training " + took in row, row


# -- reliability: full disk, Markdown injection, data that is not the run's ------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_keeps_the_old_report_and_is_one_line(
    noval_airnet, tmp_path: Path, monkeypatch, capsys, undrawn_figures
):
    run_dir, ds = copy_run(noval_airnet[0], tmp_path), synthetic_dataset(classes=NOVAL_CLASSES)
    old_html = (run_dir / "report.html").read_bytes()
    old_md = (run_dir / "report.md").read_bytes()
    (run_dir / "report.html").write_bytes(old_html + b"<!-- old -->")  # mark the old file
    old_html += b"<!-- old -->"
    monkeypatch.setattr("cifarlab.evaluate.load_run_dataset", lambda run, data_dir=None: ds)
    monkeypatch.setattr("os.replace", _enospc)  # every atomic write fails at its rename
    assert cli.main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot write ") and "Traceback" not in err
    assert "No space left on device" in err and str(run_dir / "plots") in err  # names the file
    assert (run_dir / "report.html").read_bytes() == old_html and (run_dir / "report.md").read_bytes() == old_md
    assert not [p for p in run_dir.rglob(".*.tmp")]  # no temp files left behind


def test_full_disk_on_report_html_names_it(noval_airnet, tmp_path: Path, monkeypatch, capsys, undrawn_figures):
    import cifarlab.files

    run_dir, ds = copy_run(noval_airnet[0], tmp_path), synthetic_dataset(classes=NOVAL_CLASSES)
    old_html = (run_dir / "report.html").read_bytes()
    real = cifarlab.files.atomic_write_bytes

    def failing(path, data):
        if Path(path).name == "report.html":
            _enospc()
        real(path, data)

    monkeypatch.setattr(cifarlab.files, "atomic_write_bytes", failing)
    monkeypatch.setattr("cifarlab.evaluate.load_run_dataset", lambda run, data_dir=None: ds)
    assert cli.main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: cannot write {run_dir / 'report.html'}: No space left on device\n"
    assert (run_dir / "report.html").read_bytes() == old_html


EVIL_CLASSES = ("a|b*<script>", "c_d`e", "[x](y)", "new\nline", "$\\notacommand$")


@pytest.fixture(scope="module")
def evil_without_captum(once) -> tuple[Path, dict]:
    """A run whose class names are Markdown and HTML, reported where Captum cannot be imported (one build for
    two independent checks: the names' escaping, and the report without saliency)."""
    import sys

    def build(parent: Path) -> tuple[Path, dict]:
        run_dir = make_run(parent / "20260101-120000-reference", tiny_recipe(), EVIL_CLASSES)
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "captum", None)  # import captum -> ImportError
            mp.setitem(sys.modules, "captum.attr", None)
            return run_dir, build_report(run_dir, dataset=synthetic_dataset(classes=EVIL_CLASSES))

    return once("evil", build)


def test_markdown_escapes_names_from_the_data(evil_without_captum):
    run_dir, _ = evil_without_captum
    md = (run_dir / "report.md").read_text()
    assert "a\\|b\\*\\<script\\>" in md and "<script>" not in md and "a|b" not in md
    assert "c\\_d\\`e" in md and "\\[x\\](y)" in md and "new\\\\x0aline" in md
    # the per-class table row of the evil class still has its 5 cells: no cell broke out of the table
    row = next(ln for ln in md.splitlines() if ln.startswith("| a\\|b"))
    assert len(re.findall(r"(?<!\\)\|", row)) == 6, row
    html_text = (run_dir / "report.html").read_text()
    assert "<script>" not in html_text and "a|b*&lt;script&gt;" in html_text
    # Not mathtext in the figures (it crashed drawing them: matplotlib has no \notacommand), not math in the Markdown
    assert "\\$\\\\notacommand\\$" in md and "$\\notacommand$" in html_text


def test_other_data_is_said_first_and_draws_no_overfitting_conclusion(rebuilt):
    metrics = rebuilt.on_other
    # `cifarlab report` says it first, once, and still reports
    assert rebuilt.rc == 0 and "test accuracy" in rebuilt.out
    err = rebuilt.err
    assert err.startswith("warning: the data evaluated") and "not the data this run was trained on" in err
    assert rebuilt.err.count("warning:") == 1
    assert metrics["evaluation"]["dataset"]["checksum_matches_run"] is False
    reading = " ".join(metrics["report"]["reading"])
    assert "overfitting" not in reading.replace("No conclusion about overfitting", "")
    assert "No conclusion about overfitting or generalisation" in reading
    html_text = rebuilt.other_html
    box = html_text.index('class="warning"')
    assert box < html_text.index("<nav>") and box < html_text.index('id="summary"')
    assert "not the data this run was trained on" in html_text[box : box + 600]
    first = [ln for ln in rebuilt.other_md.splitlines() if ln.strip()][1]  # right after the title
    assert first.startswith("> **Warning:**") and "not the data this run was trained on" in first
    # the same run rebuilt on its own data: no warning, the usual conclusion
    assert rebuilt.warned == []
    assert "overfitting" in " ".join(rebuilt.again["report"]["reading"])
    assert 'class="warning"' not in (rebuilt.run_dir / "report.html").read_text()
    assert "> **Warning:**" not in (rebuilt.run_dir / "report.md").read_text()


# -- the "why" sections (issue #11) -------------------------------------------------------------------------------


def test_report_build_time_on_a_tiny_run(built, capsys):
    _, metrics = built
    t = metrics["report"]["timings"]
    with capsys.disabled():
        print(
            f"\nreport build on a tiny run (300 test images): {t['total_seconds']:.1f} s total "
            f"(evaluate {t['evaluate_seconds']:.1f} s, saliency {t['saliency_seconds']:.1f} s, model FLOPs and "
            f"latency {t['model_seconds']:.1f} s, figures {t['plots_seconds']:.1f} s)"
        )
    assert t["total_seconds"] < 180  # generous: busy CI machines; about 20-30 s on two busy cores


def test_confused_pair_galleries_are_bounded_and_explained(built):
    from cifarlab.report.insights import PER_DIRECTION

    run_dir, metrics = built
    ev = metrics["evaluation"]
    pairs = metrics["report"]["confused_pairs"]
    assert [(p["a"], p["b"]) for p in pairs] == [(p["a"], p["b"]) for p in ev["confused_pairs"][:3]]
    for p, expected in zip(pairs, ev["confused_pairs"]):
        assert p["a_as_b"]["count"] == expected["a_to_b"] and p["b_as_a"]["count"] == expected["b_to_a"]
        for direction, (src, dst) in (("a_as_b", (p["a"], p["b"])), ("b_as_a", (p["b"], p["a"]))):
            shown = p[direction]["shown"]
            assert len(shown) == min(PER_DIRECTION, p[direction]["count"])
            assert all(s["true"] == src and s["predicted"] == dst for s in shown)
            probs = [s["p_predicted"] for s in shown]
            assert probs == sorted(probs, reverse=True)  # the most confident confusions first
    assert {"pair_1", "pair_2", "pair_3"} <= set(metrics["report"]["plots"])
    html_text = (run_dir / "report.html").read_text()
    assert f"{pairs[0]['a']} shown as {pairs[0]['b']}" in html_text
    try:
        import captum  # noqa: F401
    except ImportError:
        assert metrics["report"]["saliency"]["available"] is False
    else:
        assert metrics["report"]["saliency"] == {"method": "gradcam", "available": True, "note": None}
        assert "saliency unavailable" not in html_text.lower()


def test_top_losses_and_least_certain(built):
    from cifarlab.evaluate import softmax
    from cifarlab.report.insights import N_TOP_LOSSES, N_UNCERTAIN

    run_dir, metrics = built
    rep = metrics["report"]
    top = rep["top_losses"]
    assert len(top) == N_TOP_LOSSES
    losses = [t["loss"] for t in top]
    assert losses == sorted(losses, reverse=True)
    for t in top:  # loss = -log p(actual)
        assert t["loss"] == pytest.approx(-np.log(t["p_true"]), rel=1e-6, abs=1e-9)
    right, wrong = rep["least_certain_correct"], rep["least_certain_wrong"]
    assert 0 < len(right) <= N_UNCERTAIN and 0 < len(wrong) <= N_UNCERTAIN
    assert all(r["true"] == r["predicted"] for r in right) and all(w["true"] != w["predicted"] for w in wrong)
    assert [r["p_predicted"] for r in right] == sorted(r["p_predicted"] for r in right)
    # the least certain right answer is the lowest top-1 probability among all right answers
    from cifarlab.evaluate import evaluate_run

    # The probabilities the evaluation computes (on a GPU, in its precision): the selection is what is tested here.
    _, preds = evaluate_run(run_dir, dataset=synthetic_dataset())
    p = softmax(preds.logits)
    ok = p.argmax(1) == preds.y_true
    assert right[0]["p_predicted"] == pytest.approx(p.max(1)[ok].min(), abs=2e-3)
    for key in ("top_losses", "uncertain_correct", "uncertain_wrong"):
        assert (run_dir / rep["plots"][key]).read_bytes().startswith(PNG_MAGIC)
    md = (run_dir / "report.md").read_text()
    assert f"{top[0]['predicted']}" in md and "Least certain mistakes" in md


def test_model_section_numbers(built):
    from torch.utils.flop_counter import FlopCounterMode

    from cifarlab.models import count_parameters
    from cifarlab.runs import load_run

    run_dir, metrics = built
    model_info = metrics["report"]["model"]
    run = load_run(run_dir)
    model = run.build_model()
    assert model_info["parameters"] == count_parameters(model)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *run.input_shape))
    assert model_info["flops_per_image"] == counter.get_total_flops() > 0
    lat = model_info["latency"]
    assert lat["batch_1"]["batch"] == 1 and lat["batch_256"]["batch"] == 256
    assert lat["batch_1"]["seconds"] > 0 and lat["batch_1"]["repeats"] >= 1
    text = (run_dir / "report.html").read_text()
    assert f"{model_info['parameters']['trainable']:,}" in text and f"{model_info['flops_per_image']:,}" in text


def test_counting_flops_does_not_import_the_compiler():
    """The model section's FLOP count ran beneath torch's compiler guard, whose first call imported torch._dynamo
    (~1 s of every report on a Zen 4, ~3 s on a Zen 3); the count is the same and the guard is left as it was."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys, torch
        from torch.utils import flop_counter
        from cifarlab.report.insights import count_flops
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 30 * 30, 10))
        flops = count_flops(model, (3, 32, 32))
        raw = flop_counter._FlopCounterMode.__torch_dispatch__.__wrapped__
        print(flops, "torch._dynamo" in sys.modules, hasattr(raw, "__dynamo_disable"))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    conv, linear = 2 * 8 * 30 * 30 * 3 * 3 * 3, 2 * 8 * 30 * 30 * 10
    assert out.stdout.split() == [str(conv + linear), "False", "False"], out.stderr


def test_masked_confusion_heatmap_scale_ignores_the_diagonal():
    from cifarlab.report.figures import plot_confusion

    y = np.repeat(np.arange(4), 100)
    pred = y.copy()
    pred[:10] = 1  # class 0 -> 1: 10%; the largest confusion
    pred[100:103] = 2  # 3%
    z = np.full((len(y), 4), -2.0)
    z[np.arange(len(y)), pred] = 3.0
    ev = evaluate_predictions(y, z, ["a", "b", "c", "d"])
    fig = plot_confusion(ev)
    ax = fig.axes[0]
    off = next(im for im in ax.images if im.get_label() == "off-diagonal")
    data = off.get_array()
    assert np.array_equal(np.ma.getmaskarray(data), np.eye(4, dtype=bool))  # the diagonal is masked out
    assert off.norm.vmin == 0 and off.norm.vmax == pytest.approx(0.10)  # scale set by the confusions, not 90%+
    diag = next(im for im in ax.images if im.get_label() == "diagonal")
    assert diag.norm.vmax == 1.0 and not np.ma.getmaskarray(diag.get_array()).diagonal().any()
    texts = {t.get_text() for t in ax.texts}
    assert {"10", "3", "90", "97", "100"} <= texts  # counts annotated, diagonal included


def test_per_step_curves_from_steps_csv(built, tmp_path: Path):
    from cifarlab.report.common import read_steps
    from cifarlab.report.figures import plot_steps

    run_dir, metrics = built
    n = N_EPOCHS * STEPS_PER_EPOCH
    assert metrics["report"]["steps"] == {"file": "steps.csv", "n": n}
    steps = read_steps(run_dir)
    assert steps is not None and len(steps["step"]) == n
    fig = plot_steps(steps, fake_history())
    lines = {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}
    assert len(lines["loss per step"].get_xdata()) == n
    assert len(lines["learning rate per step"].get_ydata()) == n
    assert max(lines["learning rate per step"].get_ydata()) <= 1e-3
    assert f"each of the {n:,} optimizer steps" in (run_dir / "report.md").read_text()
    # absent, empty or damaged: fall back to the per-epoch curves
    assert read_steps(tmp_path) is None
    (tmp_path / "steps.csv").write_text("step,epoch,lr,loss\n")
    assert read_steps(tmp_path) is None
    (tmp_path / "steps.csv").write_text("step,epoch,lr,loss\n1,1,abc,2.0\n")
    assert read_steps(tmp_path) is None


def test_long_tables_fold_away_in_html(built):
    from cifarlab.report.render import render_html, render_markdown
    from cifarlab.report.sections import FOLD_EPOCHS, Details, training_section

    run_dir, _ = built
    text = (run_dir / "report.html").read_text()
    assert text.count("<details>") == text.count("</details>") >= 5
    folded = re.findall(r"<details><summary>([^<]*)</summary>", text)
    assert any(s.startswith("Full config") for s in folded) and any(s.startswith("Table 2: per-class") for s in folded)
    config_at = text.index('id="config"')
    assert text.index("<details>", config_at) < text.index("<td>seed</td>", config_at)  # the config table is inside
    # the per-epoch table folds only when long; Markdown keeps it, under a heading
    assert not any(isinstance(b, Details) for b in training_section(fake_history(5)).blocks)
    long = training_section(fake_history(FOLD_EPOCHS + 8))
    doc = Document("t", "m", (long,))
    assert "<details><summary>Table 1: per-epoch history (20 epochs)</summary>" in render_html(doc, {})
    md = render_markdown(doc, {})
    assert "#### Table 1: per-epoch history (20 epochs)" in md and "| 20 |" in md


def test_robustness_section_from_eval_corruptions(built, tmp_path: Path):
    from cifarlab.report.common import read_corruptions

    run_dir, metrics = built
    assert metrics["report"]["robustness"]["results"]["pixelate"] == {1: 0.6, 2: 0.4, 3: 0.2}
    saved = json.loads((run_dir / METRICS).read_text())["report"]["robustness"]
    assert saved["results"]["pixelate"] == {"1": 0.6, "2": 0.4, "3": 0.2}  # JSON: string keys again
    assert "robustness" in metrics["report"]["plots"]
    html_text = (run_dir / "report.html").read_text()
    section = html_text[html_text.index('id="robustness"') :]
    section = section[: section.index("</section>")]
    for s in ("severity 1", "severity 3", "56.67%", "29.2%", "80.00%", "pixelate (40.0%)", "20.0%"):
        assert s in section, s
    reading = " ".join(metrics["report"]["reading"])
    assert "The most damaging corruption is pixelate" in reading and "20.0% at severity 3" in reading
    # damaged file: the section says so, the report does not fail
    (tmp_path / "eval_corruptions.json").write_text('{"results": 3}')
    assert "error" in read_corruptions(tmp_path)


def test_report_builds_without_captum(evil_without_captum):
    from cifarlab.report.insights import SALIENCY_INSTALL

    run_dir, metrics = evil_without_captum
    assert metrics["report"]["saliency"] == {"method": "gradcam", "available": False, "note": SALIENCY_INSTALL}
    text = (run_dir / "report.html").read_text()
    assert "Saliency unavailable: pip install &#x27;cifarlab[explain]&#x27;" in text
    assert "pair_1" in metrics["report"]["plots"]  # the galleries are still drawn, without overlays
    assert metrics["report"]["model"]["flops_per_image"] > 0


def test_saliency_without_the_explain_module(monkeypatch):
    import sys

    from cifarlab.report.insights import SALIENCY_INSTALL, Item, saliency_overlays

    monkeypatch.setitem(sys.modules, "cifarlab.explain", None)
    item = Item(0, 0, "a", "b", 0.1, 0.9, 2.3, 0.8)
    overlays, note = saliency_overlays(
        torch.nn.Identity(), torch.zeros(1, 3, 8, 8, dtype=torch.uint8), [item], [1], None
    )
    assert overlays == {} and note == SALIENCY_INSTALL


def test_budget_rows_show_the_budget_the_time_taken_and_the_plan():
    from cifarlab.report.sections import _budget_rows

    budget = {
        "budget_seconds": 30.0,
        "taken_seconds": 28.5,
        "widths": [32, 64, 128],
        "scale": 1.0,
        "tta": "flip",
        "reason": "the widest net that trains the recipe's 2 epochs in the time left",
        "predicted_epochs": 2.06,
        "clock": "process start",
    }
    (k1, v1), (k3, v3), (k2, v2) = _budget_rows(budget)
    assert (
        k1 == "time budget" and v1 == "30 s from process start to the test result; taken 28.5 s: 5.0% under the budget"
    )
    assert k3 == "budget epochs" and v3 == "~2.1 planned"
    assert k2 == "budget chose"
    assert v2.startswith("widths [32, 64, 128] (1x the recipe's), TTA flip:")
    del budget["predicted_epochs"]  # a run from before the plan recorded it
    assert "planned" not in str(_budget_rows(budget))
    assert _budget_rows(None) == [] and _budget_rows({"budget_seconds": 0}) == []


def test_the_reading_explains_under_confidence_by_label_smoothing():
    """Right 100% of the time at ~25% confidence: under-confident. With the recipe's label smoothing the reading
    says why (the target it trains towards: 1 - 0.2 + 0.2/10 = 82%) and what to do; without it, it says nothing
    it cannot know."""
    from cifarlab.report.reading import calibration_sentence

    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 500)
    z = rng.normal(0, 0.1, (500, 10))
    z[np.arange(500), y] += 1.2  # always the top logit, by a small margin: low confidence, every answer right
    cal = evaluate_predictions(y, z, [f"c{i}" for i in range(10)]).calibration
    assert cal.accuracy == 1.0 and cal.mean_confidence < 0.4
    smoothed = calibration_sentence(cal, label_smoothing=0.2, n_classes=10)
    assert "under-confident" in smoothed and "label smoothing 0.2" in smoothed and "towards 82%" in smoothed
    assert "calibrate=true" in smoothed  # the way out
    assert "label smoothing" not in calibration_sentence(cal)
    # A run with a fitted temperature: the reading names it and the plain softmax's ECE, and sends nobody to
    # --set calibrate=true (it is on).
    sharp = evaluate_predictions(y, z / 0.2, [f"c{i}" for i in range(10)]).calibration
    at_t = calibration_sentence(sharp, 0.2, 10, temperature=0.2, uncalibrated_ece=cal.ece)
    assert "temperature 0.2 " in at_t and f"{cal.ece * 100:.1f}% without it" in at_t
    assert "fitted after training" in at_t and "calibrate=true" not in at_t and "val_fraction" not in at_t
    # Fitted on training images of a model that knows them too well: over-confident, and the reading says why.
    z_wrong = z.copy()
    z_wrong[:100] = z_wrong[:100][:, ::-1]  # a fifth of the answers wrong, as sure as the rest
    sure = evaluate_predictions(y, z_wrong / 0.05, [f"c{i}" for i in range(10)]).calibration
    assert sure.overconfidence > 0.02
    told = calibration_sentence(sure, 0.2, 10, 0.05, cal.ece, fitted_on="1000 training images")
    assert "over-confident" in told and "fitted on 1000 training images" in told and "val_fraction=0.02" in told
    assert "val_fraction" not in calibration_sentence(sure, 0.2, 10, 0.05, cal.ece, fitted_on="1000 validation images")
