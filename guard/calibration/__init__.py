"""Calibration: a model's score distribution on ordinary prompts, what relative thresholds are read from.

One package for the profile (``CalibrationProfile``), making one (``calibrate``, resumable ``score_sets``),
the automatic one on built-in captions (``auto_calibration``) and fitting score weights (``fit_weights``).
"""

from .auto import auto_calibration
from .errors import CalibrationError, CalibrationMismatch, CalibrationMissing
from .fitting import WeightReport, fit_weights
from .making import Features, calibrate, prompt_set_id, score_sets, spread_stages
from .profile import (
    DEFAULT_BAND_QUANTILE,
    MEASUREMENT_FIELDS,
    CalibrationProfile,
    Metric,
    SampleSpread,
    VerificationCalibration,
    cached_calibration_path,
    calibration_cache_dir,
    threshold_at_fpr,
)

__all__ = [
    "DEFAULT_BAND_QUANTILE",
    "MEASUREMENT_FIELDS",
    "CalibrationError",
    "CalibrationMismatch",
    "CalibrationMissing",
    "CalibrationProfile",
    "Features",
    "Metric",
    "SampleSpread",
    "VerificationCalibration",
    "WeightReport",
    "auto_calibration",
    "cached_calibration_path",
    "calibrate",
    "calibration_cache_dir",
    "fit_weights",
    "prompt_set_id",
    "score_sets",
    "spread_stages",
    "threshold_at_fpr",
]
