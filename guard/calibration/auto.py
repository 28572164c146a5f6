"""Automatic calibration: the generic captions scored once per model and settings, cached on disk."""

from __future__ import annotations

import warnings

from guard.data import generic_captions_id
from guard.events import log_event
from guard.scoring import Scorer

from .making import calibrate
from .profile import CalibrationProfile, cached_calibration_path

__all__ = ["auto_calibration"]


def auto_calibration(scorer: Scorer, *, progress: bool | None = None) -> CalibrationProfile:
    """The calibration of ``scorer``'s model on the built-in generic captions, made on first use.

    It is cached by model fingerprint and scoring settings; a cached file that no longer fits the
    scorer is made again. When the cache cannot be written the profile is still returned (the caller
    keeps it in memory) and a warning says why, so no request pays for calibrating twice.
    """
    measurement = scorer.measurement()
    path = cached_calibration_path(
        measurement.fingerprint, profile=measurement.profile, g_norm=measurement.g_norm, g_cos=measurement.g_cos,
        seed=measurement.seed, samples=measurement.samples, steps=measurement.steps,
        prediction_space=measurement.prediction_space, source=generic_captions_id(), sampling=measurement.sampling,
    )
    if path.exists():
        cached = CalibrationProfile.load(path)
        if not cached.mismatches(measurement.compared()):
            return cached
    profile = calibrate(scorer, progress=progress)
    try:
        profile.save(path)
    except OSError as error:
        message = f"memguard: could not cache the automatic calibration at {path} ({error}); it is kept in memory"
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        log_event("calibration_cache_unwritable", level="warning", path=str(path), error=str(error))
    return profile
