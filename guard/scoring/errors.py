"""Errors raised while scoring."""

from __future__ import annotations

from ..errors import MemguardError


class ScoringError(MemguardError, RuntimeError):
    """Base class: the guard could not produce a trustworthy score."""


class UnsupportedPipelineError(ScoringError, TypeError):
    """The pipeline lacks something the score needs (a denoiser, an unconditional branch, a known prediction type)."""


class NonFiniteScoreError(ScoringError, ValueError):
    """A score came out NaN or infinite. ``Scorer.score`` raises it; the guard turns it into the policy's
    ``on_error`` decision for that prompt."""
