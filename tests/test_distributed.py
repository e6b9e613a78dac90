"""Many processes under torchrun (DistributedDataParallel, gloo on 2 CPU processes) against one process.

The model is a BatchNorm-free CNN from a plugin: PyTorch's SyncBatchNorm runs on CUDA only, so on CPUs each
process would normalize with its own slice's statistics and the runs could not match exactly. No dropout (its
masks are drawn per process); the reference recipe's Keras augmentation stays on: its draws are shared, every
rank augments the same global batch. Everything runs with --deterministic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _synth import determinism_restored, make_images, write_image_folder
from cifarlab import cli
from cifarlab.augment import KerasAugment
from cifarlab.data import BatchLoader
from cifarlab.errors import ConfigError
from cifarlab.registry import CALLBACKS, MODELS
from cifarlab.runs import load_checkpoint

dist = pytest.importorskip("torch.distributed")
needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)

PLUGIN = '''
import os
import signal
from torch import nn
from cifarlab.registry import CALLBACKS, MODELS
from cifarlab.train.callbacks import Callback

class TinyNoBN(nn.Module):
    """A small CNN without BatchNorm. Its first conv is named `whiten`: its bias stops training mid-run
    (whiten_bias_epochs), so the parameters DDP reduces change between two steps of an epoch."""

    def __init__(self, c, num_classes):
        super().__init__()
        self.whiten = nn.Conv2d(c, 8, 3, padding=1)
        self.rest = nn.Sequential(
            nn.ReLU(), nn.MaxPool2d(4), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
            nn.Flatten(), nn.Linear(16, num_classes),
        )

    def forward(self, x):
        return self.rest(self.whiten(x))

@MODELS.register("tiny_nobn")
def tiny_nobn(recipe, num_classes, input_shape):
    return TinyNoBN(input_shape[0], num_classes)

class Crash(Callback):
    """After epoch $TEST_CRASH_AFTER_EPOCH (1-based; never by default) is checkpointed, every rank SIGKILLs its
    own process: no clean-up, as when the machine dies. (torchrun starts each worker in a session of its own,
    so killing torchrun's process group from outside would leave them running.)"""
    order = 200  # after the checkpoint (100)

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == int(os.environ.get("TEST_SIGTERM_RANK1_AFTER_EPOCH", "0")) and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGTERM)  # one rank only, as `kill PID` or a scheduler may do
        if epoch + 1 == int(os.environ.get("TEST_KILL_RANK1_AFTER_EPOCH", "0")) and os.environ["RANK"] == "1":
            os.kill(os.getpid(), signal.SIGKILL)  # one process dies (the OOM killer, a crash in native code)
        if epoch + 1 == int(os.environ.get("TEST_CRASH_AFTER_EPOCH", "0")):
            import torch.distributed as dist

            # Every rank past its epoch-end work first: rank 1 has none, and its death would otherwise let
            # torchrun stop rank 0 before its checkpoint is written (seen on a loaded 2-core CI machine).
            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            os.kill(os.getpid(), signal.SIGKILL)

CALLBACKS.register("test_crash")(lambda recipe: Crash())
'''

EPOCHS = 5
TRAIN = [
    "--recipe",
    "reference",
    "--set",
    "model=tiny_nobn",
    "--set",
    "dropout=()",
    "--set",
    "batch_size=16",  # 96 training images: 6 global steps per epoch, 8 images per process
    "--set",
    "precision=fp32",
    "--set",
    f"epochs={EPOCHS}",
    "--set",
    "early_stopping_patience=0",
    "--set",
    "whiten_bias_epochs=2.5",  # the first conv's bias stops training after step 3 of epoch 3's 6
    "--set",
    "callbacks=test_crash",
]


def _all_cores() -> None:
    """In the child: every core again (conftest pins the test process to one; two trainers share it badly)."""
    if hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
        except OSError:
            pass


def _torchrun(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # its rendezvous binds a free port itself: no port picked here that another may take
        "--nproc-per-node",
        "2",
        "-m",
        "cifarlab.cli",
        *args,
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("ddp")
    (base / "ddp_plugin.py").write_text(PLUGIN)
    root = base / "synth"
    write_image_folder(root, 30, 5)
    env = {
        **os.environ,
        "CIFARLAB_CACHE": str(base / "cache"),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",  # gloo on CPU processes, also on a machine with one GPU
    }
    return {"base": base, "plugin": str(base / "ddp_plugin.py"), "data": str(root), "env": env}


def _train_args(s: dict, runs: Path, *extra: str) -> list[str]:
    return [
        "--plugin",
        s["plugin"],
        "train",
        *TRAIN,
        "--set",
        f"dataset={s['data']}",
        "--runs-dir",
        str(runs),
        "--no-report",
        "--deterministic",
        "--quiet",
        *extra,
    ]


def _cifarlab(*args: str, env: dict) -> subprocess.CompletedProcess:
    """`python -m cifarlab.cli ARGS` in a fresh process on every core, its output captured (240 s at most)."""
    return subprocess.run(
        [sys.executable, "-m", "cifarlab.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=_all_cores,
    )


def _only_run(runs: Path) -> Path:
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def _train_here(s: dict, runs: Path) -> None:
    """The one-process run, in this test process (its imports are paid already); the plugin's names are
    unregistered and --deterministic's global switches put back afterwards."""
    try:
        with determinism_restored(), pytest.MonkeyPatch.context() as mp:
            mp.setenv("CIFARLAB_CACHE", s["env"]["CIFARLAB_CACHE"])
            assert cli.main(_train_args(s, runs, "--device", "cpu")) == 0  # as the ranks (no GPU for them)
    finally:
        MODELS.unregister("tiny_nobn")
        CALLBACKS.unregister("test_crash")


@pytest.fixture(scope="module")
def pair(setup: dict) -> dict:
    """One process with batch 16 (here), and two processes with global batch 16 killed after their first
    checkpoint, then resumed.

    One DDP run serves both tests: resumed exactly, it must end where one process ends (to float tolerance);
    resumed wrongly (batches, draws or schedule not where they were), it cannot."""
    s, base = setup, setup["base"]
    # Its workers kill themselves after epoch 1 (--nproc, which starts the same torchrun, is tested on its own).
    runs = base / "ddp"
    killed = subprocess.Popen(
        _torchrun(*_train_args(s, runs)),
        env={**s["env"], "TEST_CRASH_AFTER_EPOCH": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_all_cores,
    )
    try:
        _train_here(s, base / "single")  # while the DDP processes run
        _, err = killed.communicate(timeout=240)
    finally:
        killed.kill()
    assert killed.returncode != 0 and "SIGKILL" in err.decode(), err.decode()
    run = _only_run(runs)
    assert (run / "checkpoint.pt").is_file(), err.decode()  # what the killed ranks said, if the checkpoint is not there
    status_killed = json.loads((run / "status.json").read_text())["status"]
    epoch_killed = load_checkpoint(run / "checkpoint.pt")["epoch"]
    resumed = subprocess.run(
        _torchrun("--plugin", s["plugin"], "train", "--resume", str(run), "--no-report", "--deterministic", "--quiet"),
        env=s["env"],
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=_all_cores,
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    return {
        "single": _only_run(base / "single"),
        "ddp": run,
        "out_ddp": resumed.stdout,
        "status_killed": status_killed,
        "epoch_killed": epoch_killed,
    }


@needs_gloo
@pytest.mark.long
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(setup: dict) -> None:
    """SIGTERM to rank 1 alone: it used to leave the training loop by itself while rank 0 waited in the next
    step's all-reduce for gloo's 30-minute timeout. Now the ranks agree on the step: both stop, the run is
    marked stopped with its checkpoint, and it resumes."""
    s = setup
    runs = s["base"] / "signalled"
    t0 = time.monotonic()
    done = subprocess.run(
        _torchrun(*_train_args(s, runs)),
        env={**s["env"], "TEST_SIGTERM_RANK1_AFTER_EPOCH": "1"},
        capture_output=True,
        text=True,
        timeout=240,  # a hang would wait 30 minutes
        preexec_fn=_all_cores,
    )
    run = _only_run(runs)
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped", done.stdout + done.stderr
    assert "interrupted during epoch 2" in status["message"] and (run / "checkpoint.pt").is_file()
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert time.monotonic() - t0 < 200


@needs_gloo
@pytest.mark.long
def test_a_process_that_dies_is_reported_in_one_line_and_the_run_resumes(setup: dict) -> None:
    """Rank 1 SIGKILLed mid-run: rank 0's next all-reduce fails. It used to print gloo's traceback and leave its
    raw text (source path, "GLHF!") in status.json; now one line says another process ended and how to resume."""
    s = setup
    runs = s["base"] / "rank_died"
    done = _cifarlab(*_train_args(s, runs, "--nproc", "2"), env={**s["env"], "TEST_KILL_RANK1_AFTER_EPOCH": "2"})
    run = _only_run(runs)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "killed by SIGKILL" in done.stderr, done.stderr
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "crashed" and status["message"].startswith(
        "another process of this training ended during the run (gloo: "
    ), status
    assert "pair.cc" not in status["message"] and "GLHF" not in status["message"]
    # the run's plugin too, which --resume does not load by itself (QA round 17, M2)
    assert f"resume with: cifarlab --plugin {_recorded(s['plugin'])} train --nproc 2 --resume {run}" in done.stderr
    resumed = _cifarlab("--plugin", s["plugin"], "train", "--resume", str(run), "--no-report", env=s["env"])
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "status.json").read_text())["status"] == "finished"


def _recorded(plugin: str) -> str:
    """A plugin file as config.json records it and the resume line names it: absolute, quoted for a shell."""
    import shlex

    return shlex.quote(str(Path(plugin).resolve()))


def _processes_naming(text: str) -> list[int]:
    """The pids of this machine's processes whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@needs_gloo
@pytest.mark.long
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds the processes through /proc")
def test_ranks_stop_when_their_launcher_is_killed(setup: dict) -> None:
    """SIGKILL to `--nproc`'s launcher (torchrun's agent in that process) used to leave both ranks training as
    orphans (torchrun starts them in sessions of their own), holding the run's lock. Now they notice the launcher
    is gone, agree on a step, mark the run stopped (resumable, as after Ctrl-C) and exit."""
    s = setup
    runs = s["base"] / "orphaned"
    args = _train_args(s, runs)
    train = args.index("train")
    args[train + 1 : train + 1] = ["--nproc", "2"]
    args.remove("--quiet")  # (for the resume line)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "cifarlab.cli", *args, "--set", "epochs=20000"],
        env=s["env"],
        stdout=(base_out := (s["base"] / "orphaned.out").open("wb")),
        stderr=subprocess.PIPE,
        preexec_fn=_all_cores,
    )
    try:
        deadline = time.monotonic() + 180
        while not list(runs.glob("*/checkpoint.pt")):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stderr.read().decode()
            time.sleep(0.2)
        ranks = [p for p in _processes_naming(str(runs)) if p != launcher.pid]
        assert len(ranks) == 2, ranks
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 60
        while [p for p in ranks if p in _processes_naming(str(runs))] and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in ranks if p in _processes_naming(str(runs))]
        assert not left, f"ranks {left} still running 60 s after their launcher was killed"
    finally:
        launcher.kill()
        for pid in _processes_naming(str(runs)):
            os.kill(pid, 9)
    run = _only_run(runs)
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "stopped", status
    assert "interrupted during epoch" in status["message"]
    err = launcher.stderr.read().decode() if launcher.stderr else ""
    assert err.count("the launcher of this training") == 1, err  # said once (by local rank 0), not per rank
    base_out.close()
    # as many processes again (the processes' own command has no --nproc; the launcher passed it on)
    resume = f"resume with: cifarlab --plugin {_recorded(s['plugin'])} train --nproc 2 --resume {run}"
    assert resume in (s["base"] / "orphaned.out").read_text()
    command = json.loads((run / "config.json").read_text())["command"]
    assert command.startswith("cifarlab --plugin") and " train --nproc 2 --recipe reference " in command


@needs_gloo
@pytest.mark.long
def test_ddp_global_batch_matches_one_process(pair: dict) -> None:
    single, ddp = pair["single"], pair["ddp"]
    ws, wd = _weights(single), _weights(ddp)
    assert ws.keys() == wd.keys()  # the plain module's names: no "module." prefix
    for k in ws:
        torch.testing.assert_close(wd[k], ws[k], rtol=1e-4, atol=1e-5, msg=k)
    # The logged numbers are the global batch's, all-reduced over the ranks: they match one process's.
    hs, hd = (json.loads((r / "history.json").read_text()) for r in (single, ddp))
    assert len(hs) == len(hd) == EPOCHS
    for a, b in zip(hs, hd, strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    steps_single = (single / "steps.csv").read_text().splitlines()
    steps_ddp = (ddp / "steps.csv").read_text().splitlines()
    assert len(steps_single) == len(steps_ddp) == 1 + EPOCHS * 6  # the schedule counts global steps
    config = json.loads((ddp / "config.json").read_text())
    assert config["distributed"]["world_size"] == 2 and config["distributed"]["backend"] == "gloo"
    assert json.loads((single / "config.json").read_text())["distributed"] is None
    # Rank 0 alone wrote: one run folder with the files one process writes, one result line printed.
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    assert pair["out_ddp"].count("test accuracy") == 1


@needs_gloo
@pytest.mark.long
def test_ddp_killed_and_resumed_finishes_the_same_run(pair: dict) -> None:
    run = pair["ddp"]
    assert pair["status_killed"] == "running"  # killed mid-run: nothing marked it stopped
    assert pair["epoch_killed"] == 1
    assert json.loads((run / "status.json").read_text())["status"] == "finished"
    assert len([p for p in run.parent.iterdir() if p.is_dir()]) == 1  # resumed in place, not a second run
    # Where it ended is checked against one process in test_ddp_global_batch_matches_one_process.


def test_nproc_runs_the_same_command_under_torchrun(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`cifarlab train --nproc N ...` checks the recipe, then runs torchrun's launcher on the command without
    --nproc (the DDP runs above start torchrun the same way), its processes' failures mapped to exit statuses."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    launched: list[list[str]] = []
    monkeypatch.setattr(torchrun, "main", launched.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = ["train", "--recipe", "reference", "--set", "epochs=2", "--runs-dir", str(tmp_path / "runs")]
    for nproc in (["--nproc", "2"], ["--nproc=2"]):
        monkeypatch.setattr(sys, "argv", ["cifarlab", *args[:1], *nproc, *args[1:]])
        assert cli.main(sys.argv[1:]) == 0
        assert launched.pop() == ["--standalone", "--nproc-per-node=2", "-m", "cifarlab.cli", *args]

    def failing(*codes: int):
        def run(argv: list[str]) -> None:
            failures = {r: ProcessFailure(local_rank=r, pid=1, exitcode=c, error_file="") for r, c in enumerate(codes)}
            raise ChildFailedError("cifarlab.cli", failures)

        return run

    # every process stopped (Ctrl-C) or refused its input: that status, no torchrun traceback
    # one process refused its input and torchrun ended the other (SIGTERM) while it waited: that status too
    for codes, status in (((130, 130), 130), ((2, 2), 2), ((1, -9), 1), ((-15, 2), 2), ((2, -15), 2), ((1, 2), 1)):
        monkeypatch.setattr(torchrun, "main", failing(*codes))
        assert cli.main(sys.argv[1:]) == status
    # A bad value fails here, once, not in N processes; nothing is started.
    monkeypatch.setattr(sys, "argv", ["cifarlab", "train", "--nproc", "2", "--set", "epochs=0"])
    assert cli.main(sys.argv[1:]) == 2
    assert not (tmp_path / "runs").exists()


# -- the sharded loader, in process ------------------------------------------------------------------------


def _loaders(world: int, n: int = 50, batch: int = 16, **kw) -> list[BatchLoader]:
    x, y = make_images(n // 2, 2, seed=3)
    aug = KerasAugment()
    return [
        BatchLoader(
            x,
            y,
            batch,
            shuffle=True,
            seed=7,
            transform=aug,
            mean=(0.5,) * 3,
            std=(0.25,) * 3,
            rank=r,
            world=world,
            **kw,
        )
        for r in range(world)
    ]


def test_shards_put_together_are_the_single_process_batches() -> None:
    (one,) = _loaders(1)
    shards = _loaders(2)
    assert len(one) == len(shards[0]) == len(shards[1]) == 4  # 16, 16, 16, 2: global batches
    for epoch in (0, 3):
        for (xs, ys), (x0, y0), (x1, y1) in zip(
            one.epoch(epoch), shards[0].epoch(epoch), shards[1].epoch(epoch), strict=True
        ):
            assert torch.equal(torch.cat([x0, x1]), xs) and torch.equal(torch.cat([y0, y1]), ys)
    assert [shards[0].shard_weight(b) for b in range(4)] == [1.0] * 4


def test_uneven_last_batch_is_weighted_or_dropped() -> None:
    shards = _loaders(4, n=50, batch=16)  # last global batch: 2 images for 4 processes
    assert len(shards[0]) == 3  # dropped on every rank
    shards = _loaders(4, n=54, batch=16)  # last global batch: 6 images -> 2, 2, 1, 1
    assert len(shards[0]) == 4
    sizes = [len(list(s.epoch(0))[-1][1]) for s in shards]
    assert sizes == [2, 2, 1, 1]
    weights = [s.shard_weight(3) for s in shards]
    assert weights == pytest.approx([8 / 6, 8 / 6, 4 / 6, 4 / 6])
    # DDP averages the 4 ranks' weighted mean losses: every image then counts 1/6, as in one process.
    assert [w / (4 * n) for w, n in zip(weights, sizes, strict=True)] == pytest.approx([1 / 6] * 4)


def test_batch_must_split_evenly() -> None:
    with pytest.raises(ConfigError, match="multiple of the 3 processes"):
        _loaders(3, batch=16)


def test_single_process_needs_no_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from cifarlab.distributed import env_world, setup

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert env_world() is None and setup("cpu") is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert setup("cpu") is None
    with pytest.raises(ConfigError, match="torchrun"):
        setup("cpu", sync_bn=True)


def test_a_batch_that_does_not_split_names_the_process_counts_that_would() -> None:
    """On --resume the batch size is the run's: the error also says which process counts divide it."""
    from cifarlab.errors import UserError
    from cifarlab.experiment import _check_fits_data
    from cifarlab.recipes import get_recipe

    with pytest.raises(
        UserError, match=r"batch_size=8 is not a multiple of the 3 processes.*or start 2, 4, 8 processes"
    ):
        _check_fits_data(get_recipe("reference").replace(batch_size=8), 100, (3, 32, 32), world=3)
    _check_fits_data(get_recipe("reference").replace(batch_size=8), 100, (3, 32, 32), world=2)


def test_the_resume_command_keeps_the_process_count() -> None:
    from cifarlab.runs import resume_command

    assert resume_command("runs/a") == "cifarlab train --resume runs/a"
    assert resume_command("runs/a", {"world_size": 1, "nodes": 1}) == "cifarlab train --resume runs/a"
    assert resume_command("runs/a", {"world_size": 4, "nodes": 1}) == "cifarlab train --nproc 4 --resume runs/a"
    multi = resume_command("runs/a", {"world_size": 8, "nodes": 2})
    assert multi.startswith("torchrun --nnodes 2 --nproc-per-node 4 ") and "train --resume runs/a" in multi
    assert resume_command("runs/a", {"world_size": "bad"}) == "cifarlab train --resume runs/a"  # a damaged config
    # and the run's plugins (config.json's, or given), which --resume does not load by itself
    plugins = ["/p/my plugin.py", "mypkg.extras"]
    assert (
        resume_command("runs/a", {"world_size": 4, "nodes": 1}, plugins)
        == "cifarlab --plugin '/p/my plugin.py' --plugin mypkg.extras train --nproc 4 --resume runs/a"
    )
    multi = resume_command("runs/a", {"world_size": 8, "nodes": 2}, plugins[1:])
    assert "-m cifarlab.cli --plugin mypkg.extras train --resume runs/a (on each node)" in multi


@needs_gloo
@pytest.mark.long
def test_a_data_error_under_nproc_is_said_by_process_0_and_exits_2(setup: dict, tmp_path: Path) -> None:
    """Every process loaded (and would download) the data at once and printed the same error; now process 0 loads
    it first, the others wait, and the job exits 2 (refused input) without a traceback (QA)."""
    s = setup
    broken = tmp_path / "flat"
    (broken / "train").mkdir(parents=True)
    (broken / "test").mkdir()
    from PIL import Image

    for split in ("train", "test"):
        Image.new("RGB", (8, 8)).save(broken / split / "a.png")  # images without class folders
    args = _train_args(s, tmp_path / "runs")
    args[args.index(f"dataset={s['data']}")] = f"dataset={broken}"
    args[args.index("train") + 1 : args.index("train") + 1] = ["--nproc", "2"]
    done = _cifarlab(*args, env=s["env"])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "training processes failed" not in done.stderr, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("error:") and "process 0" not in line]
    assert len(said) == 1, done.stderr  # the data's error once, not once per process


@needs_gloo
@pytest.mark.long
def test_an_error_every_process_meets_after_the_data_is_said_once(setup: dict, tmp_path: Path) -> None:
    """A recipe value only the data can refuse (a batch larger than the training set with drop_last) fails in
    every process after it has loaded the data: each printed the line, the user read it twice. Now the first
    process to meet it says it (`distributed.first_to_say`), the others stay silent, and the job exits 2."""
    s = setup
    args = _train_args(s, tmp_path / "runs", "--set", "batch_size=128", "--set", "drop_last=true")
    args[args.index("train") + 1 : args.index("train") + 1] = ["--nproc", "2"]  # 128 splits: the launcher passes it
    done = _cifarlab(*args, env=s["env"])
    assert done.returncode == 2, done.stderr
    said = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert said == [
        "error: batch_size=128 is larger than the 96 training images and drop_last is on: not one "
        "training step would run; lower batch_size"
    ], done.stderr


RANK1_PLUGIN = """
import os
from torch import nn
from cifarlab.registry import MODELS

@MODELS.register("wrong_on_rank1")
def wrong_on_rank1(recipe, num_classes, input_shape):
    # Rank 1 alone builds a model with one logit too many: its check fails, rank 0's passes.
    extra = 1 if os.environ.get("RANK") == "1" else 0
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes + extra))
"""


@needs_gloo
@pytest.mark.long
def test_an_error_only_another_process_meets_is_still_said_under_a_bare_torchrun(setup: dict, tmp_path: Path) -> None:
    """The errors said once must not lose one that only a process other than 0 meets: under a bare `torchrun`
    (no `--nproc` launcher of ours) rank 1's own error is printed, once."""
    s = setup
    plugin = tmp_path / "rank1_plugin.py"
    plugin.write_text(RANK1_PLUGIN)
    args = _train_args(s, tmp_path / "runs", "--set", "model=wrong_on_rank1", "--set", "callbacks=")
    done = subprocess.run(
        _torchrun("--plugin", str(plugin), *args),
        env=s["env"],
        capture_output=True,
        text=True,
        timeout=240,
        preexec_fn=_all_cores,
    )
    assert done.returncode != 0, done.stderr
    wrong = "error: model 'wrong_on_rank1' returns shape (2, 5) for 2 images; it must return float logits"
    assert sum(line.startswith(wrong) for line in done.stderr.splitlines()) == 1, done.stderr
    assert "[rank0]:" not in done.stderr, done.stderr  # rank 0 waited for rank 1: one line, not gloo's traceback


def test_first_to_say_claims_each_text_once_in_torchruns_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """The claim itself, against a store like torchrun's agent store: the first claim of a text wins, a repeat
    loses, another text or another restart of the job wins again; without an agent store everyone says it."""
    from datetime import timedelta

    from cifarlab import distributed
    from cifarlab.distributed import first_to_say

    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert first_to_say("error: x\n") and first_to_say("error: x\n")  # no store: as before, every process says it
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert first_to_say("error: x\n") and not first_to_say("error: x\n") and not first_to_say("error: x\n")
    assert first_to_say("error: y\n")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert first_to_say("error: x\n")
    monkeypatch.setattr(distributed, "SAY_STORE_TIMEOUT_S", 0.2)
    monkeypatch.setenv("MASTER_PORT", "1")  # nothing listens there: say it rather than lose it
    assert first_to_say("error: x\n")


@needs_gloo
@pytest.mark.long
def test_an_error_only_process_1_meets_before_the_run_is_one_line_from_process_0(setup: dict, tmp_path: Path) -> None:
    """Rank 1 alone refuses its model (a plugin's, built differently there) while rank 0 passed: rank 0 used to
    print gloo's `[rank0]: Traceback ...` from the run folder's broadcast, and leave a folder marked running. Now
    every rank agrees that all have prepared before rank 0 writes anything: rank 0 says in one line that another
    process ended, rank 1's error is printed once, no run folder is made, and `--nproc` exits 2 (refused input)."""
    s = setup
    plugin = tmp_path / "rank1_plugin.py"
    plugin.write_text(RANK1_PLUGIN)
    runs = tmp_path / "runs"
    args = _train_args(s, runs, "--set", "model=wrong_on_rank1", "--set", "callbacks=")
    args[args.index("train") + 1 : args.index("train") + 1] = ["--nproc", "2"]
    done = _cifarlab("--plugin", str(plugin), *args, env=s["env"])
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "[rank0]:" not in done.stderr, done.stderr
    assert "training processes failed" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    wrong = "error: model 'wrong_on_rank1' returns shape (2, 5) for 2 images; it must return float logits"
    assert sum(line.startswith(wrong) for line in lines) == 1, done.stderr
    ended = "error: another process of this training ended before the run started (gloo: "
    assert sum(line.startswith(ended) for line in lines) == 1, done.stderr
    assert not runs.exists() or not [p for p in runs.iterdir() if p.is_dir()], list(runs.iterdir())


GLOO_LOST = (
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:63670. This "
    "is typically caused by a remote worker crashing. Check the logs of the remote worker before reporting an error."
)


def _lost(*args: object, **kwargs: object) -> None:
    raise RuntimeError(GLOO_LOST)


def _rank0_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lost: str):
    """A plan prepared in this process as rank 0 of two, whose collective `lost` fails as gloo's does when the
    other process is gone."""
    from _runfolder import tiny_recipe
    from _synth import make_dataset
    from cifarlab.distributed import Distributed
    from cifarlab.experiment import prepare

    recipe = tiny_recipe("reference_cnn").replace(precision="fp32", batch_size=16, epochs=1)
    plan = prepare(recipe, dataset=make_dataset(8, 4), device="cpu")
    plan.dist = Distributed(0, 2, 0, 2, torch.device("cpu"), "gloo")
    monkeypatch.setattr(plan.dist, "barrier", lambda: None)
    monkeypatch.setattr(plan.dist, "broadcast_object", lambda obj, src=0: obj)
    monkeypatch.setattr(plan.dist, lost, _lost)
    return plan


def test_a_process_lost_before_the_run_leaves_no_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cifarlab.errors import UserError
    from cifarlab.experiment import open_run

    plan = _rank0_plan(tmp_path, monkeypatch, "barrier")
    with pytest.raises(UserError) as e:
        open_run(plan, tmp_path / "runs")
    assert str(e.value).startswith(
        "another process of this training ended before the run started (gloo: Connection closed by peer "
    ), e.value
    assert "pair.cc" not in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_a_process_lost_as_the_run_starts_marks_its_folder_crashed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Process 0 made the folder, then the other process was gone (killed): the folder is marked crashed, not left
    running, and its lock let go (`cifarlab runs` lists it crashed, with nothing to resume)."""
    from cifarlab.errors import RunError
    from cifarlab.experiment import open_run
    from cifarlab.runs import RunLock

    plan = _rank0_plan(tmp_path, monkeypatch, "broadcast_object")
    with pytest.raises(RunError, match=r"^another process of this training ended as the run started \(gloo: "):
        open_run(plan, tmp_path / "runs")
    run = _only_run(tmp_path / "runs")
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "crashed", status
    assert status["message"].startswith("another process of this training ended as the run started (gloo: ")
    assert "pair.cc" not in status["message"]
    RunLock(run).acquire().release()  # the lock was let go
    capsys.readouterr()
    assert cli.main(["runs", "--root", str(tmp_path / "runs"), "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["status"] == "crashed" and not listed["resumable"], listed


def test_process_0_waiting_after_the_data_says_in_one_line_that_another_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    from cifarlab.distributed import Distributed
    from cifarlab.errors import UserError

    d = Distributed(0, 2, 0, 2, torch.device("cpu"), "gloo")
    monkeypatch.setattr(d, "barrier", _lost)
    with pytest.raises(UserError, match=r"^another process of this training ended while process 0 loaded the data"):
        with d.main_first():
            pass
    other = Distributed(1, 2, 1, 2, torch.device("cpu"), "gloo")
    monkeypatch.setattr(other, "barrier", _lost)
    with pytest.raises(UserError, match="^process 0 of this training ended before this step"):
        with other.main_first():
            pass


def test_sigterm_ends_a_process_still_joining_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that failed before joining (a plugin that fails to load on rank 1 only) leaves the others waiting
    in `init_process_group`, in C++, where the agreed stop's SIGTERM handler cannot run: torchrun's SIGTERM did
    nothing and it killed them 30 s later. While joining, SIGTERM ends the process; the handler is put back."""
    import signal

    from cifarlab import distributed

    seen = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: seen.append(signal.getsignal(signal.SIGTERM)))
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(k, v)

    def handler(signum: int, frame: object) -> None:
        pass

    saved = signal.signal(signal.SIGTERM, handler)
    try:
        ctx = distributed.setup("cpu")
        assert ctx is not None and ctx.backend == "gloo" and ctx.rank == 0
        assert seen == [signal.SIG_DFL] and signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, saved)
