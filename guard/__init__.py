"""memguard: a generation-time memorization guard for text-to-image diffusion pipelines."""

from .scoring import (
    MemorizationScore,
    ModelProfile,
    NonFiniteScoreError,
    Scorer,
    ScoringError,
    UnsupportedPipelineError,
    score_prompts,
)

__version__ = "0.1.0"

__all__ = [
    "MemorizationScore",
    "ModelProfile",
    "NonFiniteScoreError",
    "Scorer",
    "ScoringError",
    "UnsupportedPipelineError",
    "__version__",
    "score_prompts",
]
