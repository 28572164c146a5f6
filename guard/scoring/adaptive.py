"""Adaptive sampling: the accuracy of ``max_samples`` noise draws for about the cost of one (docs/adaptive.md).

More noise draws make a score more accurate, but they can only change a *decision* for a prompt whose score
lies near one of the thresholds the decision compares it with. So every prompt is scored on one draw first;
a prompt is given more draws (stages 1, 2, 4, ... up to ``max_samples``) only while, for some threshold ``t``
of some metric, ``|mean_k - t|`` is within the **band** of stage ``k``: how far the mean of the first ``k``
draws can still lie from the mean of all ``max_samples``, measured on calibration prompts
(``guard.calibration.SampleSpread``). At ``k = max_samples`` the band is 0: a prompt that needs every draw is
decided on exactly the ``max_samples`` score.

Draw ``k`` is row ``k`` of one fixed detection-noise draw (``Scorer.sample_statistics``), so a prompt that ends
up with all draws has exactly its ``samples=max_samples`` score, and one that stops at ``k`` has the score the
first ``k`` rows give. The unconditional predictions are one cache entry for every sample count.

This module knows nothing of policies: the caller (``guard.core``) passes the thresholds and bands as
``DecisionLimits``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .conditioning import TextConditioning
from .result import MemorizationScore
from .scorer import Scorer, validate_prompts

__all__ = ["DEFAULT_MAX_SAMPLES", "METRICS", "AdaptiveScorer", "DecisionLimits", "make_scorer", "sample_stages"]

#: The measured values a decision can compare with a threshold.
METRICS = ("score", "norm", "cos")
#: The paper's more accurate setting (n=4), the default most draws an adaptive prompt gets.
DEFAULT_MAX_SAMPLES = 4


def sample_stages(max_samples: int) -> tuple[int, ...]:
    """The draw counts a prompt can stop at: 1, 2, 4, ... (doubling), then ``max_samples``.

    Doubling keeps the number of sequential model calls at ``log2(max_samples) + 1`` while a prompt that
    settles early pays for few draws.
    """
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    stages, k = [], 1
    while k < max_samples:
        stages.append(k)
        k *= 2
    return (*stages, max_samples)


@dataclass(frozen=True)
class DecisionLimits:
    """The thresholds a decision compares each metric with, and the band around them at each stage.

    ``thresholds`` maps a metric (``score``, ``norm``, ``cos``) to every threshold value any rule compares it
    with; ``bands`` maps ``(metric, k)`` to the band of a ``k``-draw mean, for every stage ``k`` below the
    maximum. A prompt is **settled** at stage ``k`` when every threshold of every metric is farther than the band
    from its ``k``-draw value: one more draw, or all of them, would (with the calibrated confidence) leave it on
    the same side of each threshold, so no rule's outcome can change.
    """

    thresholds: Mapping[str, tuple[float, ...]]
    bands: Mapping[tuple[str, int], float] = field(default_factory=dict)
    #: Why the bands are what they are (the calibration and quantile), for the scores' warnings if needed.
    source: str = ""

    def band(self, metric: str, k: int) -> float:
        """The band of metric ``metric`` after ``k`` draws (infinite where none was measured: keep sampling)."""
        return self.bands.get((metric, k), math.inf)

    def settled(self, values: Mapping[str, float], k: int) -> bool:
        """Whether a prompt with these ``k``-draw ``values`` is decided as its all-draws value would be."""
        if not all(math.isfinite(values[m]) for m in METRICS if m in values):
            return True  # a non-finite value is an error decision; more draws cannot make it trustworthy
        for metric, thresholds in self.thresholds.items():
            band = self.band(metric, k)
            if any(abs(values[metric] - t) <= band for t in thresholds):
                return False
        return True


class AdaptiveScorer(Scorer):
    """A ``Scorer`` that gives each prompt 1 to ``max_samples`` draws: more only near a decision threshold.

    ``samples`` (the number of draws a fixed-sampling scorer would use) is ``max_samples`` here: calibration,
    mitigation and every caller of ``statistics`` see the ``max_samples`` score, which is what an adaptive
    decision reproduces. Only ``score``/``score_conditioning`` with ``limits`` stop early.
    """

    sampling = "adaptive"

    def __init__(self, model: Any, *, max_samples: int = DEFAULT_MAX_SAMPLES, **kwargs: Any) -> None:
        if "samples" in kwargs:
            raise TypeError("an AdaptiveScorer takes max_samples, not samples")
        if max_samples < 2:
            raise ValueError(f"adaptive sampling needs max_samples >= 2, got {max_samples}")
        super().__init__(model, samples=max_samples, **kwargs)
        self.stages = sample_stages(max_samples)

    @property
    def max_samples(self) -> int:
        return self.samples

    def score(
        self, prompts: str | Sequence[str], *, limits: DecisionLimits | None = None, **encode_kwargs: Any
    ) -> list[MemorizationScore]:
        """Score each prompt with as many draws as ``limits`` require (all of them without ``limits``)."""
        prompts = validate_prompts(prompts)
        chunks = [self.encode(prompts[i : i + self.batch_size], **encode_kwargs)
                  for i in range(0, len(prompts), self.batch_size)]
        cond = chunks[0] if len(chunks) == 1 else TextConditioning.cat(chunks)
        return self.score_conditioning(cond, prompts, limits=limits)

    def score_conditioning(
        self,
        cond: TextConditioning,
        prompts: Sequence[str | None] | None = None,
        *,
        strict: bool = True,
        limits: DecisionLimits | None = None,
    ) -> list[MemorizationScore]:
        """Score precomputed conditioning adaptively; without ``limits`` every prompt gets ``max_samples`` draws
        (nothing says which decisions are safe, so the scores are the ``max_samples`` scores)."""
        prompts = list(prompts) if prompts is not None else [None] * len(cond)
        if len(prompts) != len(cond):
            raise ValueError(f"got {len(prompts)} prompts for {len(cond)} embeddings")
        norms, coses = self.adaptive_samples(cond, limits)
        results = []
        for index, (prompt, truncated) in enumerate(zip(prompts, cond.truncated)):
            used = len(norms[index])
            norm = float(torch.tensor(norms[index], dtype=torch.float32).mean())
            cos = float(torch.tensor(coses[index], dtype=torch.float32).mean())
            notes = [] if limits is not None else [
                f"adaptive sampling without decision limits: scored on all {self.samples} draws"
            ]
            results.append(self._result(prompt, norm, cos, truncated, strict, samples=used, warnings=notes))
        return results

    def adaptive_samples(
        self, cond: TextConditioning, limits: DecisionLimits | None
    ) -> tuple[list[list[float]], list[list[float]]]:
        """Per prompt, the per-draw ``norm`` and ``cos`` values it was given: draws are added stage by stage,
        batched across the prompts not yet settled."""
        count = len(cond)
        norms: list[list[float]] = [[] for _ in range(count)]
        coses: list[list[float]] = [[] for _ in range(count)]
        active = list(range(count))
        done = 0
        with torch.no_grad():
            for stage in self.stages:
                for start in range(0, len(active), self.batch_size):
                    chunk = active[start : start + self.batch_size]
                    contiguous = chunk == list(range(chunk[0], chunk[-1] + 1))
                    rows = cond.select(slice(chunk[0], chunk[-1] + 1) if contiguous else chunk)
                    norm, cos = self.sample_statistics(rows, done, stage - done)
                    for position, index in enumerate(chunk):
                        norms[index].extend(norm[position].tolist())
                        coses[index].extend(cos[position].tolist())
                done = stage
                if stage == self.samples:
                    break
                if limits is None:
                    continue
                active = [i for i in active if not limits.settled(self._values(norms[i], coses[i]), stage)]
                if not active:
                    break
        return norms, coses

    def _values(self, norms: list[float], coses: list[float]) -> dict[str, float]:
        """The current means, as a decision would see them (the float32 means the results report)."""
        norm = float(torch.tensor(norms, dtype=torch.float32).mean())
        cos = float(torch.tensor(coses, dtype=torch.float32).mean())
        return {"norm": norm, "cos": cos, "score": float(self.profile.combine(norm, cos))}


def make_scorer(model: Any, *, samples: int | str = 1, max_samples: int | None = None, **kwargs: Any) -> Scorer:
    """A ``Scorer`` for ``samples`` fixed draws, or an ``AdaptiveScorer`` for ``samples="adaptive"`` (up to
    ``max_samples`` draws, 4 by default): what a policy's ``scoring`` section asks for."""
    if samples == "adaptive":
        return AdaptiveScorer(model, max_samples=max_samples or DEFAULT_MAX_SAMPLES, **kwargs)
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise ValueError(f"samples must be a positive integer or 'adaptive', got {samples!r}")
    if max_samples is not None:
        raise ValueError("max_samples is only for samples='adaptive'")
    return Scorer(model, samples=samples, **kwargs)
