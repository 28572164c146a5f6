"""Does a calibration fit the traffic it judges? Statistics and checks, stdlib only.

A relative threshold read off a calibration promises a false-positive rate only for prompts that look like
the calibration prompts. These checks measure how far that holds:

* ``caption_fit``: the share of the built-in generic captions' tokens that a model's tokenizers do not know
  (unknown or byte-fallback tokens). A model with a small or specialised vocabulary sees most generic
  captions as ``<unk>`` soup, so a calibration made from them says nothing about its real prompts.
* ``ks_two_sample``: how far the first scored requests sit from the calibration's scores.
* ``wilson_interval`` and ``promise_interval``: the observed share of traffic above a threshold, and the
  share the calibration promised (with the calibration's own sampling error), for drift alarms.

No scipy: these run inside the guard and the audit summary, whose dependencies stay small.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

__all__ = [
    "CaptionFit",
    "DistributionFit",
    "MAX_UNKNOWN_SHARE",
    "TokenizerFit",
    "caption_fit",
    "distribution_fit",
    "ks_two_sample",
    "promise_interval",
    "wilson_interval",
]

#: Above this share of unknown/byte-fallback tokens the generic captions do not describe the model's prompts.
#: CLIP's byte-level BPE and T5's SentencePiece know every generic caption token (share 0); a word-level
#: vocabulary of a few hundred words misses about 40% of them.
MAX_UNKNOWN_SHARE = 0.05
#: The score-distribution check fires below this p-value (two-sample KS, first requests vs calibration).
DISTRIBUTION_ALPHA = 0.001
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_TOKENIZERS = ("tokenizer", "tokenizer_2", "tokenizer_3")


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def wilson_interval(successes: int, trials: int, confidence: float = 0.99) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion: good coverage even at rates near 0 (unlike Wald)."""
    if trials <= 0:
        return 0.0, 1.0
    if not 0 <= successes <= trials:
        raise ValueError(f"successes must be in [0, {trials}], got {successes}")
    z = _z(confidence)
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (k is small here: calibration counts above a threshold)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    terms = [base - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _beta_quantile(q: float, exceeded: int, n: int) -> float:
    """Quantile ``q`` of Beta(exceeded + 1, n - exceeded), through P(Beta <= x) = P(Binomial(n, x) > exceeded)."""
    lo, hi = 0.0, 1.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if 1.0 - _binomial_cdf(exceeded, n, mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def promise_interval(exceeded: int, n: int, confidence: float = 0.99) -> tuple[float, float, float]:
    """What a threshold read off ``n`` calibration scores, ``exceeded`` of them above it, promises.

    Returns ``(expected, low, high)``: the rate at which ordinary prompts like the calibration's exceed the
    threshold is Beta(exceeded + 1, n - exceeded) distributed whatever the score distribution (the threshold
    is an order statistic), so its mean is ``(exceeded + 1) / (n + 1)``, not ``exceeded / n``: a threshold at
    ``above_fpr: 0.001`` on 1000 prompts is crossed by about 0.2% of ordinary prompts, not 0.1%.
    """
    if n <= 0 or not 0 <= exceeded < n:
        raise ValueError(f"need 0 <= exceeded < n, got exceeded={exceeded}, n={n}")
    tail = (1.0 - confidence) / 2.0
    return (exceeded + 1) / (n + 1), _beta_quantile(tail, exceeded, n), _beta_quantile(1.0 - tail, exceeded, n)


def _kolmogorov_sf(x: float) -> float:
    """P(K > x) of the Kolmogorov distribution (series; exact to 1e-12 for x > 0.2)."""
    if x <= 0.0:
        return 1.0
    if x < 0.2:
        return 1.0
    total = sum((-1) ** (j - 1) * math.exp(-2.0 * j * j * x * x) for j in range(1, 101))
    return max(0.0, min(1.0, 2.0 * total))


def ks_two_sample(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and its asymptotic p-value (Stephens' small-sample correction)."""
    xs, ys = sorted(a), sorted(b)
    n, m = len(xs), len(ys)
    if not n or not m:
        raise ValueError("both samples must be non-empty")
    i = j = 0
    d = 0.0
    while i < n and j < m:
        value = min(xs[i], ys[j])
        while i < n and xs[i] <= value:
            i += 1
        while j < m and ys[j] <= value:
            j += 1
        d = max(d, abs(i / n - j / m))
    effective = math.sqrt(n * m / (n + m))
    return d, _kolmogorov_sf((effective + 0.12 + 0.11 / effective) * d)


@dataclass(frozen=True)
class TokenizerFit:
    """How many of the captions' tokens one tokenizer does not know."""

    name: str
    tokens: int
    unknown: int
    byte_fallback: int

    @property
    def share(self) -> float:
        return (self.unknown + self.byte_fallback) / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"tokenizer": self.name, "tokens": self.tokens, "unknown": self.unknown,
                "byte_fallback": self.byte_fallback, "share": round(self.share, 6)}


@dataclass(frozen=True)
class CaptionFit:
    """How well a prompt set suits a model's tokenizers; ``problem`` says why it does not, else None."""

    tokenizers: tuple[TokenizerFit, ...]
    prompts: int
    limit: float = MAX_UNKNOWN_SHARE

    @property
    def worst(self) -> TokenizerFit | None:
        return max(self.tokenizers, key=lambda t: t.share, default=None)

    @property
    def problem(self) -> str | None:
        worst = self.worst
        if worst is None or worst.share <= self.limit:
            return None
        return (f"{100 * worst.share:.1f}% of the generic captions' tokens are unknown to the model's {worst.name} "
                f"({worst.unknown + worst.byte_fallback} of {worst.tokens}; more than {100 * self.limit:g}% means "
                "the captions do not look like this model's prompts), so thresholds read off the automatic "
                "calibration may not hold on real traffic: calibrate on your own prompts (`memguard calibrate "
                "--nmem`) or on your traffic (`memguard calibrate --from-audit`)")

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "limit": self.limit, "tokenizers": [t.to_dict() for t in self.tokenizers]}


def _special_ids(tokenizer: Any) -> set[int]:
    ids = getattr(tokenizer, "all_special_ids", None) or []
    unk = getattr(tokenizer, "unk_token_id", None)
    return {i for i in ids if i != unk}


def caption_fit(pipe: Any, prompts: Sequence[str], limit: float = MAX_UNKNOWN_SHARE) -> CaptionFit:
    """Unknown and byte-fallback token shares of ``prompts`` under every tokenizer ``pipe`` has.

    Special tokens (padding, begin/end) are not counted; a tokenizer without an unknown token and without
    byte-fallback pieces (CLIP's byte-level BPE) always scores 0.
    """
    fits = []
    for name in _TOKENIZERS:
        tokenizer = getattr(pipe, name, None)
        if tokenizer is None or not callable(tokenizer):
            continue
        ids = tokenizer(list(prompts), add_special_tokens=False, truncation=False, padding=False,
                        verbose=False).input_ids
        special = _special_ids(tokenizer)
        unk = getattr(tokenizer, "unk_token_id", None)
        counts: dict[int, int] = {}
        for row in ids:
            for token in row:
                if token not in special:
                    counts[token] = counts.get(token, 0) + 1
        pieces = tokenizer.convert_ids_to_tokens(list(counts))
        byte = sum(n for (token, n), piece in zip(counts.items(), pieces)
                   if isinstance(piece, str) and _BYTE_TOKEN.match(piece))
        fits.append(TokenizerFit(name, sum(counts.values()), counts.get(unk, 0) if unk is not None else 0, byte))
    return CaptionFit(tuple(fits), len(prompts), limit)


@dataclass(frozen=True)
class DistributionFit:
    """The first scored requests against the calibration: KS distance, and the share above its median."""

    n: int
    calibration_n: int
    ks: float
    p_value: float
    above_median: int
    alpha: float = DISTRIBUTION_ALPHA
    confidence: float = 0.99
    median_interval: tuple[float, float] = field(default=(0.0, 1.0))

    @property
    def problem(self) -> str | None:
        if self.p_value >= self.alpha:
            return None
        share = self.above_median / self.n
        return (f"the first {self.n} scored requests do not look like the calibration's {self.calibration_n} "
                f"prompts: {100 * share:.0f}% of them score above the calibration's median (50% expected; "
                f"{100 * self.confidence:g}% interval {100 * self.median_interval[0]:.0f}-"
                f"{100 * self.median_interval[1]:.0f}%), KS distance {self.ks:.3f} (p = {self.p_value:.2g} < "
                f"{self.alpha:g}), so the false-positive rates the policy's relative thresholds promise may not "
                "hold on this traffic: recalibrate from it with `memguard calibrate --from-audit`")

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "calibration_n": self.calibration_n, "ks": round(self.ks, 6),
                "p_value": self.p_value, "alpha": self.alpha, "above_median": self.above_median,
                "median_interval": [round(v, 6) for v in self.median_interval]}


def distribution_fit(observed: Sequence[float], calibration: Sequence[float], *, alpha: float = DISTRIBUTION_ALPHA,
                     confidence: float = 0.99) -> DistributionFit:
    """Compare observed scores with the calibration's (a two-sample KS test; the median share explains it)."""
    ordered = sorted(calibration)
    median = ordered[len(ordered) // 2]
    above = sum(v > median for v in observed)
    d, p = ks_two_sample(observed, ordered)
    return DistributionFit(len(observed), len(ordered), d, p, above, alpha, confidence,
                           wilson_interval(above, len(observed), confidence))
