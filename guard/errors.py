"""The base of every memguard exception, so callers can catch memguard's errors in one ``except``."""

from __future__ import annotations

__all__ = ["MemguardError"]


class MemguardError(Exception):
    """Something memguard refused or could not do; subclasses keep their standard bases too
    (``ValueError``, ``OSError``, ...), so existing ``except`` clauses still catch them."""
