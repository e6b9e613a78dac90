"""Device, precision and threads: where a run computes and in which number format, and why."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator

import torch
from torch import nn

from cifarlab.errors import ConfigError

__all__ = [
    "autocast",
    "autocast_dtype",
    "check_precision",
    "cpu_has_bf16",
    "cpu_isa_cap",
    "model_device",
    "precision_reason",
    "resolve_device",
    "set_threads",
    "without_cudnn_timing",
]


def resolve_device(device: str | None = None) -> torch.device:
    """'auto'/None: CUDA when available, else the CPU. A CUDA device that is not there is a clear error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):  # mps, xpu, ...: torch knows the name, cifarlab trains on CPUs and CUDA
        raise ConfigError(f"--device {device}: cifarlab runs on cpu or cuda devices only; use --device cpu")
    if dev.type == "cpu" and dev.index not in (None, 0):  # torch accepts and ignores it: a typo for cuda:N?
        raise ConfigError(f"--device {device}: there is one CPU device; use --device cpu (or cuda:N for a GPU)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"--device {device}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return dev


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU for a model with neither."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


# oneDNN instruction-set caps (ONEDNN_MAX_CPU_ISA) that leave it no native bf16, and torch's own kernel levels
# (ATEN_CPU_CAPABILITY) below AVX-512. A CPU with bf16 capped like this runs the kernels of an AVX2 machine: the
# same numbers as a CPU without bf16 (benchmarks/RESULTS.md, "A Zen 3 on a Zen 4"), and bf16 emulated.
_NO_BF16_ONEDNN = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}
_NO_BF16_ATEN = {"DEFAULT", "NO AVX", "AVX2"}


def cpu_isa_cap() -> str | None:
    """The environment setting that caps torch's CPU kernels below bf16 (e.g. 'ONEDNN_MAX_CPU_ISA=AVX2'), if any."""
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    if onednn in _NO_BF16_ONEDNN:
        return f"ONEDNN_MAX_CPU_ISA={onednn}"
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip()
    if aten and torch.backends.cpu.get_cpu_capability() in _NO_BF16_ATEN:
        return f"ATEN_CPU_CAPABILITY={aten}"
    return None


@functools.lru_cache(maxsize=1)
def _cpu_flags_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return platform.machine() == "arm64"  # Apple silicon has bf16
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16", " bf16"))


def cpu_has_bf16() -> bool:
    """True where the CPU has native bf16 matrix instructions (AVX512-BF16 / AMX on x86, BF16 on Arm) and the
    environment does not cap torch's kernels below them (`cpu_isa_cap`).

    Without them bf16 autocast is emulated and thousands of times slower than fp32, so 'auto' picks fp32.
    """
    return _cpu_flags_bf16() and (platform.machine() not in ("x86_64", "AMD64") or cpu_isa_cap() is None)


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse, before any work, a precision the device cannot run."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision=fp16 is only supported on CUDA; use precision=bf16, fp32 or auto on a CPU")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a recipe's precision on a device; None means plain fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16":
            return torch.float16
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    check_precision(precision, device)
    if precision == "bf16" or cpu_has_bf16():
        return torch.bfloat16
    return None


def precision_reason(precision: str, device: torch.device) -> str:
    """What a run computes in and why, for the first lines of its output and the report."""
    dtype = autocast_dtype(precision, device)
    name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    if precision != "auto":
        return f"{name} (precision={precision})"
    if device.type == "cuda":
        return f"{name} autocast: {'this GPU supports bf16' if dtype == torch.bfloat16 else 'no bf16 on this GPU'}"
    if dtype is None:
        cap = cpu_isa_cap()
        if cap is not None and _cpu_flags_bf16():
            return f"fp32: {cap} switches off this CPU's bf16 instructions (emulated bf16 would be far slower)"
        return "fp32: this CPU has no native bf16 (emulated bf16 would be far slower)"
    return "bf16 autocast + channels_last: this CPU has native bf16"


def autocast(
    device: torch.device, dtype: torch.dtype | None, cache_enabled: bool = True
) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)


@contextlib.contextmanager
def without_cudnn_timing(device: torch.device) -> Iterator[None]:
    """cuDNN's heuristics instead of its timing (`cudnn.benchmark` off) on a GPU inside the block, the setting
    restored after: for shapes met once or a few times (the model checks' 2-image forwards, inference's last
    partial batch, each serve request), timing every algorithm costs more than the fastest one wins back."""
    was = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = was and device.type != "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = was


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; from the CPU to a GPU through pinned memory, so the copy is queued like a kernel and the
    host does not wait for the GPU to drain its queue (a copy from pageable memory may)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def set_threads(n: int | None = None) -> int:
    """Use one thread per core we may run on: oversubscription costs more than it gains on 2 cores."""
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()
