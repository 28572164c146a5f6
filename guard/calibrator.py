"""Calibrating a model: the score distribution of ordinary (non-memorized) prompts on that model.

Relative thresholds (``above_fpr``) are quantiles of this distribution, which is what lets one
policy fit models whose scores live on different scales.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .data import generic_captions, generic_captions_id
from .policy import CalibrationProfile, cached_calibration_path
from .scoring import Scorer


def calibrate(
    scorer: Scorer,
    prompts: Sequence[str] | None = None,
    *,
    source: str | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> CalibrationProfile:
    """Score ``prompts`` (default: memguard's built-in generic captions) and build a calibration profile."""
    if prompts is None:
        prompts, source = generic_captions(), source or generic_captions_id()
    prompts = list(prompts)
    scores, norms, coses = [], [], []
    for start in range(0, len(prompts), scorer.batch_size):
        chunk = prompts[start : start + scorer.batch_size]
        for result in scorer.score(chunk):
            scores.append(result.score)
            norms.append(result.norm)
            coses.append(result.cos)
        if on_progress is not None:
            on_progress(len(chunk))
    return CalibrationProfile.from_scores(
        scores,
        norms=norms,
        coses=coses,
        source=source or "custom",
        **calibration_settings(scorer),
    )


def calibration_settings(scorer: Scorer) -> dict:
    """The fields that tie a calibration to one model measured one way."""
    return {
        "fingerprint": scorer.adapter.fingerprint(),
        "model_class": scorer.adapter.model_class,
        "profile": scorer.profile.name,
        "g_norm": scorer.profile.g_norm,
        "g_cos": scorer.profile.g_cos,
        "seed": scorer.seed,
        "samples": scorer.samples,
        "steps": scorer.inference_steps,
        "prediction_space": scorer.prediction_space,
    }


def auto_calibration(scorer: Scorer) -> CalibrationProfile:
    """The cached calibration on the generic captions for this model and settings, made on first use."""
    settings = calibration_settings(scorer)
    key = {k: v for k, v in settings.items() if k != "model_class"}
    path = cached_calibration_path(key.pop("fingerprint"), source=generic_captions_id(), **key)
    if path.exists():
        return CalibrationProfile.load(path)
    profile = calibrate(scorer)
    profile.save(path)
    return profile
