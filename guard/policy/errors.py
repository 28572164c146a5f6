"""Errors raised while loading policies."""

from __future__ import annotations

from collections.abc import Sequence

from guard.errors import MemguardError

__all__ = ["PolicyError"]


class PolicyError(MemguardError, ValueError):
    """A policy could not be loaded: the message names the file, the field path and the reason.

    ``problems`` holds every ``(field_path, reason)`` pair found, the first of which leads the message.
    """

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]):
        self.source = source
        self.problems = tuple(problems)
        lines = [
            f"{source}: {path}: {reason}" if path else f"{source}: {reason}" for path, reason in self.problems
        ]
        super().__init__("\n".join(lines))
