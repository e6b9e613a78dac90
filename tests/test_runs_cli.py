"""`cifarlab runs` (status, crash detection, damaged files); loading a run never executes its pickles."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _runfolder import make_run, tiny_recipe
from cifarlab import cli
from cifarlab.cli import runs as runs_cli
from cifarlab.errors import UserError
from cifarlab.runs import load_checkpoint, load_run, write_json


def _main(argv: list[str]) -> int:
    args = cli.build_parser(["runs", "predict", "export"]).parse_args(argv)
    return args.func(args)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _run(
    root: Path,
    name: str,
    recipe: str = "fast",
    status: dict | None = None,
    metrics: dict | None = None,
    history: list | None = None,
) -> Path:
    d = root / name
    d.mkdir(parents=True)
    write_json(d / "config.json", {"recipe": {"name": recipe}, "dataset": {"classes": ["a", "b"]}})
    if status is not None:
        write_json(d / "status.json", status)
    if metrics is not None:
        write_json(d / "metrics.json", metrics)
    if history is not None:
        write_json(d / "history.json", history)
    return d


@pytest.fixture
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    _run(
        root,
        "20260101-100000-reference",
        "reference",
        {"status": "finished", "pid": 1, "time": _now()},
        {
            "status": "finished",
            "test_accuracy": 0.7991,
            "epochs_run": 18,
            "timings": {"total_seconds": 1362.4},
        },
    )
    _run(
        root,
        "20260102-100000-fast",
        "fast",
        {"status": "stopped", "pid": 1, "time": _now()},
        history=[{"epoch": 1, "epoch_seconds": 14.5}, {"epoch": 2, "epoch_seconds": 15.0}],
    )
    _run(root, "20260103-100000-fast", "fast", {"status": "crashed", "pid": 1, "time": _now()})
    _run(root, "20260104-100000-fast", "fast", {"status": "running", "pid": _dead_pid(), "time": _now()})
    _run(root, "20260105-100000-fast", "fast", {"status": "running", "pid": os.getpid(), "time": _now()})
    # Alive PID, but the process started long after the run did: the PID was recycled, the run crashed.
    _run(
        root,
        "20260106-100000-fast",
        "fast",
        {"status": "running", "pid": os.getpid(), "time": "2001-01-01T00:00:00"},
    )
    d = _run(root, "20260107-100000-air94", "air94", {"status": "finished", "pid": 1, "time": _now()})
    (d / "metrics.json").write_text('{"test_accuracy": 0.9')  # truncated
    d = _run(root, "20260108-100000-fast", "fast")
    (d / "config.json").write_text("not json")
    (d / "status.json").write_text("[1, 2")
    (root / "notes").mkdir()  # not a run folder
    (root / "notes" / "todo.txt").write_text("x")
    (root / "README.txt").write_text("x")
    return root


def test_list_runs_statuses_newest_first(runs_root: Path):
    rows = {r["name"]: r for r in runs_cli.list_runs(runs_root)}
    names = [r["name"] for r in runs_cli.list_runs(runs_root)]
    assert names == sorted(names, reverse=True) and "notes" not in rows and len(rows) == 8
    status = {n[:8]: r["status"] for n, r in rows.items()}
    assert status == {
        "20260101": "finished",
        "20260102": "stopped",
        "20260103": "crashed",
        "20260104": "crashed",  # said running, process gone
        "20260105": "running",
        "20260106": "crashed",  # said running, PID now someone else's
        "20260107": "finished",
        "20260108": "damaged",
    }
    ref = rows["20260101-100000-reference"]
    assert (ref["recipe"], ref["test_accuracy"], ref["epochs"], ref["wall_seconds"]) == (
        "reference",
        0.7991,
        18,
        1362.4,
    )
    stopped = rows["20260102-100000-fast"]
    assert stopped["epochs"] == 2 and stopped["wall_seconds"] == pytest.approx(29.5)
    # stopped with no checkpoint kept (before its first epoch ended): nothing for --resume, and the table says so
    assert stopped["resumable"] is False and rows["20260103-100000-fast"]["resumable"] is False
    table = runs_cli.format_runs(runs_cli.list_runs(runs_root))
    assert "stopped (no epoch)" not in table  # it has 2 epochs in its history (a tune trial keeps no checkpoint)
    assert "crashed (no epoch)" in table
    (runs_root / "20260102-100000-fast" / "checkpoint.pt").write_bytes(b"x")
    assert runs_cli.run_info(runs_root / "20260102-100000-fast")["resumable"] is True
    assert not rows["20260101-100000-reference"]["resumable"]  # finished: nothing to continue
    # --json keeps each field's type: null, and the damaged file named
    assert rows["20260107-100000-air94"]["test_accuracy"] is None
    assert rows["20260107-100000-air94"]["damaged"] == ["metrics.json"]
    assert rows["20260108-100000-fast"]["recipe"] is None
    assert rows["20260108-100000-fast"]["damaged"] == ["config.json", "status.json"]
    assert rows["20260101-100000-reference"]["damaged"] == []


def test_values_of_the_wrong_type_show_as_damaged_cells_not_a_crash(tmp_path: Path, capsys):
    """Hand-edited or foreign files: a PID beyond the C type, an accuracy that is a list, times that are strings.
    Each bad value shows in its own cell; the listing of every other run goes on."""
    ok = {"status": "finished", "pid": 1, "time": _now()}
    _run(tmp_path, "20260101-100000-fast", "fast", {"status": "running", "pid": 10**30, "time": _now()})
    _run(tmp_path, "20260102-100000-fast", "fast", ok, {"test_accuracy": [0.5], "epochs_run": "2"})
    _run(tmp_path, "20260103-100000-fast", "fast", ok, {"test_accuracy": {"a": 1}, "timings": {"total_seconds": "x"}})
    _run(tmp_path, "20260104-100000-fast", "fast", ok, {"timings": [1]}, [{"epoch": 1, "epoch_seconds": "x"}])
    d = _run(tmp_path, "20260105-100000-fast", "fast", ok, {"test_accuracy": 0.8, "epochs_run": 2})
    write_json(d / "config.json", {"recipe": {"name": ["not", "a", "name"]}})
    rows = {r["name"][:8]: r for r in runs_cli.list_runs(tmp_path)}
    assert rows["20260101"]["status"] == "crashed"  # that PID cannot be alive
    assert (rows["20260102"]["test_accuracy"], rows["20260102"]["epochs"]) == (None, None)
    assert (rows["20260103"]["test_accuracy"], rows["20260103"]["wall_seconds"]) == (None, None)
    assert rows["20260104"]["wall_seconds"] == 0 and rows["20260104"]["test_accuracy"] is None
    assert rows["20260105"]["recipe"] is None and rows["20260105"]["test_accuracy"] == 0.8
    assert [rows[k]["damaged"] for k in sorted(rows)] == [
        [],
        ["metrics.json"],
        ["metrics.json"],
        ["metrics.json"],
        ["config.json"],
    ]
    assert _main(["runs", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2 + 5 and "damaged" in out
    assert _main(["runs", "--root", str(tmp_path), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 5


@pytest.mark.parametrize(
    "normalization,needle",
    [
        (None, "normalization.mean is missing"),
        ({"mean": [0.5, 0.5, 0.5]}, "normalization.std is missing"),
        ({"mean": [0.5, 0.5, 0.5], "std": [0.0, 0.2, 0.2]}, "normalization.std must be 3 positive numbers"),
        ({"mean": [0.5], "std": [0.2, 0.2, 0.2]}, "normalization.mean must be a list of 3 numbers"),
    ],
)
def test_a_standardizing_run_without_its_normalization_is_damaged(tmp_path: Path, normalization, needle, capsys):
    """Without mean and std every command would feed unnormalized images (evaluate: chance accuracy, calibrate: a
    wrong temperature written to the weights, export: NaN from a zero std). Refused, naming the file; the weights
    stay as they were."""
    run_dir = make_run(tmp_path / "20260101-120000-fast", tiny_recipe("airnet").replace(scaling="standardize"))
    config = json.loads((run_dir / "config.json").read_text())
    config["normalization"] = normalization
    (run_dir / "config.json").write_text(json.dumps(config))
    weights = (run_dir / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match=needle):
        load_run(run_dir)
    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and needle in err and not (tmp_path / "m.onnx").exists()
    assert (run_dir / "model.safetensors").read_bytes() == weights


def test_a_resumed_runs_wall_time_counts_every_session(tmp_path: Path):
    """metrics.json's total_seconds is the last process's; a run resumed after 40 s of training and finished in a
    short second process took the sessions' sum."""
    timings = {"total_seconds": 3.1, "session_seconds": [40.0, 2.4], "sessions_total_seconds": 42.4}
    _run(
        tmp_path, "20260101-100000-fast", "fast", {"status": "finished", "pid": 1, "time": _now()}, {"timings": timings}
    )
    (row,) = runs_cli.list_runs(tmp_path)
    assert row["wall_seconds"] == 42.4


def test_cli_table_and_json(runs_root: Path, capsys):
    assert _main(["runs", "--root", str(runs_root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "recipe", "data", "status", "test", "acc", "epochs", "wall", "time"]
    assert len(lines) == 2 + 8 and lines[2].startswith("20260108-100000-fast")
    ref = next(line for line in lines if line.startswith("20260101"))
    assert "79.91%" in ref and "22m42s" in ref and "finished" in ref
    assert _main(["runs", "--root", str(runs_root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in data][-1] == "20260101-100000-reference"
    assert _main(["runs", "--runs-dir", str(runs_root), "--json"]) == 0  # the name train gives the folder
    assert json.loads(capsys.readouterr().out) == data


def test_cli_empty_and_missing_root(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    assert _main(["runs", "--root", str(tmp_path / "empty")]) == 0
    assert "no runs" in capsys.readouterr().out
    assert cli.main(["runs", "--root", str(tmp_path / "nope")]) == 2
    assert "error:" in capsys.readouterr().err


# -- a run folder's pickles are never executed ---------------------------------------------------------------


class _Payload:
    """Unpickling this object runs `exec(code)`: here, writing a marker file."""

    def __init__(self, marker: Path) -> None:
        self.code = f"open({str(marker)!r}, 'w').write('pwned')"

    def __reduce__(self):
        return (exec, (self.code,))


def _plant(path: Path, marker: Path, zip_format: bool) -> None:
    state = {"epoch": 3, "model": {"w": torch.zeros(2)}, "evil": _Payload(marker)}
    if zip_format:
        torch.save(state, path)  # torch's own zip container with a malicious data.pkl inside
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))  # a bare pickle: the first thing torch.load unpickles


@pytest.mark.parametrize("zip_format", [True, False], ids=["torch-zip", "raw-pickle"])
def test_tampered_checkpoint_is_refused_not_executed(tmp_path: Path, zip_format: bool):
    marker = tmp_path / "marker"
    ckpt = tmp_path / "checkpoint.pt"
    _plant(ckpt, marker, zip_format)
    with pytest.raises(UserError, match="cannot be loaded safely|not a cifarlab checkpoint"):
        load_checkpoint(ckpt)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it (proves the test tests something).
    live = tmp_path / "live"
    _plant(ckpt, live, zip_format)
    try:
        torch.load(ckpt, weights_only=False)
    except RuntimeError:
        pass  # the bare pickle lacks torch's magic number, but only after unpickling it
    assert live.read_text() == "pwned"


def test_loading_a_run_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    run_dir = make_run(tmp_path / "20260101-120000-reference", tiny_recipe())
    marker = tmp_path / "marker"
    _plant(run_dir / "checkpoint.pt", marker, zip_format=True)

    def forbidden(*a, **k):
        raise AssertionError("something was unpickled while loading a run")

    for target in ("pickle.load", "pickle.loads", "torch.load"):
        monkeypatch.setattr(target, forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    run = load_run(run_dir)
    model = run.build_model()
    assert isinstance(model, torch.nn.Module) and not model.training
    from PIL import Image

    from cifarlab.predict import predict_paths

    img = tmp_path / "a.png"
    Image.new("RGB", (40, 40), (10, 200, 30)).save(img)
    [r] = predict_paths(run_dir, [img])
    assert "top_k" in r
    assert not marker.exists()


def test_weights_replaced_by_a_pickle_are_refused(tmp_path: Path):
    run_dir = make_run(tmp_path / "run", tiny_recipe())
    marker = tmp_path / "marker"
    _plant(run_dir / "model.safetensors", marker, zip_format=True)
    with pytest.raises(UserError, match="not a valid safetensors file"):
        load_run(run_dir).build_model()
    assert not marker.exists()


def test_cli_escapes_control_characters_in_run_names(tmp_path: Path, capsys):
    root = tmp_path / "runs"
    evil = root / "20260101-100000-\x1b]0;pwned\x07\x1b[31mred"
    evil.mkdir(parents=True)
    write_json(evil / "config.json", {"recipe": {"name": "ref\x1b[2Jerence"}})
    write_json(evil / "status.json", {"status": "finished\x9b31m"})  # not a status: damaged, never printed
    assert _main(["runs", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert "20260101-100000-\\x1b]0;pwned\\x07\\x1b[31mred" in out
    assert "ref\\x1b[2Jerence" in out and " damaged " in out
    assert _main(["runs", "--root", str(root), "--json"]) == 0  # JSON escapes them itself
    assert json.loads(capsys.readouterr().out)[0]["name"] == evil.name


def test_printable():
    from cifarlab.cli.common import printable

    assert printable("plain ünïcode ↔ name") == "plain ünïcode ↔ name"
    assert printable("a\x1b[0mb\nc\u202ed") == "a\\x1b[0mb\\nc\\u202ed"


def test_cli_given_one_run_folder_lists_the_folder_holding_it(runs_root: Path, capsys):
    run = runs_root / "20260101-100000-reference"
    assert _main(["runs", "--root", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{run} is a run folder; its runs folder is {runs_root}:")
    assert "20260101-100000-reference" in out and "20260102-100000-fast" in out


def test_a_recipe_name_too_long_for_a_folder_name_says_so(tmp_path: Path):
    from cifarlab.runs import new_run_dir

    with pytest.raises(UserError, match=r"too long for this file system; give the recipe a shorter name"):
        new_run_dir(tmp_path, "x" * 300)
    assert list(tmp_path.iterdir()) == []


def test_a_run_from_a_newer_cifarlab_says_so(tmp_path: Path):
    """A recipe key this version does not know, in a run another version wrote: the error names both versions."""
    run_dir = make_run(tmp_path / "20260101-120000-reference", tiny_recipe())
    config = json.loads((run_dir / "config.json").read_text())
    config["recipe"]["future_key"] = 1
    config["versions"] = {"cifarlab": "9.9.0"}
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"future_key.*written by cifarlab 9\.9\.0, this is "):
        load_run(run_dir)


def test_the_data_column_tells_runs_of_different_datasets_apart(tmp_path: Path, capsys):
    for name, dataset in (("20260101-100000-fast", "cifar10"), ("20260102-100000-fast", "flowers")):
        d = _run(tmp_path, name, "fast", {"status": "finished", "pid": 1, "time": _now()}, {"test_accuracy": 0.8})
        write_json(d / "config.json", {"recipe": {"name": "fast"}, "dataset": {"name": dataset, "classes": ["a", "b"]}})
    bad = _run(tmp_path, "20260103-100000-fast", "fast", {"status": "finished", "pid": 1, "time": _now()})
    write_json(bad / "config.json", {"recipe": {"name": "fast"}, "dataset": {"name": ["not", "a", "name"]}})
    rows = {r["name"]: r["dataset"] for r in runs_cli.list_runs(tmp_path)}
    assert rows == {
        "20260101-100000-fast": "cifar10",
        "20260102-100000-fast": "flowers",
        "20260103-100000-fast": None,  # --json: null, with config.json under "damaged"
    }
    assert _main(["runs", "--root", str(tmp_path)]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert [lines[n][2] for n in sorted(lines)] == ["cifar10", "flowers", "damaged"]


def test_a_status_outside_the_documented_set_is_damaged(tmp_path: Path, capsys):
    """A status.json's value is shown only when it is one `cifarlab runs` documents; tune's diverged and killed
    trials are crashed runs; a folder with no status anywhere is damaged (not an undocumented `unknown`)."""
    for i, status in enumerate(({"status": 5}, {"status": "weird"}, {"status": ["finished"]}, {"status": None})):
        _run(tmp_path, f"2026010{i + 1}-100000-fast", "fast", {**status, "pid": 1, "time": _now()})
    _run(tmp_path, "20260105-100000-fast", "fast", {"status": "diverged", "time": _now()})
    _run(tmp_path, "20260106-100000-fast", "fast", {"status": "killed", "time": _now()})
    _run(tmp_path, "20260107-100000-fast", "fast")  # config.json only
    _run(tmp_path, "20260108-100000-fast", "fast", metrics={"status": "pruned"})  # no status.json: metrics' status
    _run(tmp_path, "20260109-100000-fast", "fast", metrics={"status": "odd"})
    rows = {r["name"][:8]: r for r in runs_cli.list_runs(tmp_path)}
    got = {k: (r["status"], r["damaged"]) for k, r in rows.items()}
    damaged = ("damaged", ["status.json"])
    assert got == {
        "20260101": damaged,
        "20260102": damaged,
        "20260103": damaged,
        "20260104": damaged,
        "20260105": ("crashed", []),
        "20260106": ("crashed", []),
        "20260107": damaged,
        "20260108": ("pruned", []),
        "20260109": damaged,
    }
    assert _main(["runs", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "weird" not in out and " 5 " not in out and "unknown" not in out


def test_a_running_status_with_a_time_that_does_not_parse_is_damaged(tmp_path: Path):
    """The time is what tells a live run from a recycled PID: without it, a live PID does not keep it running."""
    _run(tmp_path, "20260101-100000-fast", "fast", {"status": "running", "pid": os.getpid(), "time": "yesterday"})
    _run(tmp_path, "20260102-100000-fast", "fast", {"status": "running", "pid": os.getpid(), "time": 12})
    assert [r["status"] for r in runs_cli.list_runs(tmp_path)] == ["damaged", "damaged"]
    assert runs_cli.pid_alive(os.getpid(), "yesterday") is False
    assert runs_cli.pid_alive(os.getpid(), _now()) is True


def test_a_file_that_is_json_but_not_an_object_is_damaged_like_a_parse_failure(tmp_path: Path, capsys):
    ok = {"status": "finished", "pid": 1, "time": _now()}
    hist = [{"epoch": 1, "epoch_seconds": 0.1}]
    a = _run(tmp_path, "20260101-100000-fast", "fast", ok, history=hist)
    (a / "config.json").write_text('"str"')
    (a / "metrics.json").write_text("[1, 2]")
    b = _run(tmp_path, "20260102-100000-fast", "fast", ok, {"test_accuracy": 0.8})
    (b / "config.json").write_text("{}")  # an object without a recipe
    c = _run(tmp_path, "20260103-100000-fast", "fast", ok)
    (c / "metrics.json").write_text("{broken")
    d = _run(tmp_path, "20260104-100000-fast", "fast", {"status": "running", "pid": os.getpid(), "time": _now()})
    (d / "history.json").write_text('{"epoch": 1}')
    rows = {r["name"][:8]: r for r in runs_cli.list_runs(tmp_path)}
    assert rows["20260101"]["damaged"] == ["config.json", "metrics.json"]
    assert (rows["20260101"]["recipe"], rows["20260101"]["dataset"], rows["20260101"]["test_accuracy"]) == (None,) * 3
    assert rows["20260102"]["damaged"] == ["config.json"] and rows["20260102"]["test_accuracy"] == 0.8
    assert rows["20260103"]["damaged"] == ["metrics.json"]
    assert rows["20260104"]["damaged"] == ["history.json"] and rows["20260104"]["status"] == "running"
    assert _main(["runs", "--root", str(tmp_path)]) == 0
    table = {line.split()[0][:8]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    # recipe, data, status, test acc: each cell from a damaged file says so, as for a parse failure
    assert table["20260101"][1:5] == ["damaged", "damaged", "finished", "damaged"]
    assert table["20260102"][1:5] == ["damaged", "damaged", "finished", "80.00%"]
    assert table["20260103"][1:5] == ["fast", "-", "finished", "damaged"]
    assert table["20260104"][4:] == ["-", "damaged", "damaged"]  # running: no metrics yet, its history damaged


def test_json_keeps_each_fields_type_and_lists_damaged_files(runs_root: Path, capsys):
    """A script may compute on test_accuracy, epochs, wall_seconds and sort on recipe without checking for a
    string in their place."""
    assert _main(["runs", "--root", str(runs_root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for row in data:
        assert row["test_accuracy"] is None or isinstance(row["test_accuracy"], float)
        assert row["epochs"] is None or isinstance(row["epochs"], int)
        assert row["wall_seconds"] is None or isinstance(row["wall_seconds"], float)
        assert row["recipe"] is None or row["recipe"] in ("reference", "fast", "air94")
        assert isinstance(row["damaged"], list) and "damaged" not in (row["recipe"], row["test_accuracy"])
    assert sorted(r["test_accuracy"] or 0 for r in data)[-1] == 0.7991


def test_the_default_root_missing_is_no_runs_yet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """A fresh checkout has no runs/ before its first training: that is an empty list, not an error. An explicit
    --root that is missing or a file stays an error."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["runs"]) == 0
    assert capsys.readouterr().out == "no runs yet (runs/ does not exist)\n"
    assert cli.main(["runs", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli.main(["runs", "--root", "runs"]) == 2
    assert "no such folder: runs" in capsys.readouterr().err
    (tmp_path / "runs").write_text("x")
    assert cli.main(["runs"]) == 2
    assert "runs is not a folder" in capsys.readouterr().err
    assert cli.main(["runs", "--root", "runs"]) == 2
