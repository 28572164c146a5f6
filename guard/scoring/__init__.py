"""Denoising-free memorization scoring: model adapters, the score, its caches and batching.

Pure torch + diffusers: this package knows nothing of policies, audit logs or front ends.
"""

from .adapters import (
    SCORE_SPACES,
    DiscreteDiffusionAdapter,
    ModelAdapter,
    PipelineAdapter,
    StableDiffusionAdapter,
    StableDiffusionXLAdapter,
    adapter_for,
    weights_digest,
)
from .adaptive import DEFAULT_MAX_SAMPLES, AdaptiveScorer, DecisionLimits, make_scorer, sample_stages
from .conditioning import TextConditioning
from .errors import NonFiniteScoreError, ScoringError, UnsupportedPipelineError
from .explain import Explanation, WordWeight, explain_prompt, prompt_words
from .noise import DEFAULT_INFERENCE_STEPS, DEFAULT_SEED, detection_noise, scoring_timesteps
from .profiles import PROFILES, ModelProfile, get_profile
from .result import MemorizationScore
from .scorer import Scorer, guidance_statistics, score_prompts, validate_prompts
from .settings import DEFAULT_BATCH_SIZE, MEASUREMENT_FIELDS, Measurement, ScoringSettings

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "MEASUREMENT_FIELDS",
    "ScoringSettings",
    "DEFAULT_INFERENCE_STEPS",
    "DEFAULT_MAX_SAMPLES",
    "AdaptiveScorer",
    "DecisionLimits",
    "DEFAULT_SEED",
    "PROFILES",
    "SCORE_SPACES",
    "DiscreteDiffusionAdapter",
    "Explanation",
    "Measurement",
    "MemorizationScore",
    "ModelAdapter",
    "ModelProfile",
    "NonFiniteScoreError",
    "PipelineAdapter",
    "Scorer",
    "ScoringError",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "TextConditioning",
    "UnsupportedPipelineError",
    "WordWeight",
    "adapter_for",
    "detection_noise",
    "explain_prompt",
    "get_profile",
    "guidance_statistics",
    "make_scorer",
    "prompt_words",
    "sample_stages",
    "score_prompts",
    "scoring_timesteps",
    "validate_prompts",
    "weights_digest",
]
