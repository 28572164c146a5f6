"""The result of scoring one prompt."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class MemorizationScore(BaseModel):
    """Anisotropy memorization score of one prompt.

    ``score = g_norm * norm + g_cos * cos``; higher means more likely memorized. The other fields say
    exactly how it was measured, so a score is only compared with scores measured the same way.
    ``samples`` is the number of noise draws the score averages; under ``adaptive`` sampling that is 1 to
    ``max_samples``, as many as the decision needed (``guard.scoring.adaptive``).
    ``prompt`` is the caller's own text and is never written to an audit log or an API response.
    """

    model_config = ConfigDict(frozen=True)

    prompt: str | None = Field(default=None, exclude=True)
    norm: float
    cos: float
    score: float
    g_norm: float
    g_cos: float
    profile: str
    t_hi: int | float
    t_lo: int | float
    samples: int
    seed: int
    prediction_space: str
    truncated: bool = False
    warnings: tuple[str, ...] = ()
    sampling: Literal["fixed", "adaptive"] = "fixed"
    max_samples: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The measured values and how they were measured (JSON-ready; the prompt is left out)."""
        data = self.model_dump(mode="json")
        data["warnings"] = list(self.warnings)
        return data
