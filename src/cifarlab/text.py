"""Text that came from data (file names, class names, messages) made safe to print on a terminal."""

from __future__ import annotations

import unicodedata
from typing import Any

__all__ = ["plural", "stages_frozen", "terminal_safe"]

_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def terminal_safe(text: Any) -> str:
    """`text` with control and format characters (ANSI escape sequences, bidi overrides, newlines) written
    as visible escapes (``\\x1b``, ``\\u202e``), so a file name cannot rewrite the terminal."""
    out = []
    for ch in str(text):
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 mistake', '2 mistakes', '1,000 images': the count and the noun in the form it takes."""
    return f"{n:,} {word if n == 1 else (many or word + 's')}"


def stages_frozen(n: int) -> str:
    """'no stage frozen', 'the first stage frozen', 'the first 2 stages frozen' (a fine-tuned run's freeze_stages)."""
    return "no stage frozen" if n <= 0 else "the first stage frozen" if n == 1 else f"the first {n} stages frozen"
