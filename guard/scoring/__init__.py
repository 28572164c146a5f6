"""Denoising-free memorization scoring: model adapters, the score, its caches and batching."""

from .adapters import DiffusersAdapter, DiffusersXLAdapter, ModelAdapter, adapter_for
from .conditioning import TextConditioning
from .errors import NonFiniteScoreError, ScoringError, UnsupportedPipelineError
from .noise import DEFAULT_INFERENCE_STEPS, DEFAULT_SEED, detection_noise, scoring_timesteps
from .profiles import PROFILES, ModelProfile, get_profile
from .result import MemorizationScore
from .scorer import Scorer, guidance_statistics, score_prompts, validate_prompts

__all__ = [
    "DEFAULT_INFERENCE_STEPS",
    "DEFAULT_SEED",
    "PROFILES",
    "DiffusersAdapter",
    "DiffusersXLAdapter",
    "MemorizationScore",
    "ModelAdapter",
    "ModelProfile",
    "NonFiniteScoreError",
    "Scorer",
    "ScoringError",
    "TextConditioning",
    "UnsupportedPipelineError",
    "adapter_for",
    "detection_noise",
    "get_profile",
    "guidance_statistics",
    "score_prompts",
    "scoring_timesteps",
    "validate_prompts",
]
