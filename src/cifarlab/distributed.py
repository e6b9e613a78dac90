"""Many processes through PyTorch's own distributed engine: `torchrun ... -m cifarlab.cli train ...`.

torchrun starts one process per GPU (or per CPU slot) and tells each who it is through environment variables
(`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`). `setup` reads them and,
when `WORLD_SIZE` > 1, joins the process group: NCCL when the processes train on CUDA (each on
``cuda:LOCAL_RANK``), gloo on CPUs. Without torchrun (or with one process) `setup` returns None and nothing
changes: the single-process path never touches this module's collectives.

What the rest of cifarlab does with a `Distributed` (see the README, "Many GPUs and machines: torchrun"):

- `BatchLoader(rank=..., world=...)`: every rank builds the same seeded global batch (same order, same
  augmentation draws) and keeps its contiguous slice, so global batch B on N processes is one process with
  batch B; the LR schedule counts global steps.
- `Trainer(dist=...)`: forward/backward through `DistributedDataParallel` (the plain module stays the model that
  is saved, checkpointed and given to callbacks: no ``module.`` prefixes), each step's loss, accuracy and count
  summed over ranks (callbacks see global numbers), buffers (BatchNorm statistics) taken from rank 0 before
  validation, validation numbers broadcast from rank 0: every rank makes the same early-stopping and
  plateau decisions.
- `experiment`: rank 0 alone creates the run folder and writes every file; it broadcasts the folder's path.
  Every rank reads the checkpoint on `--resume`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from cifarlab.errors import ConfigError, UserError

__all__ = [
    "Distributed",
    "env_world",
    "first_to_say",
    "install_agreed_stop",
    "launcher_gone",
    "peer_ended",
    "peer_lost",
    "peer_lost_reason",
    "said_in_one_line",
    "setup",
    "stop_requested",
    "threads_per_process",
    "watch_launcher",
]

# torchrun's environment variables.
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


_STOP = threading.Event()  # this process was asked to stop (SIGINT/SIGTERM); the ranks agree on it per step
STOP_CHECK_STEPS = 16  # on GPUs the flag is read every this many steps (a read is a host synchronisation)


def install_agreed_stop() -> None:
    """SIGINT and SIGTERM in a torchrun process: the first one sets a flag that every rank reads at the same
    step (summed with the step's numbers), so all of them stop there together and the run is marked stopped;
    raising at once in the signalled process alone left the others waiting in the next all-reduce for gloo's
    30-minute timeout. A second signal stops this process at once. The death of the process that started this
    one sets the flag too (`watch_launcher`)."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        if _STOP.is_set():
            raise KeyboardInterrupt
        _STOP.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
    watch_launcher()


PARENT_CHECK_SECONDS = 1.0  # how often a rank looks for its launcher (one getppid() call)
ORPHAN_EXIT_SECONDS = 600.0  # an orphaned rank that has not stopped by then (stuck outside training) exits


def watch_launcher(
    check_s: float = PARENT_CHECK_SECONDS, exit_after_s: float = ORPHAN_EXIT_SECONDS
) -> threading.Thread:
    """A daemon thread that asks for the agreed stop when this process's parent (torchrun's agent, or the
    `--nproc` launcher) dies without stopping its workers: SIGKILL, the OOM killer, a closed session. torchrun
    starts each worker in a session of its own, so they used to train on as orphans, holding the run's lock and
    the cores, and nobody left to read their exit. The parent is polled (PR_SET_PDEATHSIG would fire when the
    launcher's spawning *thread* ends, not only its process). An orphan still alive `exit_after_s` after the
    request (stuck in a collective with a peer that died, say) ends itself; every file it writes is written
    atomically, so nothing is left half-written."""
    parent = os.getppid()
    _PARENT[0] = parent

    def watch() -> None:
        while not _STOP.wait(check_s):
            if os.getppid() != parent:
                break
        else:
            return  # a signal asked for the stop: the signal's path handles it
        # No word here: another process may see it first and stop this one through the agreed flag before this
        # thread wakes; the first process says why once the run is marked stopped (`launcher_gone`).
        _STOP.set()
        time.sleep(exit_after_s)
        os._exit(1)  # still here: the stop was never read

    t = threading.Thread(target=watch, name="cifarlab-launcher-watch", daemon=True)
    t.start()
    return t


_PARENT = [0]  # the parent `watch_launcher` watches (0: not watching)


def launcher_gone() -> int | None:
    """The pid of this process's launcher when it has died since `watch_launcher` started (the process is an
    orphan now), else None."""
    parent = _PARENT[0]
    return parent if parent and os.getppid() != parent else None


def stop_requested() -> float:
    """1.0 when this process was asked to stop (`install_agreed_stop`), else 0.0."""
    return 1.0 if _STOP.is_set() else 0.0


# What gloo and NCCL raise in a process whose peer died mid-collective (a plain RuntimeError from gloo).
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")


def peer_lost(e: BaseException) -> bool:
    """Whether `e` is a collective failing because another process of the group is gone (killed, crashed)."""
    import torch.distributed as dist

    kinds = tuple(k for k in (getattr(dist, "DistNetworkError", None),) if isinstance(k, type))
    return isinstance(e, kinds) or (isinstance(e, RuntimeError) and any(s in str(e) for s in _PEER_LOST))


def peer_lost_reason(e: BaseException) -> str:
    """`e`'s first line without gloo's source location and advice: "gloo: Connection closed by peer [addr]"."""
    import re

    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". This is typically")[0].strip()
    return f"{'nccl' if 'NCCL' in str(e) else 'gloo'}: {text[:200]}"


def peer_ended(e: BaseException, when: str) -> str:
    """The one line for a collective `e` that failed because another process is gone: "another process of this
    training ended {when} (gloo: Connection closed by peer [addr])"."""
    return f"another process of this training ended {when} ({peer_lost_reason(e)})"


@contextlib.contextmanager
def said_in_one_line(when: str, error: type[Exception] = UserError) -> Iterator[None]:
    """A collective in the block that fails because another process of the group is gone raises `error` with one
    line (`peer_ended`; the process that ended says why itself, torchrun names it) instead of gloo's traceback.
    For the collectives outside the training loop, where a process waits for the others (the data, the run
    folder): one process failing alone there left the others printing gloo's `[rank0]: Traceback ...`."""
    try:
        yield
    except RuntimeError as e:  # gloo's errors and DistNetworkError are RuntimeErrors
        if not peer_lost(e):
            raise
        raise error(f"{peer_ended(e, when)}; its own message says why") from None


def env_world() -> tuple[int, int, int, int] | None:
    """(rank, world_size, local_rank, local_world_size) from torchrun's environment; None when `WORLD_SIZE` is
    unset or 1 (a single process: nothing distributed happens)."""
    world = os.environ.get("WORLD_SIZE")
    if world is None or int(world) <= 1:
        return None
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; start the processes with torchrun")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return rank, int(world), local_rank, local_world


SAY_STORE_TIMEOUT_S = 5.0  # connecting to torchrun's store (local or the first node's; it is up while the job is)


def first_to_say(text: str) -> bool:
    """Whether this process is the one to print `text`, a user-facing error (one line, or a plugin's traceback and
    its line). Under torchrun every process usually meets the same error after the data is loaded (a recipe
    value only the data can check, a model that does not fit, out of memory) and each printed it: the user read
    it once per process. Each process claims its text with an atomic add in torchrun's own key-value store (the
    agent's, which outlives every worker and is there under `--nproc` and a bare `torchrun` alike, on one machine
    or many): the first to claim a text prints it, the others stay silent, and a text only one process meets
    (another rank's own error) is still printed, at once, with no waiting for the others. Where that store cannot
    be used (another launcher, a torchrun without an agent store), every process prints, as before: duplicated
    rather than lost."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true" or "MASTER_ADDR" not in os.environ:
        return True
    import hashlib

    import torch.distributed as dist

    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted job says its errors again
    key = f"cifarlab/said/{attempt}/{hashlib.sha256(text.encode()).hexdigest()}"
    try:
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=SAY_STORE_TIMEOUT_S),
        )
        return int(store.add(key, 1)) == 1
    except (RuntimeError, ValueError, KeyError, OSError):  # no store to ask (DistError is a RuntimeError): say it
        return True


def threads_per_process(local_world: int) -> int:
    """CPU threads for each of `local_world` processes on this machine: the cores we may use, shared out."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world))


def _device_for(device: str | None, local_rank: int) -> torch.device:
    want = (device or "auto").lower()
    if want == "cpu":
        return torch.device("cpu")
    if want in ("auto", "cuda"):
        if torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise UserError(
                    f"local rank {local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                    "start at most that many processes per node (--nproc-per-node)"
                )
            return torch.device("cuda", local_rank)
        if want == "cuda":
            raise UserError("--device cuda: no CUDA device is available")
        return torch.device("cpu")
    raise ConfigError(
        f"--device {device}: under torchrun each process takes cuda:LOCAL_RANK (or the CPU); use --device auto, "
        "cuda or cpu"
    )


@dataclass
class Distributed:
    """This process's place in the group and the few collectives cifarlab uses."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device
    backend: str
    sync_bn: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world // max(1, self.local_world))

    def describe(self) -> dict[str, Any]:
        return {
            "world_size": self.world,
            "nodes": self.nodes,
            "processes_per_node": self.local_world,
            "backend": self.backend,
            "sync_bn": self.sync_bn,
        }

    # -- collectives ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The block runs in process 0 first, then in the others together (a download or a cache that process 0
        fills and the others then read). If process 0 fails in it, the others get a one-line UserError (torchrun
        also stops them) instead of gloo's traceback; if another process ends meanwhile, process 0 gets one."""
        if not self.is_main:
            try:
                self.barrier()
            except RuntimeError as e:
                if not peer_lost(e):
                    raise
                raise UserError("process 0 of this training ended before this step: its message says why") from None
        yield
        if self.is_main:
            with said_in_one_line("while process 0 loaded the data"):
                self.barrier()

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.backend == "nccl":
            dist.barrier(device_ids=[self.device.index or 0])
        else:
            dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """`obj` from rank `src` (any picklable value) on every rank."""
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self.device if self.backend == "nccl" else None)
        return box[0]

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over ranks (in place; returned for chaining)."""
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_floats(self, values: Sequence[float | None], src: int = 0) -> list[float | None]:
        """Rank `src`'s numbers on every rank (None stays None), as float64 so nothing is rounded."""
        import torch.distributed as dist

        t = torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float64)
        t = t.to(self.device)
        dist.broadcast(t, src=src)
        return [None if v is None else float(x) for v, x in zip(values, t.cpu().tolist(), strict=True)]

    def sync_buffers(self, model: nn.Module, src: int = 0) -> None:
        """Every buffer (BatchNorm running statistics, counters) from rank `src`: without SyncBatchNorm each rank
        updates them from its own slice, so this makes validation, checkpoints and saved weights agree."""
        import torch.distributed as dist

        with torch.no_grad():
            for b in model.buffers():
                dist.broadcast(b, src=src)

    # -- the model -----------------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` inside DistributedDataParallel (for the forward and backward only; the plain module stays the
        one that is saved). Construction broadcasts rank 0's parameters and buffers."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)

    def convert_sync_bn(self, model: nn.Module) -> nn.Module:
        """BatchNorm layers as `nn.SyncBatchNorm` (statistics over the global batch). GPUs only: PyTorch's
        SyncBatchNorm refuses CPU tensors ("SyncBatchNorm expected input tensor to be on GPU")."""
        if self.device.type != "cuda":
            raise ConfigError(
                "--sync-bn needs GPUs: PyTorch's SyncBatchNorm runs on CUDA only (not on CPUs with gloo); drop "
                "--sync-bn (each process then normalizes with its own slice's statistics)"
            )
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)

    def shutdown(self, wait: bool = True) -> None:
        """Leave the process group. `wait` (a run that ended normally on every rank): first wait until every
        rank is done (rank 0 alone still evaluates and writes) and drop what still holds the group (the DDP
        reducer): a gloo rank that tore down while its peer was busy aborted at exit ~1 time in 4 on a 2-core
        Zen 4 ("terminate called without an active exception"). After an error, no wait: a peer may be stuck
        in a collective of its own, and torchrun ends the others when one rank fails."""
        import gc

        import torch.distributed as dist

        if not dist.is_initialized():
            return
        if wait:
            try:
                self.barrier()
            except RuntimeError:  # a peer already gone: nothing left to wait for
                pass
            gc.collect()
        dist.destroy_process_group()


@contextlib.contextmanager
def _sigterm_ends_the_join() -> Iterator[None]:
    """SIGTERM ends this process at once while it joins the group. torchrun sends it when another process failed
    before joining (a plugin that fails to load on one rank only), and the agreed stop's handler, which only sets
    a flag, cannot run while the join waits in C++ for the missing process: torchrun waited 30 s, then killed it
    (SIGKILL). Nothing is written before the group is joined, so there is nothing to save."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved if saved is not None else signal.SIG_DFL)


def setup(device: str | None = None, *, sync_bn: bool = False, timeout_s: float = 1800.0) -> Distributed | None:
    """Join torchrun's process group (None without torchrun or with one process): NCCL on CUDA, gloo on CPUs."""
    found = env_world()
    if found is None:
        if sync_bn:
            raise ConfigError("--sync-bn is for runs under torchrun with more than one process")
        return None
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run one process, without torchrun")
    rank, world, local_rank, local_world = found
    dev = _device_for(device, local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "gloo" and not dist.is_gloo_available():
        raise UserError("this PyTorch build has no gloo backend, which CPU training under torchrun needs")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
        with _sigterm_ends_the_join():
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    ctx = Distributed(rank, world, local_rank, local_world, dev, backend, sync_bn=sync_bn)
    if sync_bn:
        ctx.convert_sync_bn(nn.Identity())  # fails before any work on CPUs
    return ctx
