"""Calibration from traffic: a profile built from the scores of real requests in an audit log.

The generic captions (or any hand-picked prompt set) only promise a false-positive rate for prompts that look
like them; the audit log holds the prompts the deployment actually sees. Every decision record of a scored
prompt carries ``score``, ``norm``, ``cos``, the weights' ``profile`` name and the ``measurement`` (model
fingerprint, steps, noise seed, samples, prediction space, weights), so a profile can be rebuilt from the log
alone, with ``audit.prompt: hash``: scores are needed, prompts are not. The measurement makes the profile one
that ``CalibrationProfile.check_measurement`` accepts for the same model and settings, and keeps records of
different models or settings in one log apart (``AuditCalibrationError`` names the groups when it cannot tell
which one is meant).

Traffic holds a few memorized prompts, whose high scores would raise the thresholds. They are excluded by
(any of): a far-out fence ``median + fence * (P90 - median)`` on the log's own scores (default 3.5: about 4.5
standard deviations, so for a normal bulk it excludes about 4 ordinary prompts in a million; it measures the
spread on the upper side, where memorized prompts are, so a long lower tail does not widen it as it widens
Tukey's ``Q3 + 3 IQR``); an absolute ``exclude_above``; the records' decision ``action`` or ``rule`` (e.g. the
rule of a loose monitoring threshold). No fence can tell a memorized prompt that scores like an ordinary one:
when the policy that wrote the log has a loose threshold you trust, exclude by its rule. The report says how
many were excluded and why: the profile's rates describe the remaining traffic, and over all traffic the share
above a threshold is at most ``above_fpr`` plus the excluded share.
"""

from __future__ import annotations

import json
import math
import os
from array import array
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from guard.scoring import Measurement

from .checks import promise_interval, wilson_interval
from .errors import CalibrationError
from .profile import MEASUREMENT_FIELDS, CalibrationProfile

__all__ = ["AuditCalibration", "AuditCalibrationError", "MeasurementGroup", "profile_from_audit", "stability"]

DEFAULT_FENCE = 3.5
MIN_RECORDS = 20
_GROUP_FIELDS = ("model_class", "profile", *MEASUREMENT_FIELDS)


class AuditCalibrationError(CalibrationError):
    """The log cannot give a calibration: too few usable records, or several models/settings and no choice."""


@dataclass
class MeasurementGroup:
    """The usable records of one model measured one way: their values, and what was excluded before the fence."""

    key: tuple[Any, ...]
    scores: array = field(default_factory=lambda: array("d"))
    norms: array = field(default_factory=lambda: array("d"))
    coses: array = field(default_factory=lambda: array("d"))
    excluded: Counter = field(default_factory=Counter)
    first: str | None = None
    last: str | None = None

    @property
    def fields(self) -> dict[str, Any]:
        return dict(zip(_GROUP_FIELDS, self.key))

    @property
    def total(self) -> int:
        return len(self.scores) + sum(self.excluded.values())

    def describe(self) -> str:
        f = self.fields
        return (f"{f['model_class']} {f['fingerprint']} (weights {f['profile']} g_norm={f['g_norm']:g} "
                f"g_cos={f['g_cos']:g}, steps {f['steps']}, seed {f['seed']}, samples {f['samples']}, "
                f"{f['prediction_space']}): {self.total} scored decisions")


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

    @property
    def considered(self) -> int:
        return self.used + sum(self.excluded.values())

    @property
    def excluded_share(self) -> float:
        return sum(self.excluded.values()) / self.considered if self.considered else 0.0

    def lines(self) -> list[str]:
        """What was used, excluded and skipped, for the CLI."""
        out = [f"from {self.path}: {self.used} of {self.considered} scored decisions used ({self.first} to "
               f"{self.last})"]
        if self.excluded:
            why = ", ".join(f"{n} {reason}" for reason, n in self.excluded.items())
            out.append(f"  excluded {sum(self.excluded.values())} ({100 * self.excluded_share:.2f}%) as likely "
                       f"memorized: {why}")
            out.append(f"  rates read off this profile describe the remaining traffic; over all of it the share "
                       f"above a threshold is at most above_fpr + {100 * self.excluded_share:.2f}%")
        else:
            out.append("  excluded none as likely memorized")
        if self.skipped:
            out.append("  skipped: " + ", ".join(f"{n} {reason}" for reason, n in self.skipped.items()))
        if len(self.groups) > 1:
            out.append(f"  the log holds {len(self.groups)} models/settings; used only {self.profile.model_class} "
                       f"{self.profile.model_fingerprint} measured as chosen")
        return out


def _quantile(ordered: Sequence[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    lo = math.floor(position)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def _read_groups(path: Path, since: datetime | None, until: datetime | None, exclude_above: float | None,
                 exclude_actions: frozenset[str], exclude_rules: frozenset[str],
                 skipped: Counter) -> dict[tuple[Any, ...], MeasurementGroup]:
    from guard.audit.review import parse_time

    groups: dict[tuple[Any, ...], MeasurementGroup] = {}
    with path.open("rb") as handle:
        for raw in handle:
            try:
                record = json.loads(raw)
            except ValueError:
                skipped["unreadable lines"] += 1
                continue
            if not isinstance(record, dict) or record.get("event") not in ("decision", "error"):
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
            if record.get("action") in exclude_actions:
                group.excluded[f"with action {record.get('action')}"] += 1
            elif record.get("rule") in exclude_rules:
                group.excluded[f"matched by rule {record.get('rule')}"] += 1
            elif exclude_above is not None and score > exclude_above:
                group.excluded[f"above {exclude_above:g}"] += 1
            else:
                group.scores.append(score)
                group.norms.append(norm)
                group.coses.append(cos)
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
                merged.scores.extend(g.scores)
                merged.norms.extend(g.norms)
                merged.coses.extend(g.coses)
                merged.excluded.update(g.excluded)
                merged.first = min(x for x in (merged.first, g.first) if x) if (merged.first or g.first) else None
                merged.last = max(x for x in (merged.last, g.last) if x) if (merged.last or g.last) else None
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


def profile_from_audit(
    path: str | os.PathLike[str],
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

    ``measurement`` (a ``Scorer.measurement()``) picks the records measured that way; without it the log must
    hold a single model and setting. ``fence``: exclude scores above ``median + fence * (P90 - median)`` of the
    remaining scores (None: no fence). Raises ``AuditCalibrationError`` when fewer than ``min_records`` remain.
    """
    target = Path(path)
    skipped: Counter = Counter()
    try:
        groups = _read_groups(target, since, until, exclude_above, frozenset(exclude_actions),
                              frozenset(exclude_rules), skipped)
    except OSError as error:
        raise AuditCalibrationError(f"{target}: cannot read: {error.strerror or error}") from None
    group = _choose(groups, measurement, target)
    excluded = Counter(group.excluded)
    keep = list(range(len(group.scores)))
    cut = None
    if fence is not None and len(keep) >= 4:
        ordered = sorted(group.scores)
        median = _quantile(ordered, 0.5)
        cut = median + fence * (_quantile(ordered, 0.9) - median)
        keep = [i for i in keep if group.scores[i] <= cut]
        above = len(group.scores) - len(keep)
        if above:
            excluded[f"above the fence median + {fence:g} (P90 - median) = {cut:.6g}"] += above
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
    return AuditCalibration(profile, str(target), len(keep), dict(excluded), dict(skipped), others, cut,
                            group.first, group.last, tuple(group.scores[i] for i in keep))


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
