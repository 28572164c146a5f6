"""The base of every memguard exception, so callers can catch memguard's errors in one ``except``."""

from __future__ import annotations

__all__ = ["MemguardError", "format_loc"]


class MemguardError(Exception):
    """Something memguard refused or could not do; subclasses keep their standard bases too
    (``ValueError``, ``OSError``, ...), so existing ``except`` clauses still catch them."""


def format_loc(loc: tuple[int | str, ...]) -> str:
    """``('rules', 2, 'when', 'score', 'gte')`` -> ``rules[2].when.score.gte`` (union tags dropped)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("named", "weights") or part.startswith("function-"):
            continue
        else:
            out += f".{part}" if out else part
    return out
