"""The `cifarlab` command. Each subcommand lives in the module of this package named for it (its
`add_parser(sub)` registers it, its `cmd_*` function runs it); this file only builds the parser and runs."""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from cifarlab import __version__
from cifarlab.cli.common import fmt, print_error, run_command
from cifarlab.errors import UserError
from cifarlab.plugins import ENV, load_plugins

__all__ = ["COMMANDS", "build_parser", "entry", "exit_now", "main"]

# Modules of this package, one per command, in the order `cifarlab --help` lists them.
COMMANDS: tuple[str, ...] = (
    "data",
    "model",
    "train",
    "tune",
    "evaluate",
    "report",
    "calibrate",
    "runs",
    "predict",
    "explain",
    "export",
    "serve",
    "config",
)


def build_parser(commands: Sequence[str] | None = None, full: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `cifarlab` parser with every command of COMMANDS (or only `commands`, for tests). With `full`, only
    those commands get their whole parser and the others just their line in `cifarlab --help`: some commands'
    parsers list the registered recipes and models, which imports torch (~1 s), and `cifarlab runs` or
    `cifarlab --help` need none of that."""
    parser = argparse.ArgumentParser(
        prog="cifarlab",
        **fmt(
            "Train, evaluate, explain and serve CNN image classifiers for CIFAR-10 and datasets like it.",
            "cifarlab train --data-dir ../shared/data",
        ),
    )
    parser.add_argument("--version", action="version", version=f"cifarlab {__version__}")
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="FILE_OR_MODULE",
        help="a .py file or module that registers models, augmentations, optimizers, schedules, callbacks or "
        f"recipes before the command runs; give it before COMMAND (repeatable; also ${ENV})",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS if commands is None else commands:
        module = importlib.import_module(f"cifarlab.cli.{name}")
        if full is None or name in full:
            module.add_parser(sub)
        else:
            sub.add_parser(name, help=module.HELP)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The command `argv` names (its first word that is not a top-level option or --plugin's value), if any."""
    words = iter(argv)
    for word in words:
        if word == "--plugin":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _load_plugins(words: list[str]) -> None:
    """Plugins load before the full parser is built, so what they register shows in every command's help."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--plugin", action="append", default=[])
    known, _ = pre.parse_known_args(words)
    load_plugins(known.plugin)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] == ["--version"]:
        # Answered before any parser is built.
        print(f"cifarlab {__version__}")
        return 0
    try:
        _load_plugins(words)
    except UserError as e:
        print_error(e)
        return 2
    command = _command(words)
    parser = build_parser(full=[command] if command in COMMANDS else [])
    args = parser.parse_args(argv)
    # $CIFARLAB_DATA is only a default: a resumed run's config.json names the data folder it trained on, which
    # wins over the environment (an explicit --data-dir still wins over both).
    if (
        getattr(args, "data_dir", None) is None
        and getattr(args, "resume", None) is None
        and os.environ.get("CIFARLAB_DATA")
    ):
        args.data_dir = Path(os.environ["CIFARLAB_DATA"])
    return run_command(args.func, args)


def exit_now(code: int) -> NoReturn:
    """End the process with `code` without the interpreter's teardown: unloading torch's modules took ~0.4 s of
    every command on a 2-core CPU, and nothing of ours needs it (every file is written, closed and fsynced by
    then). What a normal exit does that matters still happens, in its order: other threads that are not daemons
    are waited for (a thread pool left open is shut down first, as at a normal exit), the exit handlers run
    (logging, multiprocessing, temporary folders, MLflow), stdout and stderr are flushed."""
    # The interpreter's own first step at exit: threading's exit hooks (they stop executors' idle workers), then
    # every thread that is not a daemon is waited for.
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`cifarlab runs | head`) or stream: nothing more to say
            pass
    os._exit(code)


def entry() -> NoReturn:
    """The `cifarlab` command (and `python -m cifarlab.cli`): `main`, then `exit_now`. An exception that escapes
    `main` (a bug: its errors are one line and an exit status) keeps Python's own exit, traceback and all."""
    try:
        code = main()
    except SystemExit as e:  # argparse's usage errors and --help
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    exit_now(code)


if __name__ == "__main__":
    entry()
