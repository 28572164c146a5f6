"""Errors of calibration profiles: missing, unreadable, or measured differently from the scores."""

from __future__ import annotations

from guard.errors import MemguardError

__all__ = ["CalibrationError", "CalibrationMismatch", "CalibrationMissing"]


class CalibrationError(MemguardError, ValueError):
    """A calibration profile is unusable (unreadable file, bad content, or the wrong one for a score).

    The guard applies the policy's ``on_error`` to requests that need it.
    """


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
    """The calibration profile was measured differently from the scores it should judge (another model,
    step count, noise seed, sample count, prediction space or weights)."""
