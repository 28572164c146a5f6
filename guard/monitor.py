"""Watching a running guard's calibration: does it fit, and do its thresholds hold on the traffic?

``GuardCore`` owns one ``CalibrationMonitor`` and calls it at two points only: ``start`` when it begins
using a calibration profile, ``observe`` after each batch of decisions is written. The monitor

* checks, for the automatic calibration, that the generic captions suit the model's tokenizers
  (``guard.calibration.checks.caption_fit``);
* judges the first ``first_n`` requests judged with the calibration by what they do to the policy's
  thresholds: per relative threshold, the share of them crossing it against the share the calibration
  promised (``guard.calibration.checks.threshold_fit``; requests far above the traffic's own body, likely
  memorized, are not counted). A KS distance is reported with it but decides nothing: a difference of the
  body that leaves every threshold's rate within its promise is not worth a warning;
* keeps, per rule with a relative threshold, how many decisions were judged with the calibration and how
  many crossed the threshold, and raises a ``threshold_drift`` warning event once when the observed rate
  is inconsistent with what the calibration promised (too many **or** too few).

Every finding is said three ways: ``warnings.warn`` (fit checks), a ``log_event`` at warning level, and an
audit record (``calibration_mismatch``/``drift``), so it reaches a notebook user, an operator's logs and
an auditor. With ``calibration: auto-strict`` a failed fit check turns the relative thresholds into the
policy's ``on_error`` (``blocking_problem``). The counters are what the service exports to Prometheus.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .calibration import CalibrationError, CalibrationProfile
from .calibration.checks import DEFAULT_FENCE, caption_fit, promise_interval, threshold_fit, wilson_interval
from .events import log_event
from .policy import Decision, Policy

__all__ = ["CalibrationMonitor", "ThresholdCounter", "drift_advice", "relative_thresholds"]

#: Emits one audit record: ``emit(event, fields)``.
Emitter = Callable[[str, dict[str, Any]], None]
DEFAULT_CONFIDENCE = 0.99


@dataclass
class ThresholdCounter:
    """One rule's relative threshold under one calibration: what it promised and what traffic did."""

    rule: str
    metric: str
    above_fpr: float
    value: float
    calibration: str
    calibration_n: int
    exceeded: int
    confidence: float = DEFAULT_CONFIDENCE
    n: int = 0
    crossed: int = 0
    alarmed: str | None = None
    promised: tuple[float, float, float] = field(init=False)

    def __post_init__(self) -> None:
        if self.calibration_n > 0:
            self.promised = promise_interval(self.exceeded, self.calibration_n, self.confidence)
        else:  # calibration size unknown (an audit log without its calibration record): the asked rate only
            self.promised = (self.above_fpr, self.above_fpr, self.above_fpr)

    @property
    def promise_basis(self) -> str:
        """Where the promised rate comes from."""
        if self.calibration_n <= 0:
            return "asked above_fpr (calibration size unknown)"
        return f"calibration: {self.exceeded} of {self.calibration_n} above, expected (k+1)/(n+1)"

    @property
    def observed(self) -> float | None:
        return self.crossed / self.n if self.n else None

    def verdict(self) -> str | None:
        """``too many``/``too few`` when the observed interval and the promised one do not overlap."""
        if not self.n:
            return None
        low, high = wilson_interval(self.crossed, self.n, self.confidence)
        if low > self.promised[2]:
            return "too many"
        if high < self.promised[1]:
            return "too few"
        return None

    def to_dict(self) -> dict[str, Any]:
        low, high = wilson_interval(self.crossed, self.n, self.confidence) if self.n else (None, None)
        return {
            "rule": self.rule, "metric": self.metric, "above_fpr": self.above_fpr, "value": self.value,
            "calibration": self.calibration, "decisions": self.n, "crossed": self.crossed,
            "observed": self.observed, "observed_low": low, "observed_high": high,
            "promised": self.promised[0], "promised_low": self.promised[1], "promised_high": self.promised[2],
            "promise_basis": self.promise_basis, "confidence": self.confidence, "verdict": self.verdict(),
        }


def drift_advice(verdict: str) -> str:
    """What to do about a threshold whose rate left its promise (the monitor, audit summary and report say it)."""
    if verdict == "too few":
        return ("the thresholds sit above this traffic, so memorized prompts may pass: recalibrate from it "
                "(`memguard calibrate --from-audit`, which leaves out records far above the traffic's body and says "
                "how many)")
    return ("memorized prompts cross thresholds too, so first look at what crossed (`memguard audit report`): if "
            "they are memorized, the guard is doing its job and the calibration needs no change; if they are "
            "ordinary prompts, recalibrate from this traffic (`memguard calibrate --from-audit`, which leaves out "
            "records far above the traffic's body, says how many and how many memorized may remain)")


def relative_thresholds(policy: Policy, profile: CalibrationProfile) -> list[dict[str, Any]]:
    """Each rule condition with ``above_fpr``, resolved on ``profile``: value and calibration exceedance."""
    out = []
    for index, rule in enumerate(policy.rules):
        for metric, condition in rule.when.conditions().items():
            if condition.above_fpr is None:
                continue
            try:
                value = profile.threshold_at_fpr(condition.above_fpr, metric)
            except CalibrationError:
                continue  # the profile has no such distribution: decide() reports it per request
            exceeded = round(profile.fpr_of(value, metric) * len(profile.values(metric)))
            out.append({"rule": policy.rule_label(index), "metric": metric, "above_fpr": condition.above_fpr,
                        "value": value, "exceeded": exceeded, "n": len(profile.values(metric))})
    return out


class CalibrationMonitor:
    """Fit checks and live drift counters for one guard (thread-safe).

    Args:
        policy: the guard's policy (its relative rules are counted; ``auto-strict`` makes fit failures blocking).
        emit: writes an audit record; None writes none.
        confidence: of the observed (Wilson) and promised (Beta) intervals of the drift check.
        min_decisions: no drift verdict before this many decisions were judged with the calibration.
        first_n: how many first requests the threshold check judges.
        fence: the body fence (in P75 - median spreads) above which first requests are not counted.
    """

    def __init__(self, policy: Policy, *, emit: Emitter | None = None, confidence: float = DEFAULT_CONFIDENCE,
                 min_decisions: int = 200, first_n: int = 200, fence: float = DEFAULT_FENCE) -> None:
        self.policy = policy
        self.emit = emit
        self.confidence = confidence
        self.min_decisions = min_decisions
        self.first_n = first_n
        self.fence = fence
        self.profile: CalibrationProfile | None = None
        self.automatic = False
        self.counters: list[ThresholdCounter] = []
        self.problems: dict[str, str] = {}
        self.actions: dict[str, int] = {}
        self._first: list[tuple[float, float, float]] = []
        self._relative: list[dict[str, Any]] = []
        self._next_look = min_decisions
        self._lock = threading.Lock()

    @property
    def strict(self) -> bool:
        return self.automatic and self.policy.calibration == "auto-strict"

    @property
    def blocking_problem(self) -> str | None:
        """Why relative thresholds must not be used (``auto-strict`` and a failed fit check), else None."""
        if not self.strict or not self.problems:
            return None
        return "calibration: auto-strict: " + "; ".join(self.problems.values())

    def start(self, profile: CalibrationProfile, *, pipe: Any = None, automatic: bool = False,
              captions: list[str] | None = None) -> str | None:
        """Begin watching ``profile``; returns ``blocking_problem`` (the caption check ran for ``automatic``)."""
        from .data import generic_captions

        with self._lock:
            self.profile, self.automatic = profile, automatic
            self._first, self._next_look = [], self.min_decisions
            relative = relative_thresholds(self.policy, profile)
            self._relative = relative
            self.counters = [
                ThresholdCounter(t["rule"], t["metric"], t["above_fpr"], t["value"], profile.id, t["n"],
                                 t["exceeded"], self.confidence)
                for t in relative
            ]
        fit = None
        if automatic and pipe is not None:
            fit = caption_fit(pipe, captions if captions is not None else generic_captions())
        self._emit("calibration", check="loaded", message=f"judging with calibration {profile.id}", details={
            "source": profile.source, "n_prompts": profile.n_prompts, "automatic": automatic,
            "strict": self.strict, "relative": relative,
            "caption_fit": fit.to_dict() if fit is not None else None,
        })
        if fit is not None and fit.problem is not None:
            self._problem("caption_fit", fit.problem, fit.to_dict())
        return self.blocking_problem

    def observe(self, decisions: Iterable[Decision]) -> None:
        """Count decisions just written: the first requests for the threshold check, then the drift counters."""
        profile = self.profile
        found: list[tuple[str, str, dict[str, Any]]] = []
        with self._lock:
            for decision in decisions:
                self.actions[decision.action] = self.actions.get(decision.action, 0) + 1
                score = decision.score
                if profile is None or score is None or decision.calibration_id != profile.id:
                    continue
                if len(self._first) < self.first_n and math.isfinite(score.score):
                    self._first.append((score.score, score.norm, score.cos))
                    if len(self._first) == self.first_n:
                        found.extend(self._threshold_fit(profile))
                for counter in self.counters:
                    value = getattr(score, counter.metric)
                    if math.isfinite(value):
                        counter.n += 1
                        counter.crossed += value > counter.value
            found.extend(self._look())
        for kind, message, details in found:
            if kind == "mismatch":
                self._problem("score_distribution", message, details)
            else:
                log_event("threshold_drift", level="warning", **details)
                self._emit("drift", check="threshold_rate", message=message, details=details)

    def _threshold_fit(self, profile: CalibrationProfile) -> list[tuple[str, str, dict[str, Any]]]:
        """The first requests against the thresholds' promises; a finding when one does not hold."""
        observed = {name: [row[i] for row in self._first] for i, name in enumerate(("score", "norm", "cos"))}
        fit = threshold_fit(observed, self._relative, profile.scores, confidence=self.confidence, fence=self.fence)
        if fit.problem is None:
            return []
        return [("mismatch", fit.problem, fit.to_dict())]

    def _look(self) -> list[tuple[str, str, dict[str, Any]]]:
        """Drift verdicts, looked at when the count has grown by a quarter (few looks: few false alarms)."""
        largest = max((c.n for c in self.counters), default=0)
        if largest < self._next_look:
            return []
        self._next_look = math.ceil(largest * 1.25)
        out = []
        for counter in self.counters:
            verdict = counter.verdict() if counter.n >= self.min_decisions else None
            if verdict is None or counter.alarmed:
                continue
            counter.alarmed = verdict
            data = counter.to_dict()
            message = (f"rule {counter.rule}: {counter.crossed} of {counter.n} decisions "
                       f"({100 * data['observed']:.2f}%) crossed its threshold {counter.metric} > "
                       f"{counter.value:.6g} (above_fpr {counter.above_fpr:g}); "
                       f"calibration {counter.calibration} promised {100 * data['promised']:.2f}% "
                       f"({100 * self.confidence:g}% interval {100 * data['promised_low']:.2f}-"
                       f"{100 * data['promised_high']:.2f}%): {verdict}; {drift_advice(verdict)}")
            out.append(("drift", message, data))
        return out

    def _problem(self, check: str, message: str, details: dict[str, Any]) -> None:
        with self._lock:
            if check in self.problems:
                return
            self.problems[check] = message
        calibration = self.profile.id if self.profile is not None else None
        strict = self.strict
        note = " (calibration: auto-strict: relative thresholds now give on_error)" if strict else ""
        warnings.warn(f"memguard: {message}{note}", RuntimeWarning, stacklevel=5)
        log_event("calibration_mismatch", level="warning", check=check, calibration=calibration, strict=strict,
                  message=message)
        self._emit("calibration_mismatch", check=check, message=message, details={**details, "strict": strict})

    def _emit(self, event: str, *, check: str, message: str, details: dict[str, Any]) -> None:
        if self.emit is not None:
            calibration = self.profile.id if self.profile is not None else None
            self.emit(event, {"calibration": calibration, "check": check, "message": message, "details": details})

    def snapshot(self) -> dict[str, Any]:
        """Counters as plain data (the service's /metrics reads this)."""
        with self._lock:
            return {
                "calibration": self.profile.id if self.profile is not None else None,
                "actions": dict(self.actions),
                "thresholds": [c.to_dict() | {"alarmed": c.alarmed} for c in self.counters],
                "problems": dict(self.problems),
            }
