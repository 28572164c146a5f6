"""Turning a score into a decision under a policy."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from guard.calibration import CalibrationMismatch, CalibrationMissing, CalibrationProfile, Metric
from guard.scoring import DecisionLimits, Explanation, MemorizationScore

from .rewrite import RewriteResult
from .schema import Action, Condition, Policy, RewriteSettings

__all__ = [
    "AppliedThreshold",
    "Decision",
    "check_calibration",
    "decide",
    "decide_on_error",
    "decision_limits",
    "match_lists",
    "rule_thresholds",
]

_OPS = {"gte": ">=", "gt": ">", "lte": "<=", "lt": "<", "above_fpr": ">"}


class AppliedThreshold(BaseModel):
    """One bound as actually applied: relative bounds resolved to the model's absolute number."""

    model_config = ConfigDict(frozen=True)

    metric: Metric
    op: Literal[">=", ">", "<=", "<"]
    value: float
    above_fpr: float | None = None

    def holds(self, measured: float) -> bool:
        return {
            ">=": measured >= self.value,
            ">": measured > self.value,
            "<=": measured <= self.value,
            "<": measured < self.value,
        }[self.op]

    def describe(self) -> str:
        rel = f" (above_fpr {self.above_fpr:g})" if self.above_fpr is not None else ""
        return f"{self.metric} {self.op} {self.value:.6g}{rel}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Decision(BaseModel):
    """What the policy decided for one prompt, and why: the one model of a verdict.

    ``rule`` is the matched rule's name (or ``rules[i]``), ``lists.always_block``/``lists.always_allow``,
    ``default`` or ``on_error``. ``thresholds`` are the matched rule's bounds as applied.
    For ``rewrite``, ``rewrite`` holds the settings and ``rewrite_target`` the absolute target score; once the
    rewrite ran, ``mitigation`` says which rungs ran, the verification signal, threshold and verdict (also on
    a fallback decision). ``explanation`` (when the policy's ``explain`` asks for one) attributes the score to the
    prompt's words by position and weight, never by text. Audit records, API responses and reports are all derived
    from it (``to_dict``).
    """

    model_config = ConfigDict(frozen=True)

    prompt_index: int = Field(ge=0)
    action: Action
    rule: str
    reason: str
    thresholds: tuple[AppliedThreshold, ...] = ()
    score: MemorizationScore | None = None
    error: str | None = None
    calibration_id: str | None = None
    message: str | None = None
    rewrite: RewriteSettings | None = None
    rewrite_target: float | None = None
    mitigation: RewriteResult | None = None
    explanation: Explanation | None = None
    warnings: tuple[str, ...] = ()

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the prompt text is never part of it (non-finite numbers stay as they are)."""
        data = self.model_dump(mode="json")
        data["thresholds"] = list(data["thresholds"])
        data["warnings"] = list(self.warnings)
        if self.score is not None:
            data["score"] = self.score.to_dict()
        if self.explanation is not None:
            data["explanation"] = self.explanation.to_dict()
        return data


def match_lists(policy: Policy, prompt: str, prompt_index: int = 0) -> Decision | None:
    """The decision of the policy's prompt lists, or None when the prompt is on neither.

    Lists come before scoring, so a caller can skip scoring a listed prompt.
    """
    listed = policy.lists.lookup(prompt)
    if listed is None:
        return None
    action: Action = "block" if listed == "always_block" else "allow"
    how = "normalized" if policy.lists.match == "normalized" else "exact"
    return Decision(
        prompt_index=prompt_index,
        action=action,
        rule=f"lists.{listed}",
        reason=f"prompt is on lists.{listed} ({how} match)",
    )


def decide_on_error(
    policy: Policy, prompt_index: int, error: str, *, score: MemorizationScore | None = None
) -> Decision:
    """The policy's ``on_error`` decision for a prompt that could not be judged (fail-closed by default)."""
    return Decision(
        prompt_index=prompt_index,
        action=policy.on_error,
        rule="on_error",
        reason=f"error, on_error: {policy.on_error}: {error}",
        score=score,
        error=error,
    )


def decide(
    policy: Policy,
    score: MemorizationScore | None,
    prompt: str,
    calibration: CalibrationProfile | None = None,
    *,
    prompt_index: int = 0,
) -> Decision:
    """Decide one prompt: prompt lists first, then the rules in order (first match wins), then the default.

    A missing or non-finite score gives the ``on_error`` decision. Raises ``CalibrationMissing`` when
    the policy has relative thresholds and no calibration is given, and ``CalibrationMismatch`` when
    the calibration was measured differently from the score; the caller applies ``on_error``.
    """
    listed = match_lists(policy, prompt, prompt_index)
    if listed is not None:
        return listed
    if score is None:
        if not policy.rules:
            return _default(policy, prompt_index, None, None)
        return decide_on_error(policy, prompt_index, "the prompt was not scored")
    bad = [m for m in ("score", "norm", "cos") if not math.isfinite(getattr(score, m))]
    if bad:
        values = ", ".join(f"{m}={getattr(score, m)}" for m in bad)
        return decide_on_error(policy, prompt_index, f"non-finite {values}", score=score)
    if policy.uses_relative_thresholds:
        if calibration is None:
            raise CalibrationMissing(f"policy {policy.name!r} has no calibration for this model")
        check_calibration(calibration, score)
    cal_id = calibration.id if calibration is not None else None
    warnings: list[str] = []

    for index, rule in enumerate(policy.rules):
        applied: list[AppliedThreshold] = []
        for metric, condition in rule.when.conditions().items():
            applied.extend(_resolve(metric, condition, calibration, warnings))
        if all(t.holds(getattr(score, t.metric)) for t in applied):
            label = policy.rule_label(index)
            measured = ", ".join(
                f"{t.describe()} with {t.metric}={getattr(score, t.metric):.6g}" for t in applied
            )
            target = (
                _rewrite_target(rule.rewrite, applied, calibration, warnings)
                if rule.action == "rewrite"
                else None
            )
            return Decision(
                prompt_index=prompt_index,
                action=rule.action,
                rule=label,
                reason=f"rule {label} matched: {measured}" + (f" ({rule.message})" if rule.message else ""),
                thresholds=tuple(applied),
                score=score,
                calibration_id=cal_id,
                message=rule.message,
                rewrite=rule.rewrite,
                rewrite_target=target,
                warnings=tuple(dict.fromkeys(warnings)),
            )
    return _default(policy, prompt_index, score, cal_id, tuple(dict.fromkeys(warnings)))


def _default(
    policy: Policy,
    prompt_index: int,
    score: MemorizationScore | None,
    cal_id: str | None,
    warnings: tuple[str, ...] = (),
) -> Decision:
    shown = f" (score {score.score:.6g})" if score is not None else ""
    return Decision(
        prompt_index=prompt_index,
        action=policy.default,
        rule="default",
        reason=f"no rule matched{shown}; default action {policy.default}",
        score=score,
        calibration_id=cal_id,
        warnings=warnings,
    )


def check_calibration(calibration: CalibrationProfile, score: MemorizationScore) -> None:
    """Raise ``CalibrationMismatch`` unless ``calibration`` was measured the way ``score`` was (for an adaptive
    score: with adaptive sampling of the same most draws)."""
    measured = score.model_dump(include={"seed", "samples", "prediction_space", "g_norm", "g_cos", "sampling"})
    if score.sampling == "adaptive":
        measured["samples"] = score.max_samples
    problems = calibration.mismatches(measured)
    if problems:
        raise CalibrationMismatch(
            f"calibration {calibration.id} was measured differently from this score ({'; '.join(problems)}); "
            "recalibrate with the policy's scoring settings"
        )


def _resolve(
    metric: Metric, condition: Condition, calibration: CalibrationProfile | None, warnings: list[str]
) -> list[AppliedThreshold]:
    out = []
    for key in ("gte", "gt", "lte", "lt"):
        value = getattr(condition, key)
        if value is not None:
            out.append(AppliedThreshold(metric=metric, op=_OPS[key], value=float(value)))
    if condition.above_fpr is not None:
        assert calibration is not None
        out.append(
            AppliedThreshold(
                metric=metric,
                op=">",
                value=calibration.threshold_at_fpr(condition.above_fpr, metric),
                above_fpr=condition.above_fpr,
            )
        )
        _note_resolution(condition.above_fpr, calibration, warnings)
    return out


def _note_resolution(fpr: float, calibration: CalibrationProfile, warnings: list[str]) -> None:
    if fpr < calibration.resolution:
        warnings.append(
            f"above_fpr {fpr:g} is below calibration {calibration.id}'s resolution "
            f"1/{len(calibration.scores)}; its maximum observed score is used"
        )


def _rewrite_target(
    settings: RewriteSettings | None,
    applied: list[AppliedThreshold],
    calibration: CalibrationProfile | None,
    warnings: list[str],
) -> float | None:
    if settings is None:
        return None
    target = settings.target
    if target is None:
        lower = [t.value for t in applied if t.metric == "score" and t.op in (">", ">=")]
        return lower[0] if lower else None
    if target.score is not None:
        return float(target.score)
    assert calibration is not None and target.above_fpr is not None
    _note_resolution(target.above_fpr, calibration, warnings)
    return calibration.threshold_at_fpr(target.above_fpr)


def rule_thresholds(policy: Policy, calibration: CalibrationProfile | None) -> dict[str, tuple[float, ...]]:
    """Every threshold value the policy's rules compare each metric with (relative ones resolved with
    ``calibration``, which relative thresholds need): the values adaptive sampling keeps its band around."""
    found: dict[str, list[float]] = {}
    for rule in policy.rules:
        for metric, condition in rule.when.conditions().items():
            if condition.is_relative and calibration is None:
                raise CalibrationMissing(f"policy {policy.name!r} has no calibration for this model")
            for applied in _resolve(metric, condition, calibration, []):
                found.setdefault(metric, []).append(applied.value)
    return {metric: tuple(sorted(set(values))) for metric, values in found.items()}


def decision_limits(policy: Policy, calibration: CalibrationProfile) -> DecisionLimits:
    """What an adaptive scorer needs to decide how many draws a prompt gets under ``policy``: the rules'
    thresholds and the bands of ``calibration``'s spread at the policy's ``band_quantile``.

    Raises ``CalibrationMismatch`` when the calibration was not measured with adaptive sampling (it then has no
    spread, and its thresholds belong to another sample count).
    """
    if calibration.sampling != "adaptive" or calibration.spread is None:
        raise CalibrationMismatch(
            f"calibration {calibration.id} was measured with {calibration.samples} fixed draw(s); adaptive sampling "
            "needs a profile made with adaptive sampling (`memguard calibrate --samples adaptive`, or calibration: "
            "auto)"
        )
    quantile = policy.scoring.quantile
    return DecisionLimits(
        thresholds=rule_thresholds(policy, calibration),
        bands=calibration.spread.bands(quantile),
        source=f"calibration {calibration.id}, band quantile {quantile:g}",
    )
