"""What every `cifarlab` command shares: help formatting, the `--data-dir` argument, terminal-safe text,
and running a command with user errors, broken pipes and Ctrl-C turned into one line and an exit status."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["EPILOG_DATA", "data_dir_arg", "fmt", "print_error", "printable", "run_command", "warn"]

EPILOG_DATA = "Data lookup: --data-dir, else $CIFARLAB_DATA, else ~/.cache/cifarlab."

# C0 controls (newline and tab included: a name must stay on its line), DEL, C1 controls (0x9b is a
# one-byte CSI), and the Unicode line/paragraph separators and bidi overrides that reorder what is shown.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: Any) -> str:
    """`text` safe for a terminal: control characters (ESC of an ANSI sequence, newlines, ...) written as
    visible escapes (\\x1b, \\n, \\u202e), everything else unchanged."""
    s = str(text)

    def esc(m: re.Match[str]) -> str:
        c = m.group()
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (
            f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}"
        )

    return _UNSAFE.sub(esc, s)


def fmt(description: str, example: str) -> dict[str, Any]:
    """The keyword arguments of `add_parser` that every command's help uses: description, an example."""
    return {
        "description": description,
        "epilog": f"example:\n  {example}\n\n{EPILOG_DATA}",
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }


def data_dir_arg(p: argparse.ArgumentParser) -> None:
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
