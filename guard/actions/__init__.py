"""What happens after a decision: allow, warn, block, rewrite; and how a batch is split by them."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..policy import Decision, Policy


class MemorizationWarning(UserWarning):
    """Emitted for prompts a policy lets through with ``warn``."""


class MemorizationBlocked(Exception):
    """The policy blocked the request; ``decisions`` and ``report`` say which prompts and why."""

    def __init__(self, report: GuardReport):
        self.report = report
        self.decisions = report.decisions
        reasons = "; ".join(f"prompt {d.prompt_index}: {d.reason}" for d in report.decisions if d.blocked)
        super().__init__(f"memguard blocked the request {report.request_id}: {reasons}")


@dataclass
class GuardReport:
    """What the guard did for one call; attached to the pipeline output as ``.memguard``."""

    request_id: str
    decisions: list[Decision]
    generated: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    blocked: bool = False
    withheld: bool = False
    latency_scoring_ms: float | None = None
    latency_generation_ms: float | None = None
    mitigations: dict[int, Any] = field(default_factory=dict)

    @property
    def actions(self) -> list[str]:
        return [decision.action for decision in self.decisions]

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "decisions": [decision.to_dict() for decision in self.decisions],
            "generated": list(self.generated),
            "dropped": list(self.dropped),
            "blocked": self.blocked,
            "withheld": self.withheld,
            "latency_scoring_ms": self.latency_scoring_ms,
            "latency_generation_ms": self.latency_generation_ms,
            "mitigations": {i: getattr(m, "to_dict", lambda m=m: m)() for i, m in self.mitigations.items()},
        }


@dataclass(frozen=True)
class BatchPlan:
    """Which prompts of a call are generated; ``blocked_whole`` means none are."""

    generate: tuple[int, ...]
    dropped: tuple[int, ...]
    blocked_whole: bool


def plan_batch(policy: Policy, decisions: Sequence[Decision]) -> BatchPlan:
    """Split a call by its decisions: a blocked prompt blocks the call or is dropped, as the policy says."""
    blocked = tuple(d.prompt_index for d in decisions if d.blocked)
    everyone = tuple(d.prompt_index for d in decisions)
    if blocked and (policy.batch == "block_whole" or len(blocked) == len(decisions)):
        return BatchPlan(generate=(), dropped=everyone, blocked_whole=True)
    return BatchPlan(generate=tuple(i for i in everyone if i not in blocked), dropped=blocked, blocked_whole=False)


def warn_for(decisions: Sequence[Decision]) -> None:
    """One ``MemorizationWarning`` per prompt generated under ``warn``."""
    for decision in decisions:
        if decision.action == "warn":
            warnings.warn(
                MemorizationWarning(f"memguard: prompt {decision.prompt_index}: {decision.reason}"), stacklevel=3
            )


__all__ = [
    "BatchPlan",
    "GuardReport",
    "MemorizationBlocked",
    "MemorizationWarning",
    "plan_batch",
    "warn_for",
]
