"""The model-size keys (widths, depth, width_factor, dense_width, whiten_kernel, whiten_width, head_scale): each
model declares those it reads (`MODELS.register(..., uses=...)`), the recipe check refuses a changed value of the
others (it would be ignored), and `--budget` scales the width key the model has (`widths`, else `width_factor`),
or plans epochs only."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import cifarlab
from _synth import FixedClock, SizedSlow, make_dataset
from cifarlab.budget import describe_width, plan_budget, scaled_recipe, width_key, width_scales
from cifarlab.cli import main as cli_main
from cifarlab.config import resolve_recipe
from cifarlab.data import BatchLoader
from cifarlab.errors import ConfigError
from cifarlab.models import build_model
from cifarlab.recipes import RECIPES, Recipe, get_recipe, unused_size_keys, validate
from cifarlab.registry import BUILTIN_RECIPES, MODELS

SIZE_KEYS = tuple(f.name for f in dataclasses.fields(Recipe) if f.metadata.get("size"))

# A small recipe for each built-in model (the deep ones at a fraction of their width), and another value of each
# size key: the model must change with each key it declares and stay the same with every other.
SMALL = {
    "airnet": get_recipe("fast"),
    "reference_cnn": get_recipe("reference"),
    "preact_resnet18": get_recipe("resnet18").replace(width_factor=0.125),
    "wrn": get_recipe("wrn16_8").replace(width_factor=0.5, depth=10),
    "efficientnet_b0": get_recipe("effnet_b0").replace(width_factor=0.25),
}
OTHER = {
    "widths": (16, 24, 40),
    "dense_width": 64,
    "whiten_kernel": 3,
    "whiten_width": 40,
    "head_scale": 0.5,
    "depth": 16,
    "width_factor": 0.375,
}


def test_the_size_keys_are_the_ones_the_models_read():
    assert set(SIZE_KEYS) == set(OTHER)
    assert MODELS.get("airnet").uses == {"widths", "whiten_kernel", "whiten_width", "head_scale"}
    assert MODELS.get("reference_cnn").uses == {"widths", "dense_width"}
    assert MODELS.get("preact_resnet18").uses == {"width_factor"}
    assert MODELS.get("wrn").uses == {"depth", "width_factor"}
    assert MODELS.get("efficientnet_b0").uses == {"width_factor"}
    assert MODELS.get("timm").uses == frozenset()


def _fingerprint(recipe: Recipe) -> tuple:
    torch.manual_seed(0)
    net = build_model(recipe, 10, (3, 32, 32)).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 32))
    return sum(p.numel() for p in net.parameters()), out.sum().item()


@pytest.mark.parametrize("model", sorted(SMALL))
def test_each_model_changes_with_the_keys_it_declares_and_with_no_other(model):
    recipe = SMALL[model]
    assert recipe.model == model
    before = _fingerprint(recipe)
    for key in SIZE_KEYS:
        changed = _fingerprint(recipe.replace(**{key: OTHER[key]}))
        if key in MODELS.get(model).uses:
            assert changed != before, f"{model} declares {key} but does not change with it"
        else:
            assert changed == before, f"{model} changes with {key} but does not declare it"


@pytest.mark.parametrize(
    ("recipe", "key", "value", "model"),
    [
        ("resnet18", "widths", "128,256,256", "preact_resnet18"),
        ("wrn16_8", "widths", "32,64,64", "wrn"),
        ("effnet_b0", "widths", "32,64,64", "efficientnet_b0"),
        ("resnet18", "dense_width", "512", "preact_resnet18"),
        ("resnet18", "depth", "28", "preact_resnet18"),
        ("fast", "depth", "28", "airnet"),
        ("fast", "width_factor", "2", "airnet"),
        ("reference", "width_factor", "2", "reference_cnn"),
        ("reference", "head_scale", "0.5", "reference_cnn"),
        ("reference", "whiten_width", "24", "reference_cnn"),
    ],
)
def test_a_size_key_the_model_ignores_is_refused(recipe, key, value, model):
    with pytest.raises(ConfigError) as e:
        resolve_recipe(recipe, sets=[f"{key}={value}"])
    msg = str(e.value)
    assert msg.startswith(f"{key}=") and f"model {model} does not use {key}" in msg and "would be ignored" in msg
    assert "pick a model that uses it" in msg


def test_the_message_says_what_to_leave_the_key_at_and_which_models_use_it():
    with pytest.raises(ConfigError, match=r"leave widths at 64,128,128, or pick a model that uses it \(airnet, "):
        resolve_recipe("resnet18", sets=["widths=128,256,256"])


@pytest.mark.parametrize("name", BUILTIN_RECIPES)
def test_every_built_in_recipe_passes_and_keeps_what_it_inherits(name):
    recipe = resolve_recipe(name)
    assert recipe == RECIPES[name]
    assert validate(RECIPES[name], check_paths=False) is RECIPES[name]  # without a base too: neutral values


@pytest.mark.parametrize(
    "sets",
    [
        ["model=preact_resnet18"],  # fast's widths and head_scale stay, unused: nothing the user changed
        ["name=mine", "model=wrn", "depth=22"],
        ["model=reference_cnn", "widths=32,64,64"],  # a model that reads widths takes any
        ["model=timm", "timm_name=resnet18"],
        ["model=preact_resnet18", "widths=64,128,128"],  # back to the default: harmless
    ],
)
def test_switching_the_model_keeps_the_base_recipes_values(sets):
    resolve_recipe("fast", sets=sets)


def test_the_check_follows_the_derived_recipe_in_python_too(tmp_path):
    ok = get_recipe("fast").replace(model="preact_resnet18")
    validate(ok, check_paths=False, base=get_recipe("fast"))
    with pytest.raises(ConfigError, match="model preact_resnet18 does not use widths"):
        validate(ok, check_paths=False)  # no base: the default only
    with pytest.raises(ConfigError, match="model preact_resnet18 does not use widths"):
        cifarlab.fit(get_recipe("resnet18").replace(widths=(128, 256, 256)), runs_dir=tmp_path / "runs")
    with pytest.raises(ConfigError, match="model efficientnet_b0 does not use depth"):
        cifarlab.fit("effnet_b0", depth=28, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_stored_run_recipe_with_an_ignored_value_still_loads():
    # A run of an earlier version, trained with a value its model ignored: its config.json must still load.
    d = get_recipe("resnet18").replace(widths=(128, 256, 256)).to_dict()
    assert Recipe.from_dict(d).widths == (128, 256, 256)


def test_config_output_marks_the_keys_the_model_does_not_use(capsys):
    assert cli_main(["config", "--recipe", "resnet18"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "widths: [64, 128, 128]  # not used by preact_resnet18" in lines
    assert "width_factor: 1.0" in lines  # used: no note
    assert cli_main(["config", "--recipe", "fast"]) == 0
    out = capsys.readouterr().out
    assert "depth: 16  # not used by airnet" in out and "widths: [32, 64, 128]\n" in out
    assert unused_size_keys(get_recipe("fast").replace(model="timm")) == SIZE_KEYS


# -- --budget -------------------------------------------------------------------------------------------------


def test_the_budget_scales_the_width_key_the_model_has():
    assert width_key(get_recipe("fast")) == "widths"
    assert width_key(get_recipe("reference")) == "widths"
    for name in ("resnet18", "wrn16_8", "effnet_b0"):
        assert width_key(get_recipe(name)) == "width_factor"
        r = scaled_recipe(get_recipe(name), 0.5)
        assert r.width_factor == get_recipe(name).width_factor / 2 and r.widths == get_recipe(name).widths
    assert width_scales(get_recipe("wrn16_8"))[0] == 2.0  # k 16: width_factor's bound
    assert width_scales(get_recipe("wrn16_8").replace(width_factor=10.0))[0] == 1.5  # 15 <= 16 < 20
    timm = get_recipe("fast").replace(model="timm", timm_name="resnet18")
    assert width_key(timm) is None and width_scales(timm) == (1.0,) and scaled_recipe(timm, 2.0) == timm


def _plan(recipe: Recipe, built: list[Recipe]):
    ds = make_dataset(16, 4)  # 64 images, batch 8: 8 steps per epoch

    def build(r: Recipe) -> nn.Module:
        built.append(r)
        return SizedSlow(0.002 * r.width_factor**2)

    return plan_budget(
        recipe,
        60.0,
        build=build,
        loader=lambda r: BatchLoader(ds.x_train, ds.y_train, 8, shuffle=True, drop_last=True),
        x_eval=ds.x_test[:8],
        n_test=len(ds.y_test),
        n_val=0,
        steps_per_epoch=8,
        device=torch.device("cpu"),
        clock=FixedClock("the test"),
    )


def test_a_budget_on_resnet18_chooses_its_width_factor_not_widths(one_thread):
    recipe = get_recipe("resnet18").replace(epochs=2, batch_size=8, tta="none", calibrate=False)
    built: list[Recipe] = []
    chosen, plan = _plan(recipe, built)
    assert {r.widths for r in built} == {recipe.widths}  # widths, which the model ignores, never change
    assert len({r.width_factor for r in built}) >= 2  # two widths probed
    assert chosen.width_factor == plan.width_factor == 2.0 and plan.scale == 2.0  # 60 s: the widest
    assert chosen.widths == recipe.widths and plan.widths == ()
    assert "budget 60 s: width_factor 2 (2x the recipe's)" in plan.describe()
    assert describe_width(plan.to_dict()) == "width_factor 2 (2x the recipe's)"
    validate(chosen, check_paths=False, base=recipe)


def test_a_budget_on_a_model_without_a_width_plans_epochs_only(one_thread):
    recipe = get_recipe("fast").replace(
        model="timm", timm_name="resnet18", epochs=2, batch_size=8, tta="none", train_scales=(), calibrate=False
    )
    built: list[Recipe] = []
    chosen, plan = _plan(recipe, built)
    assert all(r.widths == recipe.widths and r.width_factor == recipe.width_factor for r in built)
    assert len(plan.probes) == 1 and plan.scale == 1.0 and plan.widths == () and plan.width_factor is None
    assert chosen.widths == recipe.widths and chosen.epochs >= 2
    assert "model timm has no width setting to scale, so only epochs and TTA were planned" in plan.reason
    assert "the recipe's net as it is (its model has no width setting to scale: epochs only)" in plan.describe()


def test_old_budget_records_still_read():
    assert describe_width({"widths": [32, 64, 128], "scale": 1.0}) == "widths [32, 64, 128] (1x the recipe's)"
