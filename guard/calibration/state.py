"""Which calibration a guard judges with: one object that knows what is in force, where it came from, and why.

A guard's relative thresholds need a calibration profile, and its verified rewrites need verification values.
``CalibrationInForce`` resolves them in one order (an explicit override, the policy's file, the automatic one),
checks that a profile was measured the way this guard measures, loads or makes it once and keeps it, remembers
an unusable one instead of retrying it on every request, and tells its owner when one is taken into use (for
the audit record and the fit checks).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Literal

from guard.scoring import Scorer

from .auto import auto_calibration
from .errors import CalibrationError
from .profile import CalibrationProfile, VerificationCalibration

__all__ = ["MODES", "CalibrationInForce", "Origin"]

#: The calibration modes, in a policy's ``calibration`` and in ``Guard(calibration=...)`` alike.
MODES = ("auto", "auto-strict", "off")

#: Where the calibration in force came from.
Origin = Literal["object", "file", "auto"]
#: Called when a profile is taken into use: ``(profile, origin, label, previous_id)``; returns a problem that
#: makes the profile unusable (``calibration: auto-strict`` and a failed fit check), else None.
OnLoaded = Callable[[CalibrationProfile, Origin, "str | None", "str | None"], "str | None"]


class CalibrationInForce:
    """The calibration of one guard.

    Args:
        mode: the policy's ``calibration`` mode (``auto``, ``auto-strict`` or ``off``; a file is ``policy_file``).
        policy_file: the policy's calibration file resolved against the policy's folder (None for the modes).
        override: what the guard was given, which wins over the policy: a profile, its file, or a mode in the
            policy's own words (``auto``, ``auto-strict``, ``off``).
        scorer: the guard's scorer (None when the model cannot be scored: nothing is made automatically).
        needed: whether the policy reads a calibration at all (relative thresholds, adaptive sampling).
        on_loaded: see ``OnLoaded``.
    """

    def __init__(self, *, mode: str, policy_file: Path | None, override: CalibrationProfile | str | os.PathLike | None,
                 scorer: Scorer | None, needed: bool, on_loaded: OnLoaded) -> None:
        if isinstance(override, str) and override in MODES:
            mode, policy_file, override = override, None, None
        self.mode = mode
        self.policy_file = policy_file
        self.scorer = scorer
        self.needed = needed
        self._override = override
        self._on_loaded = on_loaded
        self._profile: CalibrationProfile | None = None
        self._loaded = False
        self._error: CalibrationError | None = None
        self.origin: Origin | None = None
        self.label: str | None = None
        self._verification: dict[Hashable, VerificationCalibration] = {}
        self.lock = threading.RLock()

    def describe(self) -> str:
        """Which calibration is in force and why, in one line (for reports and error messages)."""
        if self._error is not None:
            return f"no usable calibration: {self._error}"
        if not self._loaded or self._profile is None:
            reason = ("the policy needs none" if not self.needed else "calibration: off" if self.mode == "off" else
                      "not loaded yet")
            return f"no calibration ({reason})"
        where = {"object": "given to the guard", "file": f"from {self.label}",
                 "auto": "made automatically from memguard's generic captions"}[self.origin or "auto"]
        return f"calibration {self._profile.id}, {where} ({self._profile.n_prompts} prompts)"

    @property
    def automatic(self) -> bool:
        """Whether the profile in force is (or would be) the automatic one."""
        return self._override is None and self.policy_file is None

    def profile(self) -> CalibrationProfile | None:
        """The profile in force, loaded or made on first use; None when the policy needs none or says ``off``.

        Raises ``CalibrationError`` (remembered, not retried per request) when it is unusable: unreadable, or
        measured on another model or with other scoring settings than the scorer's.
        """
        with self.lock:
            if self._error is not None:
                raise self._error
            if not self._loaded:
                try:
                    self._profile, self.origin, self.label = self._resolve(self._override)
                    self._take(None)
                except CalibrationError as error:
                    self._error = error
                    raise
                self._loaded = True
            return self._profile

    def use(self, calibration: CalibrationProfile | str | os.PathLike) -> CalibrationProfile | None:
        """Switch to ``calibration``, checked against the scorer now; raises ``CalibrationError`` and keeps the
        current one if it does not fit."""
        if isinstance(calibration, str) and calibration in MODES:
            raise CalibrationError(f"switch to a calibration profile or its file, not the mode {calibration!r}")
        with self.lock:
            previous = self._profile.id if self._profile is not None else None
            profile, origin, label = self._resolve(calibration)
            kept = (self._profile, self.origin, self.label, self._override)
            self._profile, self.origin, self.label, self._override = profile, origin, label, calibration
            try:
                self._take(previous)
            except CalibrationError:
                self._profile, self.origin, self.label, self._override = kept
                raise
            self._loaded, self._error = True, None
            self._verification.clear()
            return profile

    def _resolve(self, source: CalibrationProfile | str | os.PathLike | None
                 ) -> tuple[CalibrationProfile | None, Origin | None, str | None]:
        if isinstance(source, CalibrationProfile):
            profile, origin, label = source, "object", None
        elif source is not None:
            profile, origin, label = CalibrationProfile.load(source), "file", str(source)
        elif self.policy_file is not None:
            profile, origin, label = CalibrationProfile.load(self.policy_file), "file", str(self.policy_file)
        elif self.mode in ("auto", "auto-strict") and self.needed and self.scorer is not None:
            profile, origin, label = auto_calibration(self.scorer), "auto", None
        else:
            return None, None, None
        if self.scorer is not None:
            profile.check_measurement(self.scorer.measurement(), source=label)
        return profile, origin, label

    def _take(self, previous: str | None) -> None:
        if self._profile is None:
            return
        problem = self._on_loaded(self._profile, self.origin or "auto", self.label, previous)
        if problem is not None:
            raise CalibrationError(problem)

    def verification(self, key: Hashable, measure: Callable[[], VerificationCalibration] | None,
                     ) -> VerificationCalibration:
        """The verification values for verified rewrites: the profile's own, else measured once by ``measure``
        (kept per ``key``: the verify settings and the call settings it was measured at).

        Raises ``CalibrationError`` when the profile has none and nothing can measure them (``calibration: off``,
        or a front end that cannot generate).
        """
        profile = self.profile()
        if profile is not None and profile.verification is not None:
            return profile.verification
        with self.lock:
            if key in self._verification:
                return self._verification[key]
            if self.mode == "off" or measure is None:
                where = f"calibration {profile.id}" if profile is not None else "this policy's calibration"
                raise CalibrationError(
                    f"{where} has no verification values for rewrites: run `memguard calibrate --model DIR --nmem "
                    "PROMPTS --verification 64 --out PROFILE` and name the profile in the policy")
            self._verification[key] = measure()
            return self._verification[key]
