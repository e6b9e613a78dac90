"""What every `cifarlab` command shares: help formatting, the `--data-dir` argument, terminal-safe text,
and running a command with user errors, broken pipes and Ctrl-C turned into one line and an exit status."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cifarlab.text import terminal_safe

__all__ = ["EPILOG_DATA", "add_recipe_args", "data_dir_arg", "fmt", "print_error", "printable", "run_command", "warn"]

EPILOG_DATA = (
    "Data lookup: --data-dir, else $CIFARLAB_DATA, else (for a command on a finished run) the folder the run\n"
    "trained from, else ~/.cache/cifarlab (where the official archive is downloaded if it is missing)."
)


def printable(text: Any) -> str:
    """`text` safe for a terminal (see `cifarlab.text.terminal_safe`)."""
    return terminal_safe(text)


def fmt(description: str, example: str) -> dict[str, Any]:
    """The keyword arguments of `add_parser` that every command's help uses: description, an example."""
    return {
        "description": description,
        "epilog": f"example:\n  {example}",
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def folder_path(text: str) -> Path:
    """An argparse type for a folder option: an empty string is a usage error, not the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a folder (use . for the current folder)")
    return Path(text)


def data_dir_arg(p: argparse.ArgumentParser) -> None:
    """`--data-dir`, and the help's note on where data is looked for (only commands that read data have both)."""
    p.epilog = f"{p.epilog}\n\n{EPILOG_DATA}" if p.epilog else EPILOG_DATA
    p.add_argument(
        "--data-dir",
        type=folder_path,
        default=None,
        help="folder where the named datasets are looked for (cifar10/cifar100: the official archive or its "
        "extracted batches, downloaded there when missing; fashion_mnist: its four IDX files) and relative dataset "
        "paths; default $CIFARLAB_DATA or ~/.cache/cifarlab. An image-folder tree or IDX folder is a dataset "
        "itself: pass it as the dataset instead (train, tune: --set dataset=PATH; data: --dataset PATH)",
    )


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """--recipe NAME, --config FILE, --set KEY=VALUE (repeatable) on a subcommand's parser. The registered recipes
    are listed without importing torch (see `recipe_names`): `cifarlab train --help` or a mistyped option answers
    at once; the values are checked by `cifarlab.config.recipe_from_args` when the command runs."""
    from cifarlab.registry import DEFAULT_RECIPE, recipe_names

    parser.add_argument(
        "--recipe",
        default=None,
        metavar="NAME",
        help=f"base recipe: {', '.join(recipe_names())} (default: the config file's `recipe:`, else {DEFAULT_RECIPE})",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        metavar="FILE",
        help="YAML (.yaml/.yml), TOML (.toml) or JSON file of recipe keys, e.g. `lr: 0.002`; may name "
        "`recipe:`; a run's config.json re-creates that run's recipe",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one recipe key, applied after --config in the order given; repeatable "
        "(e.g. --set lr=2e-3 --set widths=32,64,64)",
    )


def print_error(message: Any) -> None:
    """`error: message` on one line of stderr."""
    print(f"error: {printable(message)}", file=sys.stderr)


def warn(message: Any) -> None:
    """`warning: message` on one line of stderr."""
    print(f"warning: {printable(message)}", file=sys.stderr, flush=True)


_OS_ADVICE = {
    errno.ENOSPC: "free some space, then run the command again (files written before are whole: every write is atomic)",
    errno.EDQUOT: "your disk quota is used up: free some space, then run the command again",
    errno.EROFS: "the file system is read-only: use a writable folder",
    errno.EACCES: "check the permissions, or use a folder you can write to",
    errno.EPERM: "check the permissions, or use a folder you can write to",
}


def os_error_message(exc: OSError) -> str:
    """An OSError as one line: what failed on which file, and what to do where that is clear."""
    where = f"{exc.filename}: " if exc.filename is not None else ""
    what = exc.strerror or str(exc)
    advice = _OS_ADVICE.get(exc.errno or 0)
    return f"{where}{what}" + (f"; {advice}" if advice else "")


def to_devnull(fd: int) -> None:
    """Point file descriptor `fd` (stdout whose reader has gone) at /dev/null: later writes and flushes succeed."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


class _DropWhenClosed:
    """stdout that, once its reader has gone (`cifarlab train | head`), sends what follows to /dev/null instead of
    raising BrokenPipeError: a long command whose product is a run folder must not die of its console output."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def _drop(self) -> None:
        to_devnull(self._stream.fileno())

    def write(self, text: str) -> int:
        try:
            return int(self._stream.write(text))
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def output_may_close() -> Iterator[None]:
    """Inside the block, a closed stdout or stderr drops the output, not the command (see `_DropWhenClosed`):
    `cifarlab train 2>&1 | head` goes on when its progress or a warning meets a reader that has gone."""
    saved = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        try:
            stream.fileno()
        except (AttributeError, OSError, ValueError):  # not a real file (a test's capture): nothing can close it
            continue
        saved[name] = stream
        setattr(sys, name, _DropWhenClosed(stream))
    try:
        try:
            yield
        finally:  # what is still buffered reaches the reader or /dev/null here, not as an error at exit
            for name in saved:
                getattr(sys, name).flush()
    finally:
        for name, stream in saved.items():
            setattr(sys, name, stream)


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """For `train` and `tune`: SIGTERM (`timeout`, `docker stop`, Slurm's time limit, `kill`) stops a run as Ctrl-C
    does: the last checkpoint kept, the run marked stopped, the resume command printed (instead of dying
    mid-write). After the first, further Ctrl-Cs and SIGTERMs only say that the run is stopping. The handlers are
    put back afterwards (`cli.main` from Python or a test leaves its process as it was)."""
    import signal
    import threading

    from cifarlab.distributed import env_world, install_agreed_stop

    world = env_world()
    if world is not None and world[1] > 1:  # under torchrun: the ranks agree on the step to stop at
        install_agreed_stop()
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stopping(signum: int, frame: Any) -> None:
        print("already stopping: its files are being written", file=sys.stderr, flush=True)

    def stop(signum: int, frame: Any) -> None:
        # A second Ctrl-C (an impatient press, or SIGTERM after it) would cut the stopped run's own record short:
        # its status written as if outside the epochs, no weights file. From the first on, only say so.
        for s in watched:
            signal.signal(s, stopping)
        raise KeyboardInterrupt

    # SIGINT only where Python's own Ctrl-C handler is in place: a process started with it ignored (`nohup`, a
    # shell's background job) keeps ignoring it.
    watched = [signal.SIGTERM] + (
        [signal.SIGINT] if signal.getsignal(signal.SIGINT) is signal.default_int_handler else []
    )
    saved = {s: signal.getsignal(s) for s in watched}
    for s in watched:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return msg if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {msg}"


@contextlib.contextmanager
def cli_logging() -> Iterator[None]:
    """cifarlab's log records on stderr while a command runs: warnings as `warning: ...` (without a handler,
    Python printed the bare message), progress only where a command asks for it (`data`). Under torchrun only
    the first process warns: the others read the same data and would repeat each line."""
    logger = logging.getLogger("cifarlab")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CliFormatter())
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if os.environ.get("RANK", "0") == "0" else logging.ERROR)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _under_torchrun() -> bool:
    try:
        return int(os.environ.get("WORLD_SIZE") or 1) > 1
    except ValueError:
        return False


def _say_error(message: Any, before: str = "") -> None:
    """`error: message` (after `before`, a traceback) on stderr; under torchrun once for the whole job, not once
    per process (`cifarlab.distributed.first_to_say`: the first process to meet this text prints it)."""
    text = f"{before}error: {printable(message)}\n"
    if _under_torchrun():
        from cifarlab.distributed import first_to_say

        if not first_to_say(text):
            return
    sys.stderr.write(text)
    sys.stderr.flush()


def run_command(func: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run a command's function: its return value is the exit status; a `UserError` prints one line and
    exits 2, an `OSError` (full disk, read-only folder) one line and exits 1 (after its traceback when it came
    from user code, a plugin's callback say), Ctrl-C exits 130, a closed output pipe (`| head`) exits 0. Other
    errors keep their traceback. Under torchrun, an error that several processes meet is printed once."""
    from cifarlab.errors import Interrupted, RunError, UserError

    try:
        with cli_logging():
            return int(func(args) or 0)
    except KeyboardInterrupt as exc:
        if not isinstance(exc, Interrupted):  # the command has not said it already
            print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error worth a traceback.
        to_devnull(sys.stdout.fileno())
        return 0
    except UserError as exc:  # user-facing errors carry their own advice
        _say_error(exc)
        return 2
    except RunError as exc:  # a run that failed, its message saying why and what now
        _say_error(exc)
        return 1
    except OSError as exc:  # a full disk, a read-only folder, a vanished file: one line, not a traceback
        from cifarlab.plugins import raised_in_user_code

        # User code (a plugin's callback) failed: its file and line are what the user needs to find the bug.
        shown = "".join(traceback.format_exception(exc)) if raised_in_user_code(exc) else ""
        _say_error(os_error_message(exc), before=shown)
        return 1
