"""Start-up, step by step: where a fresh process's seconds go before a run's clock starts.

    PYTHONPATH=src python benchmarks/startup.py [--device auto|cpu|cuda] [--json FILE]

Prints the process's age (wall-clock time since the parent spawned it, so the interpreter's own start is counted)
after each stage that
`cifarlab train` passes through before its first training step: the interpreter, `import torch`, the modules
the train command imports, the device's start (on a GPU: the CUDA context), the first matrix product (cuBLAS)
and the first convolutions in fp32 and under the recipe's autocast (cuDNN's or oneDNN's first call), with the
device drained after each, and when the process has exited as `cifarlab` exits (`cifarlab.cli.exit_now`: no
module teardown; on a GPU the driver still releases the context). Run it twice: the first run on a fresh machine pays
for cold file caches.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def stages(device_name: str) -> list[tuple[str, float]]:
    """[(stage, wall-clock time when it ended)], in order: the parent subtracts its spawn time."""
    rows = [("interpreter start-up", time.time())]
    import torch

    rows.append(("import torch", time.time()))
    import cifarlab.cli.train  # noqa: F401 - what `cifarlab train` imports before it loads data
    import cifarlab.experiment  # noqa: F401
    import cifarlab.train.loop  # noqa: F401

    rows.append(("import cifarlab (train command)", time.time()))
    from cifarlab.device import autocast, autocast_dtype, resolve_device

    device = resolve_device(device_name)

    def drain() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.zeros(1, device=device)
    drain()
    rows.append((f"start {device.type} (context)" if device.type == "cuda" else "first tensor", time.time()))
    a = torch.randn(256, 256, device=device)
    (a @ a).sum().item()
    rows.append(("first matrix product", time.time()))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the recipes train
    conv = torch.nn.Conv2d(24, 32, 3, padding=1).to(device, memory_format=torch.channels_last)
    x = torch.randn(256, 24, 31, 31, device=device).to(memory_format=torch.channels_last)
    conv(x).sum().backward()
    drain()
    rows.append(("first convolution, fp32, forward and backward", time.time()))
    dtype = autocast_dtype("auto", device)
    with autocast(device, dtype):
        y = conv(x)
    y.float().sum().backward()
    drain()
    rows.append((f"first convolution under autocast ({dtype or 'none'})", time.time()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", help="write the stages and the exit time here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the timed process itself
    args = ap.parse_args()
    if args.child:
        print(json.dumps(stages(args.device)), flush=True)
        from cifarlab.cli import exit_now

        exit_now(0)  # as `cifarlab` ends: exit handlers, no module teardown
    spawned = time.time()  # wall clock: the child's stamps are on the same clock
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--device", args.device], capture_output=True, text=True, check=True
    )
    exited = time.time() - spawned
    rows = [(name, t - spawned) for name, t in json.loads(out.stdout.strip().splitlines()[-1])]
    prev = 0.0
    print(f"{'stage':<50} {'seconds':>8} {'process age':>12}")
    for name, age in rows:
        print(f"{name:<50} {age - prev:8.2f} {age:12.2f}")
        prev = age
    print(f"{'exit (as cifarlab exits: no module teardown)':<50} {exited - prev:8.2f} {exited:12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"stages": rows, "exited_seconds": exited, "device": args.device}, f, indent=1)


if __name__ == "__main__":
    main()
