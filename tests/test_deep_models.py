"""The deeper networks (pre-activation ResNet-18, Wide-ResNet, EfficientNet-B0 for 32x32) and their recipes:
shapes for any input, parameter counts against the papers, DropBlock / stochastic depth wiring, channels_last
and autocast, the recipe checks, the optional timm adapter, and a tiny end-to-end training of each recipe
through the CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from cifarlab import cli
from cifarlab.errors import ConfigError
from cifarlab.models import build_model, count_parameters
from cifarlab.models.dropblock import DropBlock2d, DropPath
from cifarlab.models.efficientnet import MBConv
from cifarlab.models.preact_resnet import PreActBlock
from cifarlab.recipes import Recipe, get_recipe, validate
from cifarlab.train.optim import build_optimizer


@pytest.fixture(autouse=True)
def _runs_keep_one_thread(one_thread, monkeypatch):
    """Runs set one thread per core; on 2 shared cores tiny models train several times faster on one."""
    monkeypatch.setattr("cifarlab.experiment.set_threads", lambda n=None: torch.get_num_threads())


# Each model at test size: the recipe that trains it, with tiny width/depth overrides.
TINY = {
    "preact_resnet18": ("resnet18", {"width_factor": 0.125}),
    "wrn": ("wrn16_8", {"depth": 10, "width_factor": 0.5}),
    "efficientnet_b0": ("effnet_b0", {"width_factor": 0.25}),
}


def _tiny(model: str, **changes) -> Recipe:
    name, overrides = TINY[model]
    return get_recipe(name).replace(**overrides, **changes)


@pytest.mark.parametrize("model", list(TINY))
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (2, 9, 13)])
def test_any_input_shape_gives_logits(model, shape):
    torch.manual_seed(0)
    net = build_model(_tiny(model), num_classes=7, input_shape=shape).eval()
    out = net(torch.randn(3, *shape))
    assert out.shape == (3, 7) and torch.isfinite(out).all()


def _trainable(model: str, num_classes: int = 10, **changes) -> int:
    recipe = get_recipe(TINY[model][0]).replace(**changes)
    return count_parameters(build_model(recipe, num_classes, (3, 32, 32)))["trainable"]


def test_parameter_counts_match_the_papers():
    # CIFAR pre-activation ResNet-18 with its final BN: 11.2M
    assert _trainable("preact_resnet18") == 11_172_170
    # WRN-16-8: 11.0M in the Wide-ResNet paper's table
    assert _trainable("wrn") == 10_961_370
    # EfficientNet-B0: 5.3M with the 1000-class head (5,288,548 is the published count); 4.0M with 10 classes
    assert _trainable("efficientnet_b0", 1000) == 5_288_548
    assert _trainable("efficientnet_b0") == 4_020_358
    # width and depth come from the recipe: WRN-28-10 is the paper's 36.5M
    assert _trainable("wrn", depth=28, width_factor=10.0) == pytest.approx(36.5e6, rel=0.01)


def test_resnet18_and_efficientnet_structure():
    torch.manual_seed(0)
    resnet = build_model(get_recipe("resnet18"))
    assert resnet.stem.kernel_size == (3, 3) and resnet.stem.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in resnet.modules())  # no max pool for 32x32
    blocks = [m for m in resnet.modules() if isinstance(m, PreActBlock)]
    assert len(blocks) == 8 and [b.conv2.out_channels for b in blocks[::2]] == [64, 128, 256, 512]
    feats: dict[str, torch.Size] = {}

    def keep(name):
        def hook(module, inputs, output):
            feats[name] = output.shape

        return hook

    resnet.body.register_forward_hook(keep("map"))
    resnet.eval()(torch.randn(1, 3, 32, 32))
    assert feats["map"] == (1, 512, 4, 4)

    effnet = build_model(get_recipe("effnet_b0")).eval()
    mb = [m for m in effnet.modules() if isinstance(m, MBConv)]
    assert len(mb) == 16 and all(isinstance(m.se.reduce, nn.Conv2d) for m in mb)
    assert any(isinstance(m, nn.SiLU) for m in effnet.modules())
    effnet.blocks.register_forward_hook(keep("eff"))
    effnet(torch.randn(1, 3, 32, 32))
    assert feats["eff"] == (1, 320, 4, 4)  # 8x downsampling for 32x32 (the paper's 32x on 224)


@pytest.mark.parametrize("model", list(TINY))
def test_dropblock_and_stochastic_depth_come_from_the_recipe(model):
    off = build_model(_tiny(model, stochastic_depth=0.0))
    assert not any(isinstance(m, (DropBlock2d, DropPath)) for m in off.modules())
    on = build_model(_tiny(model, dropblock_prob=0.1, dropblock_size=2, stochastic_depth=0.2))
    # DropBlock only in the stages of the last two resolutions (ResNet-18 and EfficientNet: 8x8 and 4x4 for a
    # 32x32 input; WRN, three groups: 16x16 and 8x8)
    where = {}
    for block in on.modules():
        if isinstance(block, (PreActBlock, MBConv)):
            block.register_forward_hook(
                lambda m, i, o: where.setdefault(o.shape[-1], set()).add(m.dropblock is not None)
            )
    on.train()(torch.randn(2, 3, 32, 32))
    sizes = sorted(where)
    assert sizes[:2] == ([8, 16] if model == "wrn" else [4, 8])
    assert [where[k] for k in sizes] == [{True}, {True}] + [{False}] * (len(sizes) - 2)
    assert {m.block_size for m in on.modules() if isinstance(m, DropBlock2d)} == {2}
    # stochastic depth grows linearly to the recipe's rate at the last block
    rates = [m.drop_prob for m in on.modules() if isinstance(m, DropPath)]
    assert rates == sorted(rates) and 0 < rates[0] < rates[-1] <= 0.2 + 1e-12
    assert on.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("model", list(TINY))
def test_stages_for_freezing_cover_the_body_input_first(model):
    net = build_model(_tiny(model))
    stages = net.stages()
    assert len(stages) == {"preact_resnet18": 4, "wrn": 3, "efficientnet_b0": 7}[model]
    owned = [{id(p) for p in s.parameters()} for s in stages]
    assert all(owned) and sum(map(len, owned)) == len(set().union(*owned))  # non-empty and disjoint
    assert {id(p) for p in net.stem.parameters()} <= owned[0]  # the input conv belongs to the first stage
    rest = {id(p) for p in net.parameters()} - set().union(*owned)
    classifier = {id(p) for p in net.fc.parameters()} if model == "efficientnet_b0" else set()
    classifier |= {id(p) for p in getattr(net.head, "fc", net.head).parameters()}
    assert classifier <= rest  # the classifier is never a stage


@pytest.mark.parametrize("model", list(TINY))
def test_channels_last_autocast_l2_and_bn_groups(model):
    torch.manual_seed(0)
    recipe = _tiny(model, dropblock_prob=0.1)
    net = build_model(recipe).to(memory_format=torch.channels_last).train()
    x = torch.randn(4, 3, 32, 32).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x)
    assert out.dtype == torch.bfloat16 and out.shape == (4, 10) and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    # l2 applies to conv and linear kernels only
    kernels = net.regularized_weights()
    assert kernels and all(w.dim() in (2, 4) for w in kernels)
    assert not {id(p) for p in kernels} & {id(m.weight) for m in net.modules() if isinstance(m, nn.BatchNorm2d)}
    # the sgd optimizer finds every BatchNorm parameter by name (its bias_lr_scale group)
    opt = build_optimizer(net, recipe)
    n_norm = sum(2 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert len(opt.param_groups[0]["params"]) == n_norm


def test_recipe_checks_for_the_new_models():
    with pytest.raises(ConfigError, match="6n \\+ 4"):
        validate(get_recipe("wrn16_8").replace(depth=15))
    with pytest.raises(ConfigError, match="takes one rate"):
        validate(get_recipe("reference").replace(model="preact_resnet18"))
    with pytest.raises(ConfigError, match="timm_name"):
        validate(get_recipe("fast").replace(model="timm"))
    with pytest.raises(ConfigError, match="dropblock_prob"):
        validate(get_recipe("reference").replace(dropblock_prob=1.0))
    validate(get_recipe("reference").replace(model="wrn", depth=22, dropout=(0.3,)))


def test_timm_adapter_without_timm_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm then raises ImportError
    recipe = get_recipe("fast").replace(model="timm", timm_name="resnet18")
    with pytest.raises(ConfigError, match="timm package"):
        build_model(recipe)


def _timm_imports() -> bool:
    try:
        import timm  # noqa: F401
    except Exception:  # timm imports torchvision, which fails beside the CPU build of torch
        return False
    return True


@pytest.mark.skipif(not _timm_imports(), reason="timm cannot be imported here (GPU machines have it)")
def test_timm_adapter_builds_a_named_model():
    recipe = get_recipe("fast").replace(model="timm", timm_name="resnet18")
    net = build_model(recipe, num_classes=5, input_shape=(1, 28, 28)).eval()
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 5)
    assert net.regularized_weights()
    with pytest.raises(ConfigError, match="timm_name"):
        build_model(recipe.replace(timm_name="no_such_model_xyz"))


@pytest.mark.parametrize("model", list(TINY))
def test_recipe_trains_end_to_end_through_the_cli(tmp_path, tiny_cifar10, model):
    name, overrides = TINY[model]
    runs = tmp_path / "runs"
    sets = [f"{k}={v}" for k, v in {**overrides, "epochs": 1, "batch_size": 16, "precision": "fp32"}.items()]
    argv = ["train", "--recipe", name, *[a for s in sets for a in ("--set", s)], "--set", "dropblock_prob=0.1"]
    argv += ["--data-dir", str(tiny_cifar10.data_dir), "--runs-dir", str(runs), "--quiet"]
    argv += ["--no-report"]
    assert cli.main(argv) == 0
    (run,) = runs.iterdir()
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"]["model"] == model and config["recipe"]["name"] == name
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
