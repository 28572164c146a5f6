"""memguard policies: the YAML schema, loading, and the decision for a score."""

from .decision import AppliedThreshold, Decision, check_calibration, decide, decide_on_error, match_lists
from .errors import PolicyError
from .loader import load_policy, shipped_policies, shipped_policy_path
from .schema import (
    Action,
    AuditSettings,
    Condition,
    ErrorAction,
    ExplicitProfile,
    GuidanceStage,
    Policy,
    PromptLists,
    RewriteSettings,
    RewriteTarget,
    Rule,
    Rung,
    ScoringSettings,
    VerifySettings,
    When,
    normalize_prompt,
)

__all__ = [
    "Action",
    "AppliedThreshold",
    "AuditSettings",
    "Condition",
    "Decision",
    "ErrorAction",
    "ExplicitProfile",
    "Policy",
    "PolicyError",
    "PromptLists",
    "GuidanceStage",
    "RewriteSettings",
    "RewriteTarget",
    "Rung",
    "VerifySettings",
    "Rule",
    "ScoringSettings",
    "When",
    "check_calibration",
    "decide",
    "decide_on_error",
    "load_policy",
    "match_lists",
    "normalize_prompt",
    "shipped_policies",
    "shipped_policy_path",
]
