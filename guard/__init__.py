"""memguard: a generation-time memorization guard for text-to-image diffusion pipelines."""

from .actions import GuardReport, MemorizationBlocked, MemorizationWarning
from .audit import AuditLog, verify_log
from .calibrator import calibrate
from .guard import Guard, WithheldOutput
from .policy import CalibrationProfile, Decision, Policy, PolicyError, load_policy
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
    "AuditLog",
    "CalibrationProfile",
    "Decision",
    "Guard",
    "GuardReport",
    "MemorizationBlocked",
    "MemorizationWarning",
    "Policy",
    "PolicyError",
    "WithheldOutput",
    "calibrate",
    "load_policy",
    "verify_log",
    "MemorizationScore",
    "ModelProfile",
    "NonFiniteScoreError",
    "Scorer",
    "ScoringError",
    "UnsupportedPipelineError",
    "__version__",
    "score_prompts",
]
