"""The result of scoring one prompt."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class MemorizationScore:
    """Anisotropy memorization score of one prompt (DESIGN.md §1).

    ``score = g_norm * norm + g_cos * cos``; higher means more likely memorized.
    The other fields say exactly how it was measured, so a score can be reproduced
    and compared only with scores measured the same way.
    """

    prompt: str | None
    norm: float
    cos: float
    score: float
    g_norm: float
    g_cos: float
    profile: str
    t_hi: int
    t_lo: int
    samples: int
    seed: int
    prediction_space: str
    truncated: bool = False
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["warnings"] = list(self.warnings)
        return data
