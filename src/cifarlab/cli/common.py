"""What every `cifarlab` command shares: help formatting, the `--data-dir` argument, terminal-safe text,
and running a command with user errors, broken pipes and Ctrl-C turned into one line and an exit status."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cifarlab.text import terminal_safe

__all__ = ["EPILOG_DATA", "data_dir_arg", "fmt", "print_error", "printable", "run_command", "warn"]

EPILOG_DATA = (
    "Data lookup: --data-dir, else $CIFARLAB_DATA, else ~/.cache/cifarlab (where the official archive is\n"
    "downloaded if it is missing)."
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


def data_dir_arg(p: argparse.ArgumentParser) -> None:
    """`--data-dir`, and the help's note on where data is looked for (only commands that read data have both)."""
    p.epilog = f"{p.epilog}\n\n{EPILOG_DATA}" if p.epilog else EPILOG_DATA
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="dataset folder (archives, extracted batches or an ImageFolder tree); default $CIFARLAB_DATA "
        "or ~/.cache/cifarlab",
    )


def print_error(message: Any) -> None:
    """`error: message` on one line of stderr."""
    print(f"error: {printable(message)}", file=sys.stderr)


def warn(message: Any) -> None:
    """`warning: message` on one line of stderr."""
    print(f"warning: {printable(message)}", file=sys.stderr, flush=True)


def run_command(func: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run a command's function: its return value is the exit status; a `UserError` prints one line and
    exits 2, Ctrl-C exits 130, a closed output pipe (`| head`) exits 0. Other errors keep their traceback."""
    from cifarlab.errors import UserError

    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into `head` and closed early: not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UserError as exc:  # user-facing errors carry their own advice
        print_error(exc)
        return 2
