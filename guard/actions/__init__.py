"""What happens after a decision: allow, warn, block, rewrite; and how a batch is split by them."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import MemguardError
from ..policy import Decision, Policy


class MemorizationWarning(UserWarning):
    """Emitted for prompts a policy lets through with ``warn``."""


class MemorizationBlocked(MemguardError):
    """The policy blocked the request; ``decisions`` and ``report`` (a ``GuardReport``) say which prompts and why."""

    def __init__(self, report: Any):
        self.report = report
        self.decisions = report.decisions
        reasons = "; ".join(f"prompt {d.prompt_index}: {d.reason}" for d in report.decisions if d.blocked)
        super().__init__(f"memguard blocked the request {report.request_id}: {reasons}")


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
    "MemorizationBlocked",
    "MemorizationWarning",
    "plan_batch",
    "warn_for",
]
