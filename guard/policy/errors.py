"""Errors raised while loading policies and resolving their thresholds."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["CalibrationError", "CalibrationMismatch", "CalibrationMissing", "PolicyError"]


class PolicyError(ValueError):
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


class CalibrationError(ValueError):
    """A calibration profile is unusable (unreadable file, bad content, or the wrong one for a score)."""


class CalibrationMissing(CalibrationError):
    """A rule uses a relative threshold (``above_fpr``) but no calibration profile is available."""

    def __init__(self, detail: str = ""):
        how = (
            "relative thresholds (above_fpr) need the model's calibration profile: run "
            "`memguard calibrate --model DIR --out PROFILE` and set `calibration: PROFILE` in the policy, "
            "or set `calibration: auto` to calibrate on the built-in generic captions on first use"
        )
        super().__init__(f"{detail}; {how}" if detail else how)


class CalibrationMismatch(CalibrationError):
    """The calibration profile was measured differently from the score it should judge."""
