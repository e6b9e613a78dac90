"""The built-in optimizers run torch's own update code without importing the compiler (`eager_optimizer`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from cifarlab.recipes import get_recipe
from cifarlab.train.optim import Muon, build_optimizer, eager_optimizer, orthogonalize


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
        for recipe in (get_recipe("fast"), get_recipe("reference"), get_recipe("fast").replace(optimizer="muon")):
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


# -- Muon ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(16, 72), (72, 16), (32, 288)])  # filter banks: (out, in * 3 * 3)
def test_orthogonalize_keeps_the_singular_vectors_and_flattens_the_singular_values(shape: tuple[int, int]) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    g[:, 0] *= 50  # an ill-conditioned matrix: one direction dominates, as in a raw gradient
    out = orthogonalize(g)
    assert out.shape == g.shape and out.dtype == torch.float32
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.5 and s.max() < 1.3, s  # every direction now gets a step of about the same size
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vt  # the exact orthogonalization the 5 Newton-Schulz steps approximate
    assert torch.nn.functional.cosine_similarity(out.flatten(), polar.flatten(), dim=0) > 0.95


def test_muon_steps_filters_along_the_orthogonalized_momentum_and_others_like_torch_sgd() -> None:
    sgd_kwargs = {"lr": 0.1, "momentum": 0.85, "nesterov": True, "weight_decay": 5e-4}
    ref_model, _, _ = _train(torch.optim.SGD, sgd_kwargs)
    # no group marked `orthogonalize`: Muon is torch's Nesterov SGD, weight decay included
    model, opt, calls = _train(eager_optimizer(Muon), sgd_kwargs)
    assert calls == [1] * 5
    for a, b in zip(ref_model.state_dict().values(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)

    # a filter group: one step by hand
    conv = nn.Conv2d(3, 4, 3, bias=False)
    before = conv.weight.detach().clone()
    opt = eager_optimizer(Muon)([{"params": [conv.weight], "orthogonalize": True}], lr=0.2, momentum=0.6)
    conv(torch.randn(2, 3, 5, 5)).square().sum().backward()
    grad = conv.weight.grad.clone()
    opt.step()
    g = grad + 0.6 * grad  # Nesterov on the first step: the buffer is the gradient itself
    scaled = before * (2.0 / before.norm())  # filter bank rescaled to norm sqrt(out channels) = 2
    expected = scaled - 0.2 * orthogonalize(g.reshape(4, -1)).view_as(before)
    torch.testing.assert_close(conv.weight.detach(), expected)
    assert opt.state[conv.weight]["momentum_buffer"].equal(grad)


def test_muon_recipe_optimizer_splits_filters_from_the_rest_and_trains() -> None:
    from cifarlab.models import build_model

    recipe = get_recipe("fast").replace(optimizer="muon", widths=(8, 8, 8), batch_size=32)
    torch.manual_seed(0)
    model = build_model(recipe)
    opt = build_optimizer(model, recipe)
    filters, *rest = opt.param_groups
    assert filters["orthogonalize"] and filters["lr"] == recipe.muon_lr and filters["momentum"] == 0.6
    assert {id(p) for p in filters["params"]} == {id(p) for p in model.parameters() if p.requires_grad and p.dim() == 4}
    assert not any(g["orthogonalize"] for g in rest) and all(g["momentum"] == recipe.momentum for g in rest)
    # the other groups are exactly `sgd`'s, LRs and decay included
    sgd_groups = build_optimizer(model, recipe.replace(optimizer="sgd")).param_groups
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in rest] == [
        (g["lr"], g["weight_decay"], sum(p.dim() != 4 for p in g["params"])) for g in sgd_groups
    ]
    # a learnable task: 4 classes told apart by the mean colour of the image
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (128,), generator=g)
    x = torch.randn(128, 3, 16, 16, generator=g) * 0.5
    x[:, 0] += (y % 2).view(-1, 1, 1) * 1.0
    x[:, 1] += (y // 2).view(-1, 1, 1) * 1.0
    model.init_from_data(x)
    losses = []
    for _ in range(20):
        for i in range(0, 128, 32):
            loss = nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    # state round-trips through a checkpoint
    again = build_optimizer(model, recipe)
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[0]["orthogonalize"] is True
    assert torch.equal(
        again.state[filters["params"][0]]["momentum_buffer"], opt.state[filters["params"][0]]["momentum_buffer"]
    )


def test_muon_orthogonalizes_in_bf16_where_the_run_trains_in_bf16() -> None:
    from cifarlab.models import build_model

    g = torch.randn(32, 288, generator=torch.Generator().manual_seed(0))
    low = orthogonalize(g, dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(low.float().flatten(), orthogonalize(g).flatten(), dim=0)
    assert cos > 0.99  # the same update, to bf16's precision
    model = build_model(get_recipe("fast").replace(widths=(8, 8, 8)))
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        opt = build_optimizer(model, get_recipe("fast").replace(widths=(8, 8, 8), precision=precision))
        assert opt.ns_dtype == dtype
        conv = next(p for p in model.parameters() if p.dim() == 4 and p.requires_grad)
        conv.grad = torch.randn_like(conv)
        opt.step()  # the update lands in the parameter's own dtype
        assert conv.dtype == torch.float32 and torch.isfinite(conv).all()
