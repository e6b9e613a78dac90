"""The built-in optimizers run torch's own update code without importing the compiler (`eager_optimizer`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from cifarlab.train.optim import eager_optimizer


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _train(opt_cls: type, kwargs: dict, steps: int = 5) -> tuple[nn.Module, torch.optim.Optimizer, list]:
    model = _model()
    params = list(model.parameters())
    # two groups with different options, as the sgd recipe builds them
    groups = [{"params": params[:2], "lr": 0.05}, {"params": params[2:]}]
    opt = opt_cls(groups, **kwargs)
    calls: list[int] = []
    opt.register_step_post_hook(lambda o, args, kw: calls.append(1))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt, calls


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.85, "nesterov": True, "weight_decay": 5e-4}),
        (torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-7}),
    ],
)
def test_eager_optimizer_updates_exactly_like_torch(cls: type, kwargs: dict) -> None:
    ref_model, ref_opt, _ = _train(cls, kwargs)
    model, opt, calls = _train(eager_optimizer(cls), kwargs)
    assert isinstance(opt, cls) and type(opt) is not cls
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert calls == [1] * 5  # step hooks still run
    ref_state, state = ref_opt.state_dict(), opt.state_dict()
    assert ref_state["param_groups"] == state["param_groups"]
    for k, v in ref_state["state"].items():
        for name, t in v.items():
            assert torch.equal(torch.as_tensor(t), torch.as_tensor(state["state"][k][name]))
    # the update runs without an autograd graph, as torch's does
    assert all(not p.requires_grad or p.grad_fn is None for p in model.parameters())

    # a checkpoint written by either loads into the other and continues identically
    resumed = eager_optimizer(cls)(
        [{"params": list(ref_model.parameters())[:2], "lr": 0.05}, {"params": list(ref_model.parameters())[2:]}],
        **kwargs,
    )
    resumed.load_state_dict(ref_opt.state_dict())
    assert resumed.state_dict()["param_groups"] == ref_state["param_groups"]


def test_eager_optimizer_is_one_class_per_torch_class() -> None:
    assert eager_optimizer(torch.optim.SGD) is eager_optimizer(torch.optim.SGD)
    assert eager_optimizer(torch.optim.SGD).__name__ == "SGD"


def test_training_with_the_recipe_optimizers_does_not_import_the_compiler() -> None:
    # ~3 s of every run's start-up on a 2-core CPU went to importing torch._dynamo through torch.optim's guards.
    code = textwrap.dedent(
        """
        import sys, torch
        from torch import nn
        from cifarlab.recipes import get_recipe
        from cifarlab.train.optim import build_optimizer
        for name in ("fast", "reference"):
            recipe = get_recipe(name)
            model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
            opt = build_optimizer(model, recipe)
            for _ in range(2):
                opt.zero_grad()
                model(torch.randn(2, 3, 8, 8)).sum().backward()
                opt.step()
            opt.load_state_dict(opt.state_dict())
        print("torch._dynamo" in sys.modules)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
