"""Why `compile=true` gave NaN under bf16 autocast on the CPU, and the check that it no longer does.

    PYTHONPATH=src python benchmarks/compile_nan.py

Trains a small `fast` airnet for 4 steps four ways (eager / torch.compile, fp32 / bf16 autocast) from the same
init and prints the losses and any parameter that became non-finite. Then the minimal case: the gradient of
`amax(gelu(x), dim=(2, 3))` for a bf16 `x`, eager against inductor, with and without an fp32 upcast before the
max. On a CPU without bf16 units (AMD Zen 3) bf16 is emulated: the tiny widths keep it to about a minute.

Cause (torch 2.13, inductor on the CPU): inductor fuses the GELU into the global max-pool reduction and computes
it in fp32, but the backward's tie mask (`x == max`) compares the bf16-rounded GELU output with that fp32 max; no
element matches, the gradient is divided by a tie count of 0, and every layer below gets NaN. The airnet now
takes its global max of `x.float()`: bit-identical in eager mode, finite under inductor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cifarlab.models import build_model
from cifarlab.recipes import get_recipe


def train_four_steps(precision: str, compiled: bool) -> list[str]:
    torch.manual_seed(0)
    model = build_model(get_recipe("fast").replace(widths=(8, 16, 16)))
    model.init_from_data(torch.rand(200, 3, 32, 32) * 4 - 2)
    model = model.to(memory_format=torch.channels_last).train()
    x = (torch.rand(64, 3, 32, 32) * 4 - 2).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.85, nesterov=True)
    forward = torch.compile(model) if compiled else model
    out = []
    for _ in range(4):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
        out.append(f"{loss.item():.4f}" + (f" (non-finite: {', '.join(bad[:3])}...)" if bad else ""))
    return out


def minimal(upcast: bool) -> tuple[bool, float]:
    def f(x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(x)
        return torch.amax(h.float() if upcast else h, dim=(2, 3)).float().square().sum()

    torch.manual_seed(0)
    x = torch.randn(8, 16, 3, 3).bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_()
    grads = []
    for fn in (f, torch.compile(f)):
        x.grad = None
        fn(x).backward()
        grads.append(x.grad.float())
    return bool(torch.isfinite(grads[1]).all()), float((grads[0] - grads[1]).abs().nan_to_num(float("inf")).max())


def main() -> None:
    print(f"torch {torch.__version__}")
    for precision in ("fp32", "bf16"):
        for compiled in (False, True):
            name = f"{precision} {'compiled' if compiled else 'eager'}"
            print(f"{name:14s} losses: {', '.join(train_four_steps(precision, compiled))}")
    for upcast in (False, True):
        finite, diff = minimal(upcast)
        form = "amax(gelu(x).float())" if upcast else "amax(gelu(x))"
        print(f"{form:22s} x bf16: inductor gradient finite {finite}, max |eager - inductor| {diff:.3g}")


if __name__ == "__main__":
    main()
