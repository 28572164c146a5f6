"""memguard policies: the YAML schema, loading, and the decision for a score."""

from guard.scoring import ScoringSettings

from .decision import (
    AppliedThreshold,
    Decision,
    check_calibration,
    decide,
    decide_on_error,
    decision_limits,
    match_lists,
    rule_thresholds,
)
from .errors import PolicyError
from .loader import load_policy, shipped_policies, shipped_policy_path
from .rewrite import Optimisation, RewriteResult, RungResult
from .schema import (
    Action,
    AuditSettings,
    Condition,
    ErrorAction,
    ExplainSettings,
    ExplicitProfile,
    GuidanceStage,
    Policy,
    PromptLists,
    RewriteSettings,
    RewriteTarget,
    Rule,
    Rung,
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
    "ExplainSettings",
    "ExplicitProfile",
    "Policy",
    "PolicyError",
    "PromptLists",
    "GuidanceStage",
    "RewriteSettings",
    "RewriteTarget",
    "Rung",
    "VerifySettings",
    "Optimisation",
    "RewriteResult",
    "Rule",
    "RungResult",
    "ScoringSettings",
    "When",
    "check_calibration",
    "decide",
    "decide_on_error",
    "decision_limits",
    "load_policy",
    "match_lists",
    "normalize_prompt",
    "rule_thresholds",
    "shipped_policies",
    "shipped_policy_path",
]
