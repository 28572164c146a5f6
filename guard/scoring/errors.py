"""Errors raised while scoring."""

from __future__ import annotations


class ScoringError(RuntimeError):
    """Base class: the guard could not produce a trustworthy score."""


class UnsupportedPipelineError(ScoringError, TypeError):
    """The pipeline lacks something the score needs (a UNet, an unconditional branch, a known prediction type)."""


class NonFiniteScoreError(ScoringError, ValueError):
    """A score came out NaN or infinite; it is never returned as a number."""
