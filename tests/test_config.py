"""--config / --set: typed parsing; bad values rejected, naming key and accepted values, before any work."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cifarlab import config
from cifarlab.errors import ConfigError
from cifarlab.recipes import RECIPES, Recipe, get_recipe


def resolve(*sets: str, name: str | None = "reference", **kw) -> Recipe:
    return config.resolve_recipe(name, sets=sets, **kw)


# -- parsing -------------------------------------------------------------------------------------------------


def test_values_are_parsed_to_the_field_types():
    r = resolve(
        "lr=1e-3",
        "epochs=7",
        "horizontal_flip=no",
        "nesterov=YES",
        "widths=16,32,32",
        "betas=[0.8, 0.99]",
        "dropout=(0.5, 0.25)",
        "label_smoothing=0",
        "optimizer=sgd",
        "description=a b=c",
    )
    assert r.lr == 1e-3 and isinstance(r.lr, float)
    assert r.epochs == 7 and isinstance(r.epochs, int)
    assert r.horizontal_flip is False and r.nesterov is True
    assert r.widths == (16, 32, 32) and r.betas == (0.8, 0.99) and r.dropout == (0.5, 0.25)
    assert r.label_smoothing == 0.0 and isinstance(r.label_smoothing, float)
    assert r.optimizer == "sgd" and r.description == "a b=c"


def test_empty_tuple_and_order_of_sets():
    r = config.resolve_recipe("fast", sets=["dropout=()", "epochs=3", "epochs=4"])
    assert r.dropout == () and r.epochs == 4  # applied in order: the last one wins


def test_default_recipe_and_unchanged_recipe():
    assert config.resolve_recipe(None) == get_recipe("fast")
    for name in RECIPES:
        assert config.resolve_recipe(name) == get_recipe(name)


# -- every bad value names the key, the value and what is accepted -------------------------------------------

BAD = [
    (["lr=-0.001"], ["lr", "-0.001", "> 0"]),
    (["lr=0"], ["lr", "> 0"]),
    (["batch_size=0"], ["batch_size", "> 0"]),
    (["batch_size=-5"], ["batch_size", "> 0"]),
    (["epochs=1.5"], ["epochs", "1.5", "integer"]),
    (["epochs=ten"], ["epochs", "ten", "integer"]),
    (["lr=fast"], ["lr", "fast", "number"]),
    (["lr=nan"], ["lr", "nan", "finite"]),
    (["l2=inf"], ["l2", "finite"]),
    (["horizontal_flip=maybe"], ["horizontal_flip", "maybe", "true/false"]),
    (["widths=64,x,128"], ["widths[1]", "'x'", "integer"]),
    (["widths=64,128"], ["widths", "three positive"]),
    (["betas=0.9"], ["betas", "list of 2"]),
    (["betas=0.9,1.5"], ["betas", "[0, 1)"]),
    (["dropout=0.5"], ["dropout", "two rates"]),
    (["dropout=0.5,1.0"], ["dropout", "[0, 1)"]),
    (["optimizer=rmsprop"], ["optimizer", "rmsprop", "adam, sgd"]),
    (["model=resnet"], ["model", "accepted values", "reference_cnn", "airnet"]),
    (["tta=rotate"], ["tta", "none, flip, flip_translate"]),
    (["precision=fp8"], ["precision", "auto, bf16, fp16, fp32"]),
    (["dataset=imagenet"], ["dataset", "imagenet", "cifar10, cifar100"]),
    (["val_fraction=1.5"], ["val_fraction", "[0.0, 0.9]"]),
    (["momentum=-0.1"], ["momentum"]),
    (["dense_width=0"], ["dense_width", "> 0"]),
    (["whiten_kernel=9"], ["whiten_kernel", "[1, 5]"]),
    (["seed=-1"], ["seed", "[0, "]),
    (["seed=99999999999999999999"], ["seed", "[0, "]),
    (["translate_pad=1000"], ["translate_pad", "[0, 16]"]),
    (["width_shift_range=2"], ["width_shift_range", "[0, 1)"]),
    (["name=../../etc"], ["name", "'../../etc'"]),
    (["val_fraction=0"], ["val_fraction=0", "plateau"]),
    (["val_fraction=0", "schedule=onecycle"], ["val_fraction=0", "early_stopping_patience=0"]),
]


@pytest.mark.parametrize("sets,needles", BAD, ids=[" ".join(s) for s, _ in BAD])
def test_bad_values_are_rejected_with_a_useful_message(sets, needles):
    with pytest.raises(ConfigError) as e:
        resolve(*sets)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_unknown_key_names_closest_match_and_accepted_keys():
    with pytest.raises(ConfigError) as e:
        resolve("learning_rat=0.1", "batchsize=3")
    msg = str(e.value)
    assert "'learning_rat'" in msg and "accepted keys:" in msg and "batch_size" in msg
    with pytest.raises(ConfigError, match=r"'batchsize' \(did you mean 'batch_size'\?\)"):
        resolve("batchsize=3")
    with pytest.raises(ConfigError, match=r"'learning-rate' \(did you mean 'lr'\?\)"):
        resolve("learning-rate=3")


def test_unknown_recipe():
    with pytest.raises(ConfigError, match=r"unknown recipe 'resnet50'; available: reference, fast, air94"):
        config.resolve_recipe("resnet50")


@pytest.mark.parametrize(
    "item,needle", [("lr", "KEY=VALUE"), ("=3", "key before '=' is empty"), ("recipe=fast", "--recipe")]
)
def test_malformed_set(item, needle):
    with pytest.raises(ConfigError, match=needle):
        resolve(item)


def test_parse_value_rejects_bool_for_int_and_float():
    with pytest.raises(ConfigError, match="epochs"):
        config.parse_value("epochs", True)
    with pytest.raises(ConfigError, match="lr"):
        config.parse_value("lr", False)
    assert config.parse_value("lr", 2) == 2.0 and isinstance(config.parse_value("lr", 2), float)


# -- config files --------------------------------------------------------------------------------------------


def test_yaml_file_with_recipe_and_overrides(tmp_path: Path):
    f = tmp_path / "exp.yaml"
    # PyYAML reads `1e-3` (no dot) as a string: it must still become the float 0.001.
    f.write_text("recipe: reference\nlr: 1e-3\nepochs: 12\nwidths: [32, 64, 64]\nhorizontal_flip: false\n")
    r = config.resolve_recipe(None, f)
    assert r.name == "reference" and r.lr == 0.001 and r.epochs == 12
    assert r.widths == (32, 64, 64) and r.horizontal_flip is False


def test_toml_file_and_set_after_file(tmp_path: Path):
    f = tmp_path / "exp.toml"
    f.write_text('recipe = "fast"\nepochs = 3\nlabel_smoothing = 0.1\nwidths = [16, 32, 64]\n')
    r = config.resolve_recipe(None, f, ["epochs=4"])
    assert r.name == "fast" and r.epochs == 4 and r.label_smoothing == 0.1 and r.widths == (16, 32, 64)


def test_explicit_recipe_wins_over_the_files(tmp_path: Path):
    f = tmp_path / "exp.yml"
    f.write_text("recipe: fast\nseed: 3\n")
    r = config.resolve_recipe("air94", f)
    assert r.name == "air94" and r.seed == 3


def test_a_runs_config_json_recreates_its_recipe(tmp_path: Path):
    original = get_recipe("reference").replace(lr=3e-3, widths=(16, 32, 32), seed=5)
    f = tmp_path / "config.json"
    f.write_text(json.dumps({"recipe": original.to_dict(), "seed": 5, "dataset": {"classes": []}}))
    assert config.resolve_recipe(None, f) == original


def test_empty_file_is_no_overrides(tmp_path: Path):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing\n")
    assert config.resolve_recipe("reference", f) == get_recipe("reference")


@pytest.mark.parametrize(
    "name,text,needles",
    [
        ("a.yaml", "lrr: 0.1\n", ["a.yaml", "'lrr'", "did you mean 'lr'"]),
        ("b.yaml", "epochs: ten\n", ["b.yaml", "epochs", "integer"]),
        ("c.yaml", "epochs: true\n", ["epochs", "integer"]),
        ("d.yaml", "batch_size: 0\n", ["batch_size", "> 0"]),
        ("e.yaml", "optim:\n  lr: 0.1\n", ["nested", "optim"]),
        ("f.yaml", "- lr\n- 0.1\n", ["mapping"]),
        ("g.yaml", "lr: [0.1\n", ["not valid YAML"]),
        ("h.toml", "lr = \n", ["not valid TOML"]),
        ("i.ini", "lr=0.1\n", [".ini", ".yaml, .yml, .toml"]),
        ("j.yaml", "recipe: nope\n", ["unknown recipe 'nope'"]),
        ("k.yaml", "recipe: 3\n", ["recipe=3", "recipe name"]),
        ("l.yaml", "!!python/object/apply:os.system ['echo hi']\n", ["not valid YAML"]),
        ("m.yaml", "lr: 0.1\nepochs: 3\nlr: 0.2\n", ["line 3", "'lr' appears twice"]),  # YAML would keep 0.2
    ],
)
def test_bad_config_files(tmp_path: Path, name, text, needles):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.resolve_recipe(None, f)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_missing_config_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="no such file"):
        config.resolve_recipe(None, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        config.resolve_recipe(None, tmp_path)


# -- datasets ------------------------------------------------------------------------------------------------


def test_dataset_names_and_paths(tmp_path: Path):
    assert resolve("dataset=CIFAR-100").dataset == "cifar100"
    tree = tmp_path / "data" / "mytree"
    tree.mkdir(parents=True)
    # Found inside --data-dir, like data.load_dataset looks it up: recorded as the resolved path.
    assert resolve("dataset=mytree", data_dir=tmp_path / "data").dataset == str(tree.resolve())
    assert resolve(f"dataset={tree}").dataset == str(tree)
    with pytest.raises(ConfigError, match="dataset"):
        resolve("dataset=mytree")  # not here, no data dir given


# -- argparse wiring, and failing before any work ------------------------------------------------------------


def test_add_recipe_args_and_recipe_from_args(tmp_path: Path):
    p = argparse.ArgumentParser()
    config.add_recipe_args(p)
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 2\n")
    args = p.parse_args(["--recipe", "reference", "--config", str(f), "--set", "lr=0.01", "--set", "seed=9"])
    r = config.recipe_from_args(args)
    assert (r.name, r.epochs, r.lr, r.seed) == ("reference", 2, 0.01, 9)
    assert config.recipe_from_args(p.parse_args([])) == get_recipe("fast")


def test_train_fails_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    from cifarlab import cli

    def no_work(*a, **k):
        raise AssertionError("training started despite a bad config")

    monkeypatch.setattr("cifarlab.experiment.run_experiment", no_work)
    monkeypatch.setattr("cifarlab.data.load_dataset", no_work)
    runs = tmp_path / "runs"
    for argv in (
        ["--set", "lr=-1"],
        ["--set", "batch_size=0"],
        ["--recipe", "nope"],
        ["--set", "btach_size=3"],
    ):
        assert cli.main(["train", "--runs-dir", str(runs), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
    assert not runs.exists()


def test_config_command_output_round_trips_as_a_config_file(tmp_path: Path, capsys):
    from cifarlab import cli

    parser = cli.build_parser(["config"])
    argv = ["config", "--recipe", "reference", "--set", "lr=2e-3", "--set", "widths=32,64,64"]
    argv += ["--set", "name=x1"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "lr: 0.002  # reference: 0.001" in out
    assert "widths: [32, 64, 64]  # reference: [64, 128, 128]" in out
    f = tmp_path / "resolved.yaml"
    f.write_text(out)
    expected = get_recipe("reference").replace(lr=2e-3, widths=(32, 64, 64), name="x1")
    assert config.resolve_recipe(None, f) == expected
    args = parser.parse_args([*argv, "--json"])
    assert args.func(args) == 0
    assert Recipe.from_dict(json.loads(capsys.readouterr().out)) == expected


def test_compile_is_refused_until_supported():
    from cifarlab.config import resolve_recipe

    with pytest.raises(ConfigError, match="compile"):
        resolve_recipe("fast", sets=["compile=true"])


# -- the recipe a machine trains: `cpu_fp32_variant` -------------------------------------------------------------


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> Recipe:
    """A registered recipe that names a CPU-fp32 variant (no built-in one does today)."""
    base = get_recipe("fast").replace(name="quick", cpu_fp32_variant="quick_fp32")
    monkeypatch.setitem(RECIPES, "quick", base)
    monkeypatch.setitem(RECIPES, "quick_fp32", base.replace(name="quick_fp32", cpu_fp32_variant="", epochs=3))
    return base


def test_machine_variant_is_chosen_where_the_recipe_would_train_in_fp32_on_a_cpu(quick: Recipe):
    assert all(not r.cpu_fp32_variant for r in RECIPES.values() if r.name != "quick")  # fast serves both CPUs
    assert config.machine_variant(quick.replace(precision="fp32"), "cpu") == "quick_fp32"
    assert config.machine_variant(quick.replace(precision="bf16"), "cpu") is None  # asked for bf16: no fp32 run
    assert config.machine_variant(quick.replace(precision="fp32", cpu_fp32_variant=""), "cpu") is None
    with pytest.raises(ConfigError, match="unknown recipe 'nope'"):
        config.machine_variant(quick.replace(precision="fp32", cpu_fp32_variant="nope"), "cpu")
    # the variant gets the same --set values the named recipe would have had
    r = resolve("seed=3", "precision=fp32", "batch_size=64", name="quick", device="cpu")
    assert (r.name, r.seed, r.batch_size, r.epochs) == ("quick_fp32", 3, 64, 3)
    assert resolve("precision=fp32", name="quick") == quick.replace(precision="fp32")  # no device: as named
    assert resolve("precision=fp32", name="fast", device="cpu").name == "fast"


def test_train_announces_the_variant_and_a_budget_plans_from_the_named_recipe(
    quick: Recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    import types

    from cifarlab import cli

    seen = []

    def fake_run(recipe, **kw):
        seen.append((recipe, kw.get("budget")))
        return types.SimpleNamespace(status="finished", metrics={"test_accuracy": 0.5}, run_dir=tmp_path)

    monkeypatch.setattr("cifarlab.experiment.run_experiment", fake_run)
    base = ["train", "--recipe", "quick", "--runs-dir", str(tmp_path), "--device", "cpu", "--set", "precision=fp32"]
    assert cli.main([*base, "--set", "seed=5"]) == 0
    assert (seen[-1][0].name, seen[-1][0].seed) == ("quick_fp32", 5)
    assert "recipe quick -> quick_fp32: this run trains in fp32 on a CPU" in capsys.readouterr().out
    assert cli.main([*base, "--budget", "60s"]) == 0
    assert seen[-1][0].name == "quick" and seen[-1][1] == 60.0
    assert cli.main([*base, "--set", "cpu_fp32_variant="]) == 0
    assert seen[-1][0].name == "quick"
    assert "->" not in capsys.readouterr().out


def test_config_command_notes_the_variant_this_machine_would_train(quick: Recipe, tmp_path: Path, capsys):
    import torch

    from cifarlab import cli

    parser = cli.build_parser(["config"])
    args = parser.parse_args(["config", "--recipe", "quick", "--set", "precision=fp32"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    if not torch.cuda.is_available():  # `--device auto` trains on the GPU there: no fp32 CPU run, no variant
        assert "# on this machine `cifarlab train` trains quick_fp32 instead" in out
    f = tmp_path / "shown.yaml"
    f.write_text(out)  # still a config file: the note is a comment
    assert config.resolve_recipe(None, f) == quick.replace(precision="fp32")


def test_fit_trains_the_variant_like_the_cli(quick: Recipe, monkeypatch: pytest.MonkeyPatch):
    from torch import nn

    import cifarlab
    import cifarlab.api

    seen = []

    class Stop(Exception):
        pass

    def fake_run(recipe, **kw):
        seen.append(recipe)
        raise Stop

    monkeypatch.setattr(cifarlab.api, "run_experiment", fake_run)
    module = nn.Sequential(nn.Flatten(), nn.LazyLinear(10))
    for kw in ({}, {"budget": "60s"}, {"model": module}, {"cpu_fp32_variant": ""}):
        with pytest.raises(Stop):
            cifarlab.fit("quick", device="cpu", precision="fp32", seed=2, **kw)
    assert [(r.name, r.seed) for r in seen] == [("quick_fp32", 2), ("quick", 2), ("quick", 2), ("quick", 2)]


@pytest.mark.parametrize(
    ("changes", "said"),
    [
        ({"lr": "0.1"}, "lr='0.1' must be a number, not str"),
        ({"epochs": 2.5}, "epochs=2.5 must be a whole number, not float"),
        ({"batch_size": True}, "batch_size=True must be a whole number, not bool"),
        ({"widths": [8, 16, 32]}, "(a tuple, not a list: widths=(8, 16, 32))"),
        ({"dropout": 0.5}, "dropout=(0.5,)"),
        ({"tta": 3}, "tta=3 must be one of 'none', 'flip', 'flip_translate'"),
        ({"train_scales": (0.5, "1")}, "train_scales=(0.5, '1') must be a tuple of numbers"),
    ],
)
def test_a_recipe_built_in_python_is_type_checked(changes: dict, said: str) -> None:
    """--set and config files parse their values; a Recipe made with replace() or given to register_recipe was
    not checked, and its string or list failed deep in training, after the run folder existed."""
    from cifarlab.recipes import get_recipe, register_recipe, validate

    bad = get_recipe("fast").replace(name="typed_bad", **changes)
    with pytest.raises(ConfigError) as e:
        validate(bad)
    assert said in str(e.value)
    with pytest.raises(ConfigError):
        register_recipe(bad)
    assert validate(get_recipe("fast").replace(lr=1)).lr == 1  # a whole number is a number


def test_a_json_config_with_a_key_twice_is_refused(tmp_path: Path) -> None:
    """YAML refused duplicate keys while JSON let the later one win silently."""
    path = tmp_path / "c.json"
    path.write_text('{"epochs": 1, "epochs": 2}')
    with pytest.raises(ConfigError, match="'epochs' appears twice"):
        config.load_config_file(path)
    path.write_text('{"epochs": 1, "lr": 2}')
    assert config.load_config_file(path)["epochs"] == 1


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_config_output_read_back_is_byte_for_byte_the_same(recipe: str, tmp_path: Path, capsys):
    """air94 set ema_start_epochs=3 (an int) on a float field: printed `3`, read back `3.0`. The Recipe stores the
    float, so every built-in (and plugin) recipe round-trips exactly, as YAML and as JSON."""
    from cifarlab import cli

    for extra, name in (([], "a.yaml"), (["--json"], "a.json")):
        assert cli.main(["config", "--recipe", recipe, *extra]) == 0
        first = capsys.readouterr().out
        (tmp_path / name).write_text(first)
        assert cli.main(["config", "--config", str(tmp_path / name), *extra]) == 0
        assert capsys.readouterr().out == first
    r = Recipe(ema_start_epochs=3, dropout=(0, 1), lr=1)  # as a plugin's recipe may write them
    assert (repr(r.ema_start_epochs), repr(r.dropout), repr(r.lr)) == ("3.0", "(0.0, 1.0)", "1.0")
    assert r.epochs == 30 and isinstance(r.epochs, int)  # int fields stay ints


def test_a_list_key_lists_the_names_it_takes_any_of(capsys):
    from cifarlab import cli

    assert cli.main(["config", "--recipe", "fast"]) == 0
    out = capsys.readouterr().out
    assert "callbacks: []  # any of dropblock_schedule (plugins may register more)" in out
    assert "; one of airnet, " in out  # a single-valued key: one of them


def test_a_runs_config_json_with_keys_outside_its_recipe_is_refused(tmp_path: Path):
    """Given a run's config.json, every top-level key but the run's own sections was dropped without a word:
    `lr` edited at top level trained with the recipe's lr."""
    run = {"recipe": get_recipe("fast").to_dict(), "seed": 0, "command": "cifarlab train", "machine": {}, "report": 1}
    f = tmp_path / "config.json"
    f.write_text(json.dumps(run))
    assert config.resolve_recipe(None, f) == get_recipe("fast")  # the run's own sections are fine
    cases = (
        (
            {"lr": 0.5},
            r"'lr' is a recipe key at the top level of a run's config.json, where it would be ignored; "
            r"put it under \"recipe\" or use --set lr=\.\.\.$",
        ),
        ({"comand": "x"}, r"unknown top-level key 'comand' in a run's config.json \(did you mean 'command'\?\); "),
        ({"seed": 7}, r"the top-level seed \(7\) is the run's record of recipe.seed \(0\); change the seed under "),
    )
    for extra, needle in cases:
        f.write_text(json.dumps({**run, **extra}))
        with pytest.raises(ConfigError, match=needle):
            config.resolve_recipe(None, f)
