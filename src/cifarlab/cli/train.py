"""`cifarlab train`: parse, resolve the recipe (fails before any work on bad config), run."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from cifarlab.cli.common import add_recipe_args, data_dir_arg, fmt, folder_path, output_may_close, stop_signals
from cifarlab.errors import UserError

# The one-line help `cifarlab --help` lists (read without building this command's parser).
HELP = "train a recipe and write a run folder with history, weights and a report"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help=HELP,
        **fmt(
            "Train a recipe (default: fast) on CIFAR-10 with an 80/20 train/validation split where the recipe\n"
            "uses one, evaluate on the test set, and write runs/<time>-<recipe>/ with the resolved config,\n"
            "history (CSV, JSON), metrics, weights (safetensors), a checkpoint per epoch and report.html.",
            "cifarlab train --recipe reference --data-dir ../shared/data --set seed=1\n"
            "  cifarlab train --set dataset=fashion_mnist --init runs/20261126-101500-fast "
            "--set pretrained_lr_scale=0.3",
        ),
    )
    add_recipe_args(p)
    data_dir_arg(p)
    p.add_argument("--runs-dir", type=folder_path, default=Path("runs"), help="where run folders go (default: runs)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue an interrupted run from its checkpoint")
    p.add_argument(
        "--init",
        type=Path,
        metavar="SOURCE",
        help="fine-tune: start from a run folder's weights, a .safetensors file or a PyTorch state-dict file (read "
        "with weights_only); matching layers load, a new head when the classes differ, the first conv adapted to "
        "the input channels; see --set freeze_stages=N, pretrained_lr_scale=X",
    )
    p.add_argument(
        "--budget",
        metavar="DURATION",
        help="train the most accurate model that fits this wall-clock time from process start to test accuracy "
        "(e.g. 60s, 2m, 1h): a short probe picks the width, epochs and TTA; the LR schedule ends when time is up",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels: a resumed run ends with the same weights as an uninterrupted one",
    )
    p.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm; GPUs only); without it "
        "each process normalizes with its own slice's statistics",
    )
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train with N processes on this machine: runs this same command under torchrun "
        "(python -m torch.distributed.run --standalone --nproc-per-node N); one per GPU, or gloo on CPUs",
    )
    p.add_argument("--quiet", action="store_true", help="print only errors and the final result")
    p.add_argument("--no-report", action="store_true", help="skip writing the HTML/Markdown report")
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log per-epoch metrics to <run>/tensorboard (needs the 'tensorboard' extra)",
    )
    p.add_argument(
        "--mlflow",
        nargs="?",
        const=True,
        default=False,
        metavar="TRACKING_URI",
        help="also log the recipe and per-epoch metrics to MLflow (needs the 'mlflow' extra); default store: "
        "a local file store <runs-dir>/mlruns; or any MLflow tracking URI",
    )
    p.set_defaults(func=cmd_train)


def _torchrun_argv(nproc: int, argv: list[str]) -> list[str]:
    """This command again, without --nproc, under `python -m torch.distributed.run` on this machine."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*run, "-m", "cifarlab.cli", *rest]


def _exit_text(code: int) -> str:
    """torchrun's exit code of a process: "exit 1", or "killed by SIGKILL" for -9."""
    import signal

    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            pass
    return f"exit {code}"


def launch(torchrun_args: list[str]) -> int:
    """torchrun's launcher in this process (what `python -m torch.distributed.run ARGS` runs), with its failures
    as this command's exit status instead of its traceback: every process stopped (Ctrl-C, SIGTERM: 130) or
    refused its input (2) gives that status, their own lines above saying why; other failures name each
    process's exit code."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    sys.stdout.flush()
    # torchrun's agent logs each signal, shutdown and failure ("W1127 ... Received 2 death signal, shutting down
    # workers"); the processes' own lines and the summary below say it for the user. This process only: the
    # training processes keep their logging.
    logging.disable(logging.ERROR)
    try:
        torchrun(torchrun_args)
    except ChildFailedError as e:
        codes = {rank: f.exitcode for rank, f in sorted(e.failures.items())}
        # Every process refused its input or was stopped; or one did (process 0 on the data, another on its own
        # model) and the others either said in one line that it ended or were ended by torchrun (SIGTERM) while
        # waiting for it: the lines above say why.
        said = {c for c in codes.values() if c != -15}
        if len(said) == 1 and (only := next(iter(said))) in (2, 130):
            return int(only)
        each = ", ".join(f"process {rank}: {_exit_text(code)}" for rank, code in codes.items())
        print(f"error: training processes failed ({each}); their messages are above", file=sys.stderr)
        return 1
    except SignalException:  # Ctrl-C or SIGTERM to the launcher: it stopped the processes (they saved and marked)
        return 130
    finally:
        logging.disable(logging.NOTSET)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cifarlab import config
    from cifarlab.distributed import env_world
    from cifarlab.experiment import run_experiment
    from cifarlab.finetune import check_needs_init
    from cifarlab.train.loggers import require

    budget = None
    if args.budget is not None:  # checked before any data is read or any process started
        from cifarlab.budget import parse_duration

        budget = parse_duration(args.budget)
        if args.resume is not None:
            raise UserError("--resume continues a run with its own schedule; --budget cannot be combined with it")
        if args.init is not None:
            raise UserError(
                "--budget chooses the model's width, so it cannot be combined with --init; set epochs instead"
            )
        if (args.nproc or 1) > 1 or env_world() is not None:
            raise UserError(
                "--budget cannot run under torchrun (--nproc): each process would time its own probe and stop at its "
                "own moment; set epochs instead"
            )
    if args.nproc is not None:
        if args.nproc < 1:
            raise UserError(f"--nproc must be >= 1, got {args.nproc}")
        if env_world() is not None:
            raise UserError("--nproc starts torchrun itself; under torchrun, leave it out")
        if args.nproc > 1:
            if args.resume is None:
                r = config.recipe_from_args(args)  # a bad value fails here, not in N processes
                if args.init is None:
                    check_needs_init(r, getattr(args, "config", None))
                if r.batch_size % args.nproc:
                    raise UserError(
                        f"batch_size={r.batch_size} is not a multiple of --nproc {args.nproc}: each process takes an "
                        f"equal slice of every global batch; use a batch_size divisible by {args.nproc}"
                    )
            # The processes record the command as typed (theirs lacks --nproc) in config.json.
            os.environ[LAUNCH_COMMAND_ENV] = _typed_command()
            return launch(_torchrun_argv(args.nproc, sys.argv[1:])[3:])

    recipe = None
    if args.resume is None:
        recipe = config.recipe_from_args(args)  # validates everything before any data is touched
        if args.init is None:  # freeze_stages & co. need pretrained weights; a run's config.json names its source
            check_needs_init(recipe, getattr(args, "config", None))
        # fast on a CPU without bf16 hands over to its fp32 variant; a budget plans from the named recipe itself.
        variant = config.machine_variant(recipe, args.device) if args.budget is None else None
        if variant is not None:
            named, recipe = recipe.name, config.recipe_from_args(args, device=args.device)
            if not args.quiet and (env_world() or (0,))[0] == 0:  # rank 0 speaks for all
                print(
                    f"recipe {named} -> {variant}: this run trains in fp32 on a CPU, for which {named} names "
                    f"{variant} (--set cpu_fp32_variant= keeps {named})"
                )
    elif getattr(args, "set", None) or getattr(args, "config", None) or getattr(args, "recipe", None):
        raise UserError("--resume continues a run with its saved config; --recipe/--set/--config cannot change it")
    if args.resume is not None and args.init is not None:
        raise UserError("--resume continues a run with the weights it had; --init cannot be combined with it")
    if args.resume is None:
        from cifarlab.runs import check_runs_root

        check_runs_root(args.runs_dir)  # a runs folder that cannot take the run fails now, not after loading data
    # Optional trackers are checked before any work, so a missing extra never leaves an empty run folder.
    if args.tensorboard:
        require("tensorboard", "tensorboard", "--tensorboard")
    if args.mlflow:
        from cifarlab.train.loggers import mlflow_uri

        require("mlflow", "mlflow", "--mlflow")
        mlflow_uri(args.mlflow if isinstance(args.mlflow, str) else None, args.runs_dir)  # a bad URI fails here
    from cifarlab.distributed import setup

    with stop_signals():
        dist = setup(args.device, sync_bn=args.sync_bn)  # None without torchrun (or with one process)
        ended = False
        try:
            with output_may_close():  # `cifarlab train | head`: the run goes on, its output is dropped
                result = _run(args, recipe, budget, dist, run_experiment)
            ended = True
        finally:
            if dist is not None:
                dist.shutdown(wait=ended)
    if dist is not None and result.status == "stopped" and dist.local_rank == 0:
        from cifarlab.distributed import launcher_gone

        gone = launcher_gone()
        if gone is not None:  # said here, after the stop: the process that noticed first may be another one
            print(
                f"error: the launcher of this training (process {gone}) ended without stopping its processes; they "
                "stopped after the same step, as for Ctrl-C",
                file=sys.stderr,
            )
    if args.quiet and result.status == "finished" and (dist is None or dist.is_main):
        print(f"{result.run_dir}: test accuracy {result.metrics['test_accuracy']:.2%}")
    return {"finished": 0, "stopped": 130}.get(result.status, 1)


LAUNCH_COMMAND_ENV = "CIFARLAB_LAUNCH_COMMAND"  # set by --nproc for the processes it starts


def _quoted_args() -> str:
    return " ".join(shlex.quote(a) for a in sys.argv[1:])


def _typed_command() -> str:
    return f"cifarlab {_quoted_args()}"


def _recorded_command(dist: Any) -> str:
    """config.json's command: as typed, also for a process torchrun started (`--nproc`'s launcher passes it on;
    under torchrun itself, torchrun's own options cannot be read back, so its process counts stand for them)."""
    if dist is None:
        return _typed_command()
    launched = os.environ.get(LAUNCH_COMMAND_ENV)
    if launched:
        return launched
    return f"torchrun --nnodes {dist.nodes} --nproc-per-node {dist.local_world} -m cifarlab.cli {_quoted_args()}"


def _run(args: argparse.Namespace, recipe: Any, budget: float | None, dist: Any, run_experiment: Any) -> Any:
    from cifarlab.plugins import command_plugins

    return run_experiment(
        recipe,
        data_dir=args.data_dir,
        runs_root=args.runs_dir,
        device=args.device,
        resume=args.resume,
        deterministic=args.deterministic,
        quiet=args.quiet,
        report=not args.no_report,
        command=_recorded_command(dist),
        tensorboard=args.tensorboard,
        mlflow=args.mlflow,
        init=args.init,
        budget=budget,
        dist=dist,
        # recorded in config.json: the resume command names them (--resume does not load them itself)
        plugins=command_plugins(getattr(args, "plugin", None) or []),
    )
