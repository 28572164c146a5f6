"""Calibration from traffic: a profile built from the scores of real requests in an audit log.

The generic captions (or any hand-picked prompt set) only promise a false-positive rate for prompts that look
like them; the audit log holds the prompts the deployment actually sees. Every decision record of a scored
prompt carries ``score``, ``norm``, ``cos``, the weights' ``profile`` name and the ``measurement`` (model
fingerprint, steps, noise seed, samples, prediction space, weights), so a profile can be rebuilt from the log
alone, with ``audit.prompt: hash``: scores are needed, prompts are not. The measurement makes the profile one
that ``CalibrationProfile.check_measurement`` accepts for the same model and settings, and keeps records of
different models or settings in one log apart (``AuditCalibrationError`` names the groups when it cannot tell
which one is meant).

Traffic holds memorized prompts, whose high scores would raise the thresholds: left in, a tenth of memorized
traffic puts the 2% threshold among them, and the profile then stops fewer memorized prompts than one made from
ordinary prompts. So records far above the log's own body are excluded by a fence that such a share cannot move
(``guard.calibration.checks.body_fence``: median + 4 x (P75 - median), lowered to P95 + 1.5 x (P95 - P75) for a
short upper tail, recomputed on the records it keeps until it keeps the same ones), whether the policy that wrote
the log blocked them or not; and records whose guidance norm lies beyond the same fence on the norms while their
score is in the top 5% (``far_records``: with score weights that do not suit the model, memorized prompts score
inside the ordinary tail while their norm is far out). The fence is tight on purpose: a mildly memorized prompt
scores just above the ordinary tail. Its price is paid where ordinary traffic has a
long upper tail: the ordinary records above it are excluded too and the thresholds come out lower (more false
positives, never fewer memorized prompts stopped); the report says how many were excluded and bounds what that
does to every rate. It also estimates, from the spread of the excluded records, how many memorized prompts may
remain below the fence above each threshold.

When asked, records are also excluded by an absolute score (``exclude_above``) or by the logging policy's
decisions (``exclude_actions``, ``exclude_rules``), but decisions only where they are consistent with the body:
if the records the policy flagged that lie within the body are more than its calibration promised it would flag
among ordinary prompts, that calibration did not fit the traffic (the automatic calibration on a model with its
own vocabulary flags a few percent of ordinary prompts at ``above_fpr: 0.001``) and excluding by its decisions
would cut the ordinary tail; then they are not applied, and the report says why.
"""

from __future__ import annotations

import math
import os
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from guard.calibration.checks import (
    DEFAULT_FENCE,
    FarRecords,
    far_records,
    promise_interval,
    quantile,
    wilson_interval,
)
from guard.calibration.errors import CalibrationError
from guard.calibration.profile import MEASUREMENT_FIELDS, CalibrationProfile
from guard.scoring import Measurement

from .review import parse_time
from .trail import TrailPaths, TrailStats, read_trail

__all__ = [
    "DEFAULT_FENCE",
    "AuditCalibration",
    "AuditCalibrationError",
    "DecisionExclusion",
    "MeasurementGroup",
    "Remaining",
    "profile_from_audit",
    "stability",
]

MIN_RECORDS = 20
#: Confidence of the intervals of the decision-consistency check.
CONFIDENCE = 0.99
_GROUP_FIELDS = ("model_class", "profile", *MEASUREMENT_FIELDS)


class AuditCalibrationError(CalibrationError):
    """The log cannot give a calibration: too few usable records, or several models/settings and no choice."""


@dataclass
class MeasurementGroup:
    """The usable records of one model measured one way: their values, and which exclusion asked for each.

    ``asked[i]`` is 0 for a record no option excludes, else 1 + the index in ``reasons`` of the option that
    does (an absolute score, an action, a rule); the fence is applied later, on all of them.
    """

    key: tuple[Any, ...]
    scores: array = field(default_factory=lambda: array("d"))
    norms: array = field(default_factory=lambda: array("d"))
    coses: array = field(default_factory=lambda: array("d"))
    asked: array = field(default_factory=lambda: array("H"))
    reasons: list[str] = field(default_factory=list)
    #: per reason: the largest above_fpr of the relative thresholds that flagged its records, and their calibration
    flagged_fpr: dict[str, float] = field(default_factory=dict)
    calibrations: dict[str, set] = field(default_factory=dict)
    first: str | None = None
    last: str | None = None

    def add(self, score: float, norm: float, cos: float, reason: str | None) -> None:
        self.scores.append(score)
        self.norms.append(norm)
        self.coses.append(cos)
        if reason is None:
            self.asked.append(0)
            return
        if reason not in self.reasons:
            self.reasons.append(reason)
        self.asked.append(1 + self.reasons.index(reason))

    def extend(self, other: MeasurementGroup) -> None:
        """Take ``other``'s records (same measurement under another weight-profile name)."""
        for i in range(len(other.scores)):
            code = other.asked[i]
            self.add(other.scores[i], other.norms[i], other.coses[i], other.reasons[code - 1] if code else None)
        for reason, fpr in other.flagged_fpr.items():
            self.flagged_fpr[reason] = max(fpr, self.flagged_fpr.get(reason, 0.0))
        for reason, ids in other.calibrations.items():
            self.calibrations.setdefault(reason, set()).update(ids)
        self.first = min(x for x in (self.first, other.first) if x) if (self.first or other.first) else None
        self.last = max(x for x in (self.last, other.last) if x) if (self.last or other.last) else None

    @property
    def fields(self) -> dict[str, Any]:
        return dict(zip(_GROUP_FIELDS, self.key))

    @property
    def total(self) -> int:
        return len(self.scores)

    def describe(self) -> str:
        f = self.fields
        return (f"{f['model_class']} {f['fingerprint']} (weights {f['profile']} g_norm={f['g_norm']:g} "
                f"g_cos={f['g_cos']:g}, steps {f['steps']}, seed {f['seed']}, samples {f['samples']}, "
                f"{f['prediction_space']}): {self.total} scored decisions")


@dataclass(frozen=True)
class DecisionExclusion:
    """Records an option asked to exclude by the logging policy's decisions, and whether that was consistent.

    ``within_body``: how many of them the fence keeps (they score like the traffic's body); ``promised``: the
    share of ordinary prompts the logging policy's rules promised to flag (the largest ``above_fpr`` among them,
    with its calibration's sampling error when the log holds the calibration record).
    """

    reason: str
    records: int
    within_body: int
    considered: int
    promised: tuple[float, float, float] | None
    confidence: float = CONFIDENCE

    @property
    def consistent(self) -> bool:
        if self.promised is None:  # not flagged by a relative threshold (e.g. an absolute rule): trusted
            return True
        low, _ = wilson_interval(self.within_body, self.considered, self.confidence)
        return low <= self.promised[2]

    def describe(self) -> str:
        share = self.within_body / self.considered if self.considered else 0.0
        promised = (f"its rules promised {100 * self.promised[0]:.2f}% ({100 * self.confidence:g}% interval up to "
                    f"{100 * self.promised[2]:.2f}%)" if self.promised is not None else "no relative threshold")
        return (f"{self.records} records {self.reason}, {self.within_body} of them within the traffic's body "
                f"({100 * share:.2f}% of it; {promised})")


@dataclass(frozen=True)
class Remaining:
    """Above one threshold of the profile: kept records, and how many of them may be memorized (an estimate)."""

    above_fpr: float
    threshold: float
    kept_above: int
    memorized: float

    def describe(self) -> str:
        return (f"{self.kept_above} kept records above it, of which about {self.memorized:.1f} may be memorized "
                "(estimated from the spread of the excluded records)")


@dataclass(frozen=True)
class AuditCalibration:
    """A profile made from an audit log, and the account of which records it used and excluded."""

    profile: CalibrationProfile
    path: str
    used: int
    excluded: dict[str, int]
    skipped: dict[str, int]
    groups: tuple[str, ...]
    fence: float | None
    first: str | None
    last: str | None
    in_order: tuple[float, ...] = ()
    body: FarRecords | None = None
    above_fence: tuple[float, ...] = ()
    decisions: tuple[DecisionExclusion, ...] = ()

    @property
    def considered(self) -> int:
        return self.used + sum(self.excluded.values())

    @property
    def excluded_share(self) -> float:
        return sum(self.excluded.values()) / self.considered if self.considered else 0.0

    def remaining(self, fpr: float) -> Remaining:
        """Above the profile's threshold at ``fpr``: how many kept records, and how many may be memorized.

        The excluded records' scores (median and interquartile spread, as a normal distribution) say how the
        memorized ones spread; the share of that spread between the threshold and the fence, scaled by how many
        lie above the fence, estimates how many memorized prompts the fence missed above the threshold. It is
        an estimate, not a bound: memorized prompts that score like ordinary ones leave no trace in the scores.
        Ordinary records above the fence (a long tail) widen the spread, so it then says more, not fewer.
        """
        from statistics import NormalDist

        threshold = self.profile.threshold_at_fpr(fpr)
        kept_above = sum(s > threshold for s in self.profile.scores)
        outside = sorted(self.above_fence)
        if self.fence is None or len(outside) < 3 or kept_above == 0:
            return Remaining(fpr, threshold, kept_above, 0.0)
        centre = quantile(outside, 0.5)
        spread = (quantile(outside, 0.75) - quantile(outside, 0.25)) / 1.349
        spread = max(spread, (outside[-1] - outside[0]) / 4, 1e-12)
        normal = NormalDist(centre, spread)
        beyond = max(1.0 - normal.cdf(self.fence), 1e-3)  # the share of memorized scores the fence caught
        between = max(0.0, normal.cdf(self.fence) - normal.cdf(threshold))
        return Remaining(fpr, threshold, kept_above, min(float(kept_above), len(outside) * between / beyond))

    def lines(self) -> list[str]:
        """What was used, excluded and skipped, for the CLI."""
        out = [f"from {self.path}: {self.used} of {self.considered} scored decisions used ({self.first} to "
               f"{self.last})"]
        if self.body is not None:
            out.append(f"  fences on the log's records: {self.body.describe()}")
        if self.excluded:
            why = ", ".join(f"{n} {reason}" for reason, n in self.excluded.items())
            out.append(f"  excluded {sum(self.excluded.values())} ({100 * self.excluded_share:.2f}%) as likely "
                       f"memorized: {why}")
            out.append(f"  rates read off this profile describe the remaining traffic; over all of it the share "
                       f"above a threshold is at most above_fpr + {100 * self.excluded_share:.2f}% (if some "
                       "excluded records are ordinary prompts of a long upper tail, the thresholds are lower than "
                       "the traffic's: more false positives, never fewer memorized prompts stopped)")
        else:
            out.append("  excluded none as likely memorized: no record lies far above the log's body")
        for decision in self.decisions:
            if decision.consistent:
                out.append(f"  by decision: {decision.describe()}: consistent, excluded")
            else:
                out.append(f"  NOT excluded by decision: {decision.describe()}; the logging policy's calibration "
                           "did not fit this traffic, and excluding what it flagged would cut the ordinary tail "
                           "(the fence still excludes those far above the body)")
        if self.skipped:
            out.append("  skipped: " + ", ".join(f"{n} {reason}" for reason, n in self.skipped.items()))
        if len(self.groups) > 1:
            out.append(f"  the log holds {len(self.groups)} models/settings; used only {self.profile.model_class} "
                       f"{self.profile.model_fingerprint} measured as chosen")
        return out


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _relative_fpr(record: dict[str, Any]) -> float | None:
    """The largest ``above_fpr`` among the relative thresholds that flagged this decision, if any."""
    fprs = [t.get("above_fpr") for t in record.get("thresholds") or () if isinstance(t, dict)]
    fprs = [f for f in fprs if isinstance(f, (int, float)) and 0 < f < 1]
    return max(fprs) if fprs else None


def _read_groups(paths: TrailPaths, since: datetime | None, until: datetime | None, exclude_above: float | None,
                 exclude_actions: frozenset[str], exclude_rules: frozenset[str], skipped: Counter,
                 promises: dict[tuple[str, float], tuple[int, int]]) -> dict[tuple[Any, ...], MeasurementGroup]:
    """One streaming pass over a log or a trail of many writers' segments (merged by time, ``read_trail``)."""
    groups: dict[tuple[Any, ...], MeasurementGroup] = {}
    stats = TrailStats()
    for record in read_trail(paths, stats=stats):
        if not isinstance(record, dict):
            continue
        if record.get("event") == "calibration":  # the logging policy's promises, for the decision check
            for item in (record.get("details") or {}).get("relative") or ():
                try:
                    promises[(str(record.get("calibration")), float(item["above_fpr"]))] = (
                        int(item["exceeded"]), int(item["n"]))
                except (KeyError, TypeError, ValueError):
                    continue
            continue
        if record.get("event") not in ("decision", "error"):
            continue
        stamp = record.get("timestamp") or ""
        if since or until:
            try:
                when = parse_time(stamp)
            except ValueError:
                skipped["without a readable time"] += 1
                continue
            if (since and when < since) or (until and when >= until):
                continue
        score, norm, cos = record.get("score"), record.get("norm"), record.get("cos")
        if not _finite(score, norm, cos):
            skipped["not scored"] += 1
            continue
        measured = record.get("measurement")
        if not isinstance(measured, dict):
            skipped["without a measurement (written before memguard recorded it)"] += 1
            continue
        measured = {"sampling": "fixed", **measured}  # records from before adaptive sampling
        try:
            key = ((record.get("model") or {}).get("class"), record.get("profile"),
                   *(measured[name] for name in MEASUREMENT_FIELDS))
        except KeyError:
            skipped["with an incomplete measurement"] += 1
            continue
        group = groups.get(key)
        if group is None:
            group = groups[key] = MeasurementGroup(key)
        if group.first is None or stamp < group.first:
            group.first = stamp
        if group.last is None or stamp > group.last:
            group.last = stamp
        reason = None
        if record.get("action") in exclude_actions:
            reason = f"with action {record.get('action')}"
        elif record.get("rule") in exclude_rules:
            reason = f"matched by rule {record.get('rule')}"
        if reason is not None:
            fpr = _relative_fpr(record)
            if fpr is not None:
                group.flagged_fpr[reason] = max(fpr, group.flagged_fpr.get(reason, 0.0))
                if record.get("calibration"):
                    group.calibrations.setdefault(reason, set()).add(str(record["calibration"]))
        elif exclude_above is not None and score > exclude_above:
            reason = f"above {exclude_above:g}"
        group.add(score, norm, cos, reason)
    if stats.unreadable:
        skipped["unreadable lines"] += stats.unreadable
    return groups


def _choose(groups: dict[tuple[Any, ...], MeasurementGroup], measurement: Measurement | None,
            path: Path) -> MeasurementGroup:
    listing = "; ".join(g.describe() for g in groups.values())
    if measurement is not None:
        wanted = {name: getattr(measurement, name) for name in MEASUREMENT_FIELDS}
        matching = [g for g in groups.values() if {k: g.fields[k] for k in MEASUREMENT_FIELDS} == wanted]
        if not matching:
            raise AuditCalibrationError(
                f"{path}: no scored decisions were measured like this model and these settings "
                f"({', '.join(f'{k}={v}' for k, v in wanted.items())}); the log holds: {listing or 'none'}")
        if len(matching) > 1:  # same measurement under two weight-profile names: one distribution
            merged = MeasurementGroup(matching[0].key)
            for g in matching:
                merged.extend(g)
            return merged
        return matching[0]
    if not groups:
        raise AuditCalibrationError(f"{path}: no scored decision records with a measurement")
    if len(groups) > 1:
        raise AuditCalibrationError(
            f"{path}: the log holds decisions of {len(groups)} models or scoring settings, which must not be "
            f"mixed in one calibration: {listing}; pass --model (and the policy's scoring settings, --policy) to "
            "choose one")
    return next(iter(groups.values()))


def _promise(group: MeasurementGroup, reason: str, promises: dict[tuple[str, float], tuple[int, int]]
             ) -> tuple[float, float, float] | None:
    """What the logging policy promised for the records of ``reason``: its calibration's rate, else the asked one."""
    fpr = group.flagged_fpr.get(reason)
    if fpr is None:
        return None
    known = [promises[(c, fpr)] for c in group.calibrations.get(reason, ()) if (c, fpr) in promises]
    if known:
        return max((promise_interval(k, n, CONFIDENCE) for k, n in known), key=lambda p: p[2])
    return (fpr, fpr, fpr)


def profile_from_audit(
    path: TrailPaths,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    measurement: Measurement | None = None,
    fence: float | None = DEFAULT_FENCE,
    exclude_above: float | None = None,
    exclude_actions: Iterable[str] = (),
    exclude_rules: Iterable[str] = (),
    min_records: int = MIN_RECORDS,
) -> AuditCalibration:
    """Build a calibration profile from the scored decisions of an audit log (one streaming pass).

    ``path`` is a log file, or a trail: a directory of writers' segments, or several files (``guard.audit.trail``),
    read as one log merged by time.

    ``measurement`` (a ``Scorer.measurement()``) picks the records measured that way; without it the log must
    hold a single model and setting. ``fence``: exclude scores above the body fence with this many
    (P75 - median) spreads (None: no fence). Decisions (``exclude_actions``, ``exclude_rules``) exclude only where
    they are consistent with the body (see the module docstring). Raises ``AuditCalibrationError`` when fewer than
    ``min_records`` remain.
    """
    target = Path(path) if isinstance(path, (str, os.PathLike)) else _trail_name(list(path))
    skipped: Counter = Counter()
    promises: dict[tuple[str, float], tuple[int, int]] = {}
    try:
        groups = _read_groups(path, since, until, exclude_above, frozenset(exclude_actions),
                              frozenset(exclude_rules), skipped, promises)
    except OSError as error:
        raise AuditCalibrationError(f"{target}: cannot read: {error.strerror or error}") from None
    group = _choose(groups, measurement, target)
    body = far_records(group.scores, group.norms, fence) if fence is not None else None
    cut = body.score.value if body is not None else None
    far = body.far if body is not None else (None,) * len(group.scores)
    within = [kind is None for kind in far]
    decisions = []
    applied: set[int] = set()
    for code, reason in enumerate(group.reasons, start=1):
        records = sum(1 for c in group.asked if c == code)
        inside = sum(1 for c, w in zip(group.asked, within) if c == code and w)
        if reason.startswith("above "):  # an absolute score the user chose: always applied
            applied.add(code)
            continue
        check = DecisionExclusion(reason, records, inside, len(group.scores), _promise(group, reason, promises))
        decisions.append(check)
        if check.consistent:
            applied.add(code)
    excluded: Counter = Counter()
    keep = []
    for i, (code, kind) in enumerate(zip(group.asked, far)):
        if kind is not None and body is not None:
            excluded[body.label(kind)] += 1
        elif code in applied:
            excluded[group.reasons[code - 1]] += 1
        else:
            keep.append(i)
    if len(keep) < min_records:
        raise AuditCalibrationError(
            f"{target}: only {len(keep)} usable scored decisions (at least {min_records} needed)"
            + (f"; skipped: {', '.join(f'{n} {r}' for r, n in skipped.items())}" if skipped else ""))
    f = group.fields
    if f.get("sampling") == "adaptive":
        raise AuditCalibrationError(
            f"{target}: these decisions were scored with adaptive sampling, whose profile needs the per-draw "
            "spread that audit records do not hold; calibrate from prompts instead (memguard calibrate --model DIR "
            "--samples adaptive)")
    window = f"{group.first or '?'}..{group.last or '?'}"
    profile = CalibrationProfile.from_scores(
        [group.scores[i] for i in keep], norms=[group.norms[i] for i in keep], coses=[group.coses[i] for i in keep],
        fingerprint=f["fingerprint"], model_class=f["model_class"] or "unknown", profile=f["profile"] or "custom",
        g_norm=f["g_norm"], g_cos=f["g_cos"], seed=f["seed"], samples=f["samples"], steps=f["steps"],
        prediction_space=f["prediction_space"], source=f"audit:{target.name}:{window}",
    )
    others = tuple(g.describe() for g in groups.values())
    outside = tuple(v for v, kind in zip(group.scores, far) if kind == "score")
    return AuditCalibration(profile, str(target), len(keep), dict(excluded), dict(skipped), others, cut,
                            group.first, group.last, tuple(group.scores[i] for i in keep), body, outside,
                            tuple(decisions))


def _trail_name(paths: list) -> Path:
    """How several paths are named in messages and in the profile's source: the one, else their common folder."""
    if len(paths) == 1:
        return Path(paths[0])
    return Path(os.path.commonpath([os.path.abspath(p) for p in paths]))


def stability(scores: Sequence[float], fprs: Sequence[float], confidence: float = 0.99) -> list[dict[str, Any]]:
    """Thresholds read off the first half of ``scores`` (log order), checked on the second half.

    Traffic that changes over the log's span (a new user base, a new house style) makes the later half cross
    the earlier half's thresholds at rates the earlier half did not promise; then calibrate on a recent
    window (``--since``).
    """
    half = len(scores) // 2
    first = CalibrationProfile.from_scores(
        scores[:half], fingerprint="split", model_class="split", profile="split", g_norm=1.0, g_cos=0.0, seed=0,
        samples=1, steps=1, prediction_space="eps", source="split")
    later = scores[half:]
    out = []
    for fpr in fprs:
        threshold = first.threshold_at_fpr(fpr)
        exceeded = round(first.fpr_of(threshold) * len(first.scores))
        expected, low, high = promise_interval(exceeded, len(first.scores), confidence)
        crossed = sum(s > threshold for s in later)
        o_low, o_high = wilson_interval(crossed, len(later), confidence)
        out.append({"above_fpr": fpr, "threshold": threshold, "later": len(later), "crossed": crossed,
                    "observed": crossed / len(later), "promised": expected, "promised_low": low,
                    "promised_high": high, "consistent": not (o_low > high or o_high < low)})
    return out
