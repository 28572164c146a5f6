"""What a rewrite did: the one typed model of a mitigation's result, in decisions, reports and audit records.

The ladder (``guard.actions.ladder``) fills these in as it climbs; a ``Decision`` carries the prompt's
``RewriteResult`` once the rewrite ran (also on a fallback decision), the ``GuardReport`` keeps them by prompt,
and outcome records store ``RewriteResult.to_dict()``.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["Optimisation", "RewriteResult", "RungResult"]


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


class _Result(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class Optimisation(_Result):
    """One optimising method's run (prompt embedding or initial noise): the score before and after, steps, target."""

    method: str
    score_before: float | None = None
    score_after: float | None = None
    steps: int = Field(default=0, ge=0)
    target: float | None = None
    met: bool = False
    seconds: float = 0.0

    @field_validator("score_before", "score_after", "target", mode="before")
    @classmethod
    def _finite_or_none(cls, value: float | None) -> float | None:
        return _finite(value)


class RungResult(_Result):
    """One rung for one prompt: whether it ran, what its optimisations did, what verification measured, and what
    it cost in generations (its candidate generation, and its optimisation or scoring passes at their share of a
    generation: a pass over ``r`` rows costs ``r / (2 * steps)`` of a guided ``steps``-step generation)."""

    rung: str
    ran: bool
    verified: bool = False
    similarity: list[float] = Field(default_factory=list)
    optimisations: list[Optimisation] = Field(default_factory=list)
    edits: dict[str, Any] | None = None
    note: str | None = None
    seconds: float = 0.0
    generations: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json")
        data["similarity"] = [round(v, 6) for v in self.similarity]
        data["seconds"] = round(self.seconds, 4)
        data["generations"] = round(self.generations, 4)
        data["mitigations"] = data.pop("optimisations")  # the 0.2 name, which audit readers know
        return data


class RewriteResult(_Result):
    """What the rewrite of one prompt did: the rungs that ran, the verification signal, threshold and verdict.

    ``verified`` is True only when the released images were checked and passed; ``released`` names the rung whose
    input they came from. ``probe_agreement`` (the lowest cosine between the prompt's probes) near 1 says the model
    draws one fixed image for the original prompt. ``generations`` counts the generations spent on this prompt
    (probes at their share of a full generation's steps, candidates shared among the prompts of one call).
    """

    rungs: list[RungResult] = Field(default_factory=list)
    signal: str | None = None
    threshold: float | None = None
    above_fpr: float | None = None
    probe_agreement: float | None = None
    verified: bool = False
    released: str | None = None
    note: str | None = None
    seconds: float = 0.0
    generations: float = 0.0

    @field_validator("threshold", "probe_agreement", mode="before")
    @classmethod
    def _finite_or_none(cls, value: float | None) -> float | None:
        return _finite(value)

    @property
    def met(self) -> bool:
        """The rewrite succeeded: verified, or (with verification off) the score target was met."""
        return self.released is not None

    @property
    def method(self) -> str | None:
        return self.released

    @property
    def steps(self) -> int:
        """Optimisation steps spent over every rung that ran (guidance rungs spend none)."""
        return sum(o.steps for rung in self.rungs for o in rung.optimisations)

    def describe(self) -> str:
        tried = ", ".join(f"{r.rung}{'' if r.ran else ' (n/a)'}" for r in self.rungs) or "none"
        if self.verified:
            passed = next(r for r in self.rungs if r.rung == self.released and r.verified)
            value = max(passed.similarity, default=float("nan"))
            return (f"rewritten by {self.released}, verified ({self.signal} {value:.4f} <= {self.threshold:.4f}); "
                    f"rungs: {tried}")
        if self.released is not None:
            return f"rewritten by {self.released}, unverified (verification off); rungs: {tried}"
        return f"no rung passed verification; rungs: {tried}" + (f" ({self.note})" if self.note else "")

    def to_dict(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude={"rungs"})
        data["rungs"] = [r.to_dict() for r in self.rungs]
        data["threshold"] = None if self.threshold is None else round(self.threshold, 6)
        data["probe_agreement"] = None if self.probe_agreement is None else round(self.probe_agreement, 6)
        data["seconds"] = round(self.seconds, 4)
        data["generations"] = round(self.generations, 4)
        return data
