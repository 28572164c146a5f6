"""Does a calibration fit the traffic it judges? Statistics and checks, stdlib only.

A relative threshold read off a calibration promises a false-positive rate only for prompts that look like
the calibration prompts. These checks measure how far that holds:

* ``caption_fit``: the share of the built-in generic captions' tokens that a model's tokenizers do not know
  (unknown or byte-fallback tokens). A model with a small or specialised vocabulary sees most generic
  captions as ``<unk>`` soup, so a calibration made from them says nothing about its real prompts.
* ``threshold_fit``: do the first scored requests cross the policy's thresholds at the rates the calibration
  promised? The decision is about the thresholds, not about the whole distribution: traffic whose body differs
  a little from the calibration's (a KS test on a few hundred requests notices that) while the thresholds still
  hold is fine, and a handful of memorized prompts among the first requests is what the guard is for. So the
  requests far above the traffic's own body (``body_fence``) are not counted, and each threshold's crossing
  share, with its interval, is compared with its promise, as the drift alarms do. The KS distance and the share
  above the calibration's median are reported beside it, to describe the difference, not to decide.
* ``body_fence``: where the body of a sample of scores ends, robust to up to about 20% of it lying far above
  (memorized prompts); used here and by ``memguard calibrate --from-audit``.
* ``ks_two_sample``: how far the first scored requests sit from the calibration's scores (descriptive).
* ``wilson_interval`` and ``promise_interval``: the observed share of traffic above a threshold, and the
  share the calibration promised (with the calibration's own sampling error), for drift alarms.

No scipy: these run inside the guard and the audit summary, whose dependencies stay small.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

__all__ = [
    "DEFAULT_FENCE",
    "DEFAULT_TAIL_FENCE",
    "BodyFence",
    "CaptionFit",
    "FarRecords",
    "DistributionFit",
    "MAX_UNKNOWN_SHARE",
    "ThresholdCheck",
    "ThresholdFit",
    "TokenizerFit",
    "body_fence",
    "caption_fit",
    "distribution_fit",
    "far_records",
    "ks_two_sample",
    "promise_interval",
    "quantile",
    "threshold_fit",
    "wilson_interval",
]

#: Above this share of unknown/byte-fallback tokens the generic captions do not describe the model's prompts.
#: CLIP's byte-level BPE and T5's SentencePiece know every generic caption token (share 0); a word-level
#: vocabulary of a few hundred words misses about 40% of them.
MAX_UNKNOWN_SHARE = 0.05
#: The body fence: the lower of median + DEFAULT_FENCE x (P75 - median) and P95 + DEFAULT_TAIL_FENCE x
#: (P95 - P75) of the values it keeps. For a normal body the first is 2.7 standard deviations (0.35% of
#: ordinary values above it, 0.4-0.5% once recomputed on what it keeps) and binds; for a body with a short
#: tail (the shipped memorizer's) the second binds, just above its ordinary maximum, where mildly memorized
#: prompts start. The price of a fence that tight is paid by long ordinary tails (an exponential one loses
#: about 4.5% above it): see docs/calibration.md.
DEFAULT_FENCE = 4.0
DEFAULT_TAIL_FENCE = 1.5
#: A fence needs at least this many values; its tail term at least MIN_TAIL_VALUES.
MIN_FENCE_VALUES = 8
MIN_TAIL_VALUES = 40
#: A record far above the body in guidance norm alone counts as far when its score is above this quantile of the
#: scores of the records within both fences (the top 5%, where every policy threshold lies).
NORM_SCORE_QUANTILE = 0.95
_P90_OVER_P75 = 1.2815516 / 0.6744898  # normal quantiles: P90 - median over P75 - median
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


def quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of an ascending sequence (numpy's default)."""
    if not ordered:
        raise ValueError("quantile of an empty sequence")
    position = q * (len(ordered) - 1)
    lo = math.floor(position)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


@dataclass(frozen=True)
class BodyFence:
    """Where the body of a sample ends: ``value`` = the lower of median + ``k`` x (P75 - median) and
    P95 + ``tail`` x (P95 - P75) of the values it keeps (``bound`` says which).

    ``value`` is None when there is no fence (too few values, or no spread above the median).
    """

    value: float | None
    k: float
    median: float
    spread: float
    kept: int
    excluded: int
    rounds: int
    why_none: str | None = None
    tail: float | None = DEFAULT_TAIL_FENCE
    bound: str = "spread"

    def keeps(self, x: float) -> bool:
        return self.value is None or x <= self.value

    def describe(self) -> str:
        if self.value is None:
            return f"no fence ({self.why_none})"
        if self.bound == "tail":
            return (f"P95 + {self.tail:g} x (P95 - P75) of the records it keeps = {self.value:.6g} (below median + "
                    f"{self.k:g} x (P75 - median) = {self.median + self.k * self.spread:.6g}: a short upper tail)")
        return (f"median + {self.k:g} x (P75 - median) of the records it keeps = {self.median:.6g} + {self.k:g} x "
                f"{self.spread:.4g} = {self.value:.6g}")

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "k": self.k, "tail": self.tail, "bound": self.bound, "median": self.median,
                "spread": self.spread, "kept": self.kept, "excluded": self.excluded, "rounds": self.rounds,
                "why_none": self.why_none}


def body_fence(values: Sequence[float], k: float = DEFAULT_FENCE, *, tail: float | None = DEFAULT_TAIL_FENCE,
               max_rounds: int = 200) -> BodyFence:
    """The fence above which values lie far from the sample's body (likely memorized prompts).

    Median and P75 move little when up to about 20% of a sample lies far above its body, unlike P90 or a standard
    deviation; the fence is recomputed on the values it keeps until it keeps the same ones, so a large far group
    does not widen it (a memorized tenth of the traffic puts the P75 of all values at the body's P83, the next
    round undoes most of that). The tail term (P95 + ``tail`` x (P95 - P75)) only ever lowers the fence: it binds
    where the body's upper tail is short, so mildly memorized prompts just above it are caught; a far group
    inflates P95 and then the first term binds. Shrink-only: each round keeps a subset of the last, so it ends.
    """
    if k <= 0 or (tail is not None and tail <= 0):
        raise ValueError(f"k and tail must be positive, got k={k}, tail={tail}")
    ordered = sorted(v for v in values if math.isfinite(v))
    total = len(ordered)
    if total < MIN_FENCE_VALUES:
        return BodyFence(None, k, quantile(ordered, 0.5) if ordered else math.nan, 0.0, total, 0, 0,
                         f"fewer than {MIN_FENCE_VALUES} values", tail)
    kept, rounds = total, 0
    median = spread = fence = math.nan
    bound = "spread"
    while rounds < max_rounds:
        rounds += 1
        body = ordered[:kept]
        median = quantile(body, 0.5)
        spread = quantile(body, 0.75) - median
        if spread <= 0:  # a quarter of the values tie at the median: read the spread further out
            spread = (quantile(body, 0.9) - median) / _P90_OVER_P75
        if spread <= 0:
            return BodyFence(None, k, median, 0.0, total, 0, rounds,
                             "no spread above the median: most values are equal", tail)
        fence, bound = median + k * spread, "spread"
        if tail is not None and kept >= MIN_TAIL_VALUES:
            p95 = quantile(body, 0.95)
            short = p95 + tail * (p95 - quantile(body, 0.75))
            if short < fence:
                fence, bound = short, "tail"
        inside = bisect.bisect_right(ordered, fence, 0, kept)
        if inside == kept:
            break
        kept = inside
    return BodyFence(fence, k, median, spread, kept, total - kept, rounds, None, tail, bound)


@dataclass(frozen=True)
class FarRecords:
    """Which records lie far above the traffic's body (likely memorized), and by which fence.

    ``far[i]`` is None for a record within the body, else ``"score"`` (above the score's body fence) or
    ``"norm"`` (its guidance norm above the norm's body fence, and its score above the top 5% of the records
    within both fences).
    """

    score: BodyFence
    norm: BodyFence | None
    norm_score_floor: float | None
    far: tuple[str | None, ...]

    @property
    def count(self) -> int:
        return sum(1 for f in self.far if f is not None)

    def label(self, kind: str) -> str:
        """Why a record of this kind is far, for reports."""
        if kind == "score":
            return f"above the fence {self.score.value:.6g}"
        norm = self.norm.value if self.norm is not None else math.nan
        return (f"guidance norm above its fence {norm:.6g} with a score above {self.norm_score_floor:.6g} "
                "(the top 5%)")

    def reasons(self) -> dict[str, int]:
        """Far records per reason, for reports."""
        out: dict[str, int] = {}
        for kind in ("score", "norm"):
            n = sum(1 for f in self.far if f == kind)
            if n:
                out[self.label(kind)] = n
        return out

    def describe(self) -> str:
        text = f"score {self.score.describe()}"
        if self.norm is not None and self.norm.value is not None:
            text += f"; guidance norm {self.norm.describe()} (applied to scores in the top 5%)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"score": self.score.to_dict(), "norm": self.norm.to_dict() if self.norm is not None else None,
                "norm_score_floor": self.norm_score_floor, "count": self.count}


def far_records(scores: Sequence[float], norms: Sequence[float] | None = None, k: float = DEFAULT_FENCE, *,
                tail: float | None = DEFAULT_TAIL_FENCE) -> FarRecords:
    """The records far above the traffic's body: by score, and by guidance norm where the score is high too.

    The score's weights decide how far a memorized prompt lies: with a weight on the cosine that does not suit
    the model (the family's on the eps-strong memorizer), memorized prompts score inside the ordinary upper tail
    while their guidance norm, the term memorization drives in every family, still lies far out. A record whose
    norm alone is far but whose score is unremarkable changes no threshold, so the norm fence only excludes
    records scoring above the top 5% of the records within both fences (where every policy threshold lies);
    removing a record below a threshold could otherwise loosen it by a rank.
    """
    score = body_fence(scores, k, tail=tail)
    far: list[str | None] = [None if score.keeps(v) else "score" for v in scores]
    norm = floor = None
    if norms is not None and len(norms) == len(scores):
        norm = body_fence(norms, k, tail=tail)
        kept = sorted(v for v, n, f in zip(scores, norms, far) if f is None and norm.keeps(n))
        if norm.value is not None and kept:
            floor = quantile(kept, NORM_SCORE_QUANTILE)
            far = [f if f is not None or norm.keeps(n) or v <= floor else "norm"
                   for v, n, f in zip(scores, norms, far)]
    return FarRecords(score, norm, floor, tuple(far))


@dataclass(frozen=True)
class ThresholdCheck:
    """One relative threshold against the first requests: how many crossed it, and what was promised."""

    rule: str
    metric: str
    above_fpr: float
    value: float
    crossed: int
    n: int
    promised: tuple[float, float, float]
    observed_interval: tuple[float, float]

    @property
    def verdict(self) -> str | None:
        """``too many``/``too few`` when the observed and promised intervals do not overlap."""
        if self.observed_interval[0] > self.promised[2]:
            return "too many"
        if self.observed_interval[1] < self.promised[1]:
            return "too few"
        return None

    def describe(self, confidence: float) -> str:
        low, high = self.observed_interval
        return (f"{self.rule} ({self.metric} > {self.value:.6g}, above_fpr {self.above_fpr:g}): {self.crossed} of "
                f"{self.n} ({100 * self.crossed / self.n:.1f}%, {100 * confidence:g}% interval {100 * low:.1f}-"
                f"{100 * high:.1f}%), promised {100 * self.promised[0]:.2f}% ({100 * self.promised[1]:.2f}-"
                f"{100 * self.promised[2]:.2f}%): {self.verdict or 'holds'}")

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "metric": self.metric, "above_fpr": self.above_fpr, "value": self.value,
                "crossed": self.crossed, "n": self.n, "observed_low": self.observed_interval[0],
                "observed_high": self.observed_interval[1], "promised": self.promised[0],
                "promised_low": self.promised[1], "promised_high": self.promised[2], "verdict": self.verdict}


@dataclass(frozen=True)
class DistributionFit:
    """Descriptive: the first requests' KS distance to the calibration's scores and their share above its median."""

    n: int
    calibration_n: int
    ks: float
    p_value: float
    above_median: int
    confidence: float = 0.99
    median_interval: tuple[float, float] = field(default=(0.0, 1.0))

    def describe(self) -> str:
        return (f"{100 * self.above_median / self.n:.0f}% of them score above the calibration's median (50% "
                f"expected; {100 * self.confidence:g}% interval {100 * self.median_interval[0]:.0f}-"
                f"{100 * self.median_interval[1]:.0f}%), KS distance {self.ks:.3f} (p = {self.p_value:.2g})")

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "calibration_n": self.calibration_n, "ks": round(self.ks, 6),
                "p_value": self.p_value, "above_median": self.above_median,
                "median_interval": [round(v, 6) for v in self.median_interval]}


def distribution_fit(observed: Sequence[float], calibration: Sequence[float], *,
                     confidence: float = 0.99) -> DistributionFit:
    """How the observed scores differ from the calibration's: KS distance and the share above its median.

    Descriptive only. With a few hundred requests a KS test notices differences of the body that change no
    threshold's rate (the shipped model's own held-out captions against its calibration: p < 0.001); what a
    difference does to the thresholds is ``threshold_fit``'s to judge.
    """
    ordered = sorted(calibration)
    median = ordered[len(ordered) // 2]
    above = sum(v > median for v in observed)
    d, p = ks_two_sample(observed, ordered)
    return DistributionFit(len(observed), len(ordered), d, p, above, confidence,
                           wilson_interval(above, len(observed), confidence))


@dataclass(frozen=True)
class ThresholdFit:
    """Do the first requests cross each relative threshold at the rate the calibration promised?

    ``problem`` names the thresholds whose observed interval and promised interval do not overlap; requests
    above ``fence`` (far above the traffic's own body: memorized prompts, most likely) are not counted. A
    threshold crossed too often counts when it is the loosest on its metric or the next looser one is crossed too
    often as well: a calibration that does not fit the traffic moves its upper tail across several thresholds,
    while an excess above the strictest threshold alone is what a few memorized prompts just below the fence
    produce in a few hundred requests (reported as ``tail_only``; the drift alarms keep counting it). Too few
    counts at any threshold.
    """

    n: int
    counted: int
    fence: FarRecords
    checks: tuple[ThresholdCheck, ...]
    distribution: DistributionFit | None
    confidence: float = 0.99

    def _next_looser_too_many(self, check: ThresholdCheck) -> bool:
        looser = [c for c in self.checks if c.metric == check.metric and c.above_fpr > check.above_fpr]
        return not looser or min(looser, key=lambda c: c.above_fpr).verdict == "too many"

    @property
    def failing(self) -> tuple[ThresholdCheck, ...]:
        return tuple(c for c in self.checks if c.verdict == "too few"
                     or (c.verdict == "too many" and self._next_looser_too_many(c)))

    @property
    def tail_only(self) -> tuple[ThresholdCheck, ...]:
        """Crossed too often while the next looser threshold holds: reported, not a misfit on its own."""
        return tuple(c for c in self.checks if c.verdict == "too many" and not self._next_looser_too_many(c))

    @property
    def problem(self) -> str | None:
        failing = self.failing
        if not failing:
            return None
        verdicts = {c.verdict for c in failing}
        left_out = self.n - self.counted
        parts = [f"the first {self.n} scored requests cross the policy's thresholds at rates the calibration did "
                 "not promise: " + "; ".join(c.describe(self.confidence) for c in failing)]
        if left_out:
            parts.append(f"{left_out} request(s) far above the others' (score above {self.fence.score.value:.6g}, "
                         "or guidance norm far out: likely memorized) not counted")
        if self.distribution is not None:
            parts.append(f"of all {self.n}, {self.distribution.describe()}")
        if "too many" in verdicts:
            advice = ("the policy flags ordinary prompts of this traffic more often than it promises: calibrate on "
                      "prompts like it (`memguard calibrate --nmem`) or on it (`memguard calibrate --from-audit`)")
        else:
            advice = ("the thresholds sit above this traffic, so memorized prompts may pass: calibrate on prompts "
                      "like it (`memguard calibrate --nmem`) or on it (`memguard calibrate --from-audit`)")
        return "; ".join(parts) + "; " + advice

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "counted": self.counted, "fence": self.fence.to_dict(), "confidence": self.confidence,
                "thresholds": [c.to_dict() for c in self.checks],
                "failing": [c.rule for c in self.failing], "tail_only": [c.rule for c in self.tail_only],
                "distribution": self.distribution.to_dict() if self.distribution is not None else None}


def threshold_fit(
    observed: Mapping[str, Sequence[float]],
    thresholds: Iterable[Mapping[str, Any]],
    calibration_scores: Sequence[float] | None = None,
    *,
    confidence: float = 0.99,
    fence: float = DEFAULT_FENCE,
) -> ThresholdFit:
    """Judge the first requests by what they do to the policy's thresholds.

    ``observed``: aligned values per metric (``score`` required; ``norm``/``cos`` for thresholds on them).
    ``thresholds``: ``rule, metric, above_fpr, value, exceeded, n`` per relative threshold
    (``guard.monitor.relative_thresholds``). Requests far above the body of the observed ones (``far_records``)
    are left out (they are what a guard is for, not a sign its calibration is wrong); for each threshold the share
    of the rest crossing it gets a Wilson interval, compared with the Beta interval of what the calibration
    promised.
    """
    scores = list(observed["score"])
    body = far_records(scores, observed.get("norm"), fence)
    keep = [i for i, f in enumerate(body.far) if f is None]
    checks = []
    for item in thresholds:
        values = observed.get(item["metric"])
        if values is None or not keep or int(item["n"]) <= 0:
            continue
        crossed = sum(values[i] > item["value"] for i in keep)
        checks.append(ThresholdCheck(
            str(item["rule"]), str(item["metric"]), float(item["above_fpr"]), float(item["value"]), crossed,
            len(keep), promise_interval(int(item["exceeded"]), int(item["n"]), confidence),
            wilson_interval(crossed, len(keep), confidence)))
    distribution = (distribution_fit(scores, calibration_scores, confidence=confidence)
                    if calibration_scores and scores else None)
    return ThresholdFit(len(scores), len(keep), body, tuple(checks), distribution, confidence)
