"""memguard policies: the YAML schema, loading, calibration profiles, and the decision for a score."""

from .calibration import CalibrationProfile, cached_calibration_path, calibration_cache_dir
from .decision import AppliedThreshold, Decision, check_calibration, decide, decide_on_error, match_lists
from .errors import CalibrationError, CalibrationMismatch, CalibrationMissing, PolicyError
from .loader import format_loc, load_policy, shipped_policies, shipped_policy_path
from .schema import (
    Action,
    AuditSettings,
    Condition,
    ErrorAction,
    ExplicitProfile,
    Metric,
    Policy,
    PromptLists,
    RewriteSettings,
    RewriteTarget,
    Rule,
    ScoringSettings,
    When,
    normalize_prompt,
)

__all__ = [
    "Action",
    "AppliedThreshold",
    "AuditSettings",
    "CalibrationError",
    "CalibrationMismatch",
    "CalibrationMissing",
    "CalibrationProfile",
    "Condition",
    "Decision",
    "ErrorAction",
    "ExplicitProfile",
    "Metric",
    "Policy",
    "PolicyError",
    "PromptLists",
    "RewriteSettings",
    "RewriteTarget",
    "Rule",
    "ScoringSettings",
    "When",
    "cached_calibration_path",
    "calibration_cache_dir",
    "check_calibration",
    "decide",
    "decide_on_error",
    "format_loc",
    "load_policy",
    "match_lists",
    "normalize_prompt",
    "shipped_policies",
    "shipped_policy_path",
]
