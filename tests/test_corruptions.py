"""CIFAR-10-C style corruptions (`cifarlab.corruptions`), `evaluate_corruptions`, and `cifarlab evaluate
--corruptions` / `--test-data` on tiny runs and tiny datasets."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from _runfolder import make_run, tiny_recipe
from cifarlab import cli
from cifarlab.corruptions import CORRUPTIONS, corrupt, evaluate_corruptions, parse_severities
from cifarlab.errors import ConfigError, UserError
from conftest import write_imagefolder

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "fog"}
ALL = CORRUPTIONS.names()


pytestmark = pytest.mark.usefixtures("one_thread")


def images(c: int = 3, n: int = 4, seed: int = 0) -> torch.Tensor:
    """Random pixels on a smooth gradient: neither flat nor pure noise."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(30, 220, 32).view(1, 1, 1, 32).expand(n, c, 32, 32)
    return (ramp + torch.randint(-30, 31, (n, c, 32, 32), generator=g)).clamp(0, 255).to(torch.uint8)


def test_the_registry_has_the_required_corruptions():
    for name in (
        "gaussian_noise",
        "shot_noise",
        "impulse_noise",
        "gaussian_blur",
        "jpeg",
        "brightness",
        "contrast",
        "pixelate",
        "fog",
    ):
        assert name in CORRUPTIONS and CORRUPTIONS.describe(name)
    with pytest.raises(ConfigError, match="accepted values: gaussian_noise"):
        corrupt(images(), "nope", 1)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("channels", [3, 1])
def test_every_corruption_is_deterministic_typed_and_monotone(name: str, channels: int):
    x = images(channels)
    assert torch.equal(corrupt(x, name, 0), x)  # severity 0: exactly the input
    assert corrupt(x, name, 0) is not x
    changes = []
    for s in range(1, 6):
        a = corrupt(x, name, s, seed=3)
        assert a.dtype == torch.uint8 and a.shape == x.shape
        assert torch.equal(a, corrupt(x, name, s, seed=3))  # same seed, same output
        if name in RANDOM:
            assert not torch.equal(a, corrupt(x, name, s, seed=4))  # another seed, other noise
        changes.append((a.float() - x.float()).abs().mean().item())
    assert changes[0] > 0
    assert all(b >= a for a, b in zip(changes, changes[1:])), changes  # severities never change less
    # numpy in, numpy out, the same pixels
    assert np.array_equal(corrupt(x.numpy(), name, 3, seed=3), corrupt(x, name, 3, seed=3).numpy())


def test_bad_input():
    with pytest.raises(UserError, match="severity"):
        corrupt(images(), "jpeg", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(images().float(), "jpeg", 1)
    assert parse_severities("3, 1,3") == (1, 3)
    with pytest.raises(UserError, match="severities"):
        parse_severities("1,9")


def test_a_new_corruption_is_one_decorated_function():
    @CORRUPTIONS.register("invert_test")
    def invert(x, severity, rng):
        """blend towards the negative"""
        a = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
        return (1 - a) * x + a * (1 - x)

    try:
        x = images()
        assert corrupt(x, "invert_test", 5).float().mean() != x.float().mean()
        assert CORRUPTIONS.describe("invert_test") == "blend towards the negative"
    finally:
        CORRUPTIONS.unregister("invert_test")


# -- a run under corruption ----------------------------------------------------------------------------------------


def _run(tmp_path: Path) -> Path:
    return make_run(tmp_path / "20260101-120000-reference", tiny_recipe())


def test_evaluate_corruptions_on_a_tiny_run(tmp_path: Path, tiny_cifar10):
    run_dir = _run(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny archive's MD5 is not the official one
        r = evaluate_corruptions(
            run_dir, data_dir=tiny_cifar10.data_dir, severities=(1, 5), names=["contrast", "jpeg"], limit=6
        )
    assert r["n"] == 6 and r["seed"] == 0 and r["severities"] == [1, 5]
    assert set(r["results"]) == {"contrast", "jpeg"} and set(r["results"]["jpeg"]) == {1, 5}
    accs = [a for v in r["results"].values() for a in v.values()]
    assert all(0 <= a <= 1 for a in accs)
    assert r["mean_accuracy"] == pytest.approx(np.mean(accs))
    if r["clean_accuracy"] > 0:
        assert r["relative_drop"] == pytest.approx(1 - r["mean_accuracy"] / r["clean_accuracy"])
    with pytest.raises(ConfigError, match="accepted values"):
        evaluate_corruptions(run_dir, data_dir=tiny_cifar10.data_dir, names=["nope"])


def test_evaluate_command_with_corruptions_writes_the_json(tmp_path: Path, tiny_cifar10, capsys):
    run_dir = _run(tmp_path)
    argv = ["evaluate", str(run_dir), "--data-dir", str(tiny_cifar10.data_dir), "--corruptions"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main([*argv, "--severities", "1,3", "--corruption-limit", "4"]) == 0
    out, err = capsys.readouterr()
    assert "clean accuracy" in out and "mean corruption accuracy" in out and "relative drop" in out
    for name in ALL:
        assert name in out
    saved = json.loads((run_dir / "eval_corruptions.json").read_text())
    for key in ("clean_accuracy", "n", "seed", "results", "mean_accuracy", "relative_drop", "per_corruption"):
        assert key in saved
    assert saved["n"] == 4 and set(saved["results"]) == set(ALL)
    assert set(saved["results"]["fog"]) == {"1", "3"}
    assert not (run_dir / "eval_test.json").exists()


def test_corruptions_that_cannot_be_saved_are_printed_with_the_reason(
    tmp_path: Path, tiny_cifar10, monkeypatch, capsys
):
    import errno

    run_dir = _run(tmp_path)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("cifarlab.files.write_json", read_only)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        argv = ["evaluate", str(run_dir), "--data-dir", str(tiny_cifar10.data_dir), "--corruptions"]
        assert cli.main([*argv, "--severities", "2", "--corruption-names", "contrast"]) == 1
    out, err = capsys.readouterr()
    assert "mean corruption accuracy" in out
    assert err.endswith(
        f"error: results not saved: cannot write {run_dir / 'eval_corruptions.json'}: Read-only file system\n"
    )
    assert not (run_dir / "eval_corruptions.json").exists()


# -- another test set ------------------------------------------------------------------------------------------------


def test_evaluate_on_other_test_data_with_a_subset_of_classes(tmp_path: Path, tiny_imagefolder, capsys):
    run_dir = _run(tmp_path)
    assert cli.main(["evaluate", str(run_dir), "--test-data", str(tiny_imagefolder.root)]) == 0
    out, err = capsys.readouterr()
    assert "accuracy" in out and "warning" not in err
    saved = json.loads((run_dir / "eval_data-tinyfolder.json").read_text())
    n = sum(tiny_imagefolder.counts["test"].values())
    assert saved["n"] == n and saved["classes"] == list(
        json.loads((run_dir / "config.json").read_text())["dataset"]["classes"]
    )
    support = {c: m["support"] for c, m in saved["per_class"].items() if m["support"]}
    assert support == tiny_imagefolder.counts["test"]  # labels mapped onto the run's classes by name
    assert saved["dataset"]["checksum_matches_run"] is None
    assert not (run_dir / "eval_test.json").exists()
    # robustness on that test set too
    argv = ["evaluate", str(run_dir), "--test-data", str(tiny_imagefolder.root), "--corruptions"]
    assert cli.main([*argv, "--severities", "1", "--corruption-names", "jpeg,contrast", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == n


def test_evaluate_on_test_data_with_unknown_classes_fails_clearly(tmp_path: Path, capsys):
    run_dir = _run(tmp_path)
    folder = write_imagefolder(tmp_path / "zoo", {"cat": (200, 30, 40), "zebra": (10, 10, 10)})
    assert cli.main(["evaluate", str(run_dir), "--test-data", str(folder.root)]) == 2
    err = capsys.readouterr().err
    assert "zebra" in err and "not classes of the run" in err and "Traceback" not in err
    assert cli.main(["evaluate", str(run_dir), "--test-data", str(folder.root), "--split", "val"]) == 2
    assert "no validation split" in capsys.readouterr().err
