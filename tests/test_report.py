"""The run report: files, content (every class, every metric), metrics.json merge, self-containment, the
computed reading, the `cifarlab report` command. Fake run folders: a tiny random-init model, synthetic data."""

from __future__ import annotations

import base64
import errno
import json
import re
import warnings
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
from cifarlab.runs import CONFIG, METRICS, machine_info, read_json, write_history, write_json

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
) -> tuple[Path, Dataset]:
    """A run folder as training leaves it (config, history, metrics, weights) and the data it 'trained' on."""
    recipe = recipe or tiny_recipe()
    if val_fraction == 0:
        recipe = recipe.replace(val_fraction=0.0, schedule="onecycle", early_stopping_patience=0)
    run_dir = make_run(tmp_path / "20260101-120000-reference", recipe)
    ds = synthetic_dataset()
    n = len(ds.y_train)
    n_val = round(n * val_fraction)
    config = read_json(run_dir / CONFIG)
    config.update(
        {
            "dataset": {
                "name": dataset_name,
                "classes": list(CLASSES),
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
            },
        )
    return run_dir, ds


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir, ds = make_report_run(tmp_path_factory.mktemp("report"))
    return run_dir, build_report(run_dir, dataset=ds)


def test_report_files_exist(built):
    run_dir, metrics = built
    assert (run_dir / "report.html").stat().st_size > 10_000
    assert (run_dir / "report.md").stat().st_size > 1_000
    for name in FIGURES.values():
        data = (run_dir / "plots" / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
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
    assert saved["test_accuracy"] == 0.123 and saved["test_loss"] == 2.5  # training's keys untouched
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
    run_dir, _ = built
    text = (run_dir / "report.html").read_text()
    assert not re.search(r"https?://", text)
    assert "<script" not in text.lower() and "<link" not in text.lower() and "@import" not in text
    assert not re.search(r"url\(", text)
    for attr, value in re.findall(r"""\b(src|href|srcset|action|poster)\s*=\s*["']?([^"' >]*)""", text, re.I):
        assert (attr == "src" and value.startswith("data:image/png;base64,")) or (
            attr == "href" and value.startswith("#")
        ), (attr, value[:40])
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == len(FIGURES)
    for b64 in images:
        assert base64.b64decode(b64).startswith(PNG_MAGIC)
    # section anchors exist for every nav link
    for target in re.findall(r'href="#([^"]+)"', text):
        assert f'id="{target}"' in text


def test_markdown_links_the_plots(built):
    run_dir, _ = built
    md = (run_dir / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(f"plots/{n}" for n in FIGURES.values())
    assert all((run_dir / link).is_file() for link in links)
    assert "| epoch |" in md  # table 1


def test_rebuilding_is_idempotent(built, tmp_path: Path):
    run_dir, first = built
    ds = synthetic_dataset()
    again = build_report(run_dir, dataset=ds)
    assert again["evaluation"]["accuracy"] == first["evaluation"]["accuracy"]
    assert again["test_accuracy"] == 0.123
    assert "evaluation" not in again["evaluation"]  # merging does not nest reports in reports


def test_run_without_validation_or_history(tmp_path: Path):
    run_dir, ds = make_report_run(tmp_path / "noval", val_fraction=0.0)
    metrics = build_report(run_dir, dataset=ds)
    header = next(line for line in (run_dir / "report.md").read_text().splitlines() if line.startswith("| epoch |"))
    assert "val_loss" not in header and "learning rate" in header
    assert metrics["evaluation"]["split"] == "test"
    run_dir2, ds2 = make_report_run(tmp_path / "nohist", history=False)
    metrics2 = build_report(run_dir2, dataset=ds2)
    assert "curves" not in metrics2["report"]["plots"]
    assert "no training history" in (run_dir2 / "report.html").read_text()


@pytest.mark.parametrize("kind", ["flip_translate", "none"])
def test_other_augmentations_and_models(tmp_path: Path, kind: str):
    recipe = tiny_recipe("airnet") if kind == "flip_translate" else tiny_recipe().replace(augment="none")
    run_dir, ds = make_report_run(tmp_path, recipe=recipe, val_fraction=0.0 if kind == "flip_translate" else 0.2)
    metrics = build_report(run_dir, dataset=ds, split="test")
    assert (run_dir / "plots" / FIGURES["augment"]).read_bytes().startswith(PNG_MAGIC)
    assert metrics["evaluation"]["inference"]["tta"] == recipe.tta


def test_val_split_report(tmp_path: Path):
    run_dir, ds = make_report_run(tmp_path)
    metrics = build_report(run_dir, dataset=ds, split="val")
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


def test_report_command(tmp_path: Path, tiny_cifar10, capsys):
    run_dir, _ = make_report_run(tmp_path / "run", dataset_name="cifar10")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny archive's MD5 is not the official one
        assert cli.main(["report", str(run_dir), "--data-dir", str(tiny_cifar10.data_dir)]) == 0
    out = capsys.readouterr().out
    assert str(run_dir / "report.html") in out and "test accuracy" in out
    assert (run_dir / "report.html").is_file()
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


def test_training_writes_the_report(tmp_path: Path):
    """`run_experiment` (what `cifarlab train` runs) ends with the report; its test numbers are the evaluation's."""
    from _synth import make_dataset
    from cifarlab.experiment import run_experiment

    recipe = tiny_recipe().replace(epochs=2, batch_size=32, precision="fp32", bn_momentum=0.1)
    res = run_experiment(recipe, dataset=make_dataset(20, 10), runs_root=tmp_path, quiet=True)
    assert res.status == "finished"
    for name in ("report.html", "report.md", *(f"plots/{n}" for n in FIGURES.values())):
        assert (res.run_dir / name).is_file(), name
    saved = json.loads((res.run_dir / METRICS).read_text())
    assert saved["evaluation"]["accuracy"] == pytest.approx(saved["test_accuracy"], abs=1e-6)
    assert saved["evaluation"]["loss"] == pytest.approx(saved["test_loss"], rel=1e-4)
    assert saved["timings"]["report_seconds"] > 0 and saved["epochs_run"] == 2


# -- reliability: full disk, Markdown injection, data that is not the run's ------------------------------------


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_keeps_the_old_report_and_is_one_line(tmp_path: Path, monkeypatch, capsys):
    run_dir, ds = make_report_run(tmp_path)
    build_report(run_dir, dataset=ds)
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


def test_full_disk_on_report_html_names_it(tmp_path: Path, monkeypatch, capsys):
    import cifarlab.files

    run_dir, ds = make_report_run(tmp_path)
    build_report(run_dir, dataset=ds)
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


def test_markdown_escapes_names_from_the_data(tmp_path: Path):
    evil = "a|b*<script>"
    classes = (evil, "c_d`e", "[x](y)", "new\nline", *CLASSES[4:])
    run_dir = make_run(tmp_path / "20260101-120000-reference", tiny_recipe(), classes=classes)
    ds = synthetic_dataset(classes=classes)
    build_report(run_dir, dataset=ds)
    md = (run_dir / "report.md").read_text()
    assert "a\\|b\\*\\<script\\>" in md and "<script>" not in md and "a|b" not in md
    assert "c\\_d\\`e" in md and "\\[x\\](y)" in md and "new\\\\x0aline" in md
    # the per-class table row of the evil class still has its 5 cells: no cell broke out of the table
    row = next(ln for ln in md.splitlines() if ln.startswith("| a\\|b"))
    assert len(re.findall(r"(?<!\\)\|", row)) == 6, row
    html_text = (run_dir / "report.html").read_text()
    assert "<script>" not in html_text and "a|b*&lt;script&gt;" in html_text


def _mismatched_run(tmp_path: Path) -> tuple[Path, Dataset]:
    """A run trained on data with checksum synthetic-md5, and other data with the same classes."""
    import dataclasses

    run_dir, ds = make_report_run(tmp_path)
    # the run did not generalise: training accuracy 55%, far above what the other data gives
    return run_dir, dataclasses.replace(ds, checksum="other-md5", source="elsewhere")


def test_other_data_is_said_first_and_draws_no_overfitting_conclusion(tmp_path: Path):
    run_dir, other = _mismatched_run(tmp_path)
    warned = []
    metrics = build_report(run_dir, dataset=other, on_warning=warned.append)
    assert len(warned) == 1 and "not the data this run was trained on" in warned[0]
    assert metrics["evaluation"]["dataset"]["checksum_matches_run"] is False
    reading = " ".join(metrics["report"]["reading"])
    assert "overfitting" not in reading.replace("No conclusion about overfitting", "")
    assert "No conclusion about overfitting or generalisation" in reading
    html_text = (run_dir / "report.html").read_text()
    box = html_text.index('class="warning"')
    assert box < html_text.index("<nav>") and box < html_text.index('id="summary"')
    assert "not the data this run was trained on" in html_text[box : box + 600]
    md = (run_dir / "report.md").read_text()
    first = [ln for ln in md.splitlines() if ln.strip()][1]  # right after the title
    assert first.startswith("> **Warning:**") and "not the data this run was trained on" in first
    # the same run on its own data: no warning, the usual conclusion
    same = build_report(run_dir, dataset=synthetic_dataset())
    assert "overfitting" in " ".join(same["report"]["reading"])
    assert 'class="warning"' not in (run_dir / "report.html").read_text()


def test_report_command_warns_first_about_other_data(tmp_path: Path, monkeypatch, capsys):
    run_dir, other = _mismatched_run(tmp_path)
    monkeypatch.setattr("cifarlab.evaluate.load_run_dataset", lambda run, data_dir=None: other)
    assert cli.main(["report", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert err.startswith("warning: the data evaluated") and "not the data this run was trained on" in err
    assert "test accuracy" in out
