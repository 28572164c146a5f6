"""memguard: a generation-time memorization guard for text-to-image diffusion pipelines.

One public entry point per capability:

* ``Guard(pipe, policy=...)`` guards a diffusers pipeline; ``GuardCore`` is the judging core every
  front end (diffusers, ComfyUI, the HTTP service) shares;
* ``score_prompts`` / ``Scorer`` score prompts without a policy;
* ``load_policy`` reads a policy; ``calibrate`` makes a calibration profile;
* ``verify_log`` checks an audit log.
"""

from ._version import __version__
from .actions import MemorizationBlocked, MemorizationWarning
from .audit import AuditLog, verify_log
from .calibration import (
    CalibrationError,
    CalibrationMismatch,
    CalibrationMissing,
    CalibrationProfile,
    calibrate,
)
from .core import GuardCore, GuardReport
from .errors import MemguardError
from .guard import Guard, GuardedOutput, WithheldOutput
from .policy import Decision, Policy, PolicyError, load_policy
from .scoring import (
    MemorizationScore,
    ModelProfile,
    NonFiniteScoreError,
    Scorer,
    ScoringError,
    UnsupportedPipelineError,
    score_prompts,
)

__all__ = [
    "AuditLog",
    "CalibrationError",
    "CalibrationMismatch",
    "CalibrationMissing",
    "CalibrationProfile",
    "Decision",
    "Guard",
    "GuardCore",
    "GuardReport",
    "GuardedOutput",
    "MemguardError",
    "MemorizationBlocked",
    "MemorizationScore",
    "MemorizationWarning",
    "ModelProfile",
    "NonFiniteScoreError",
    "Policy",
    "PolicyError",
    "Scorer",
    "ScoringError",
    "UnsupportedPipelineError",
    "WithheldOutput",
    "__version__",
    "calibrate",
    "load_policy",
    "score_prompts",
    "verify_log",
]
