"""Reviewing an audit log or trail: one streaming pass into bounded-memory statistics (``memguard audit summary``).

A trail (a directory of segments, or several files) is read as one: records merged by time
(``guard.audit.trail.read_trail``), every writer counted on its own as well.

Memory does not grow with the number of records: counts are counters; score quantiles come from a
sample that holds every score up to ``sample_size`` (exact quantiles) and beyond that is a uniform
reservoir of that size (Vitter's algorithm R, seeded, so reruns agree): a quantile q is then off by
about ``sqrt(q (1 - q) / sample_size)`` in rank, under 0.0003 for the 99th percentile with 100 000.
The timeline has one bucket per hour of log time (bounded by the time span, not the record count), and
only the most recent ``keep_flagged`` blocked/rewritten requests and ``keep_errors`` errors are kept.
"""

from __future__ import annotations

import math
import os
import random
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from .drift import DriftCounters, drift_text
from .trail import TrailPaths, TrailStats, iter_trail, writer_of
from .verify import SignatureTally

__all__ = ["AuditFilter", "AuditSummary", "ScoreSample", "WriterTally", "parse_time", "render_text", "summarize"]

QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 1.0)
ACTIONS = ("allow", "warn", "rewrite", "block")
_FLAGGED = ("block", "rewrite")


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or time; without a zone it is taken as UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"not an ISO 8601 date or time: {text!r} (e.g. 2024-05-01 or 2024-05-01T12:00Z)") from None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _record_time(stamp: str) -> datetime | None:
    try:
        return parse_time(stamp)
    except (ValueError, AttributeError):
        return None


@dataclass(frozen=True)
class AuditFilter:
    """Which records count: a time range (inclusive since, exclusive until), actions, policy names, API key ids."""

    since: datetime | None = None
    until: datetime | None = None
    actions: frozenset[str] = frozenset()
    policies: frozenset[str] = frozenset()
    key_ids: frozenset[str] = frozenset()

    @property
    def active(self) -> bool:
        return bool(self.since or self.until or self.actions or self.policies or self.key_ids)

    def matches(self, record: dict[str, Any]) -> bool:
        if self.actions and record.get("action") not in self.actions:
            return False
        if self.policies and (record.get("policy") or {}).get("name") not in self.policies:
            return False
        if self.key_ids and (record.get("context") or {}).get("key_id") not in self.key_ids:
            return False
        if self.since or self.until:
            when = _record_time(record.get("timestamp", ""))
            if when is None or (self.since and when < self.since) or (self.until and when >= self.until):
                return False
        return True

    def describe(self) -> str:
        parts = []
        if self.since:
            parts.append(f"since {self.since.isoformat()}")
        if self.until:
            parts.append(f"until {self.until.isoformat()}")
        if self.actions:
            parts.append(f"action in {', '.join(sorted(self.actions))}")
        if self.policies:
            parts.append(f"policy in {', '.join(sorted(self.policies))}")
        if self.key_ids:
            parts.append(f"key in {', '.join(sorted(self.key_ids))}")
        return "; ".join(parts) or "all records"


class ScoreSample:
    """Every value up to ``capacity``, then a uniform reservoir of ``capacity`` values; exact min/max/mean."""

    def __init__(self, capacity: int = 100_000, seed: int = 0) -> None:
        self.capacity = capacity
        self.values: list[float] = []
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = -math.inf
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        self.count += 1
        self.total += value
        self.min = min(self.min, value)
        self.max = max(self.max, value)
        if len(self.values) < self.capacity:
            self.values.append(value)
            return
        slot = self._rng.randrange(self.count)
        if slot < self.capacity:
            self.values[slot] = value

    @property
    def exact(self) -> bool:
        return self.count <= self.capacity

    def quantiles(self, qs: tuple[float, ...] = QUANTILES) -> dict[str, float]:
        if not self.values:
            return {}
        ordered = sorted(self.values)
        out = {}
        for q in qs:
            position = q * (len(ordered) - 1)
            lo = math.floor(position)
            hi = min(lo + 1, len(ordered) - 1)
            out[f"p{q * 100:g}"] = ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)
        out["p0"], out["p100"] = self.min, self.max
        return out

    def histogram(self, bins: int = 40) -> tuple[list[float], list[float]]:
        """Bin edges and estimated counts (the sample's counts scaled to the number of scores)."""
        if not self.values:
            return [], []
        lo, hi = self.min, self.max
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        width = (hi - lo) / bins
        counts = [0] * bins
        for value in self.values:
            counts[min(int((value - lo) / width), bins - 1)] += 1
        scale = self.count / len(self.values)
        return [lo + i * width for i in range(bins + 1)], [c * scale for c in counts]


@dataclass
class WriterTally:
    """One writer's share of a trail: its segment, records, decisions, first and last time."""

    segment: str
    records: int = 0
    decisions: int = 0
    first: str | None = None
    last: str | None = None

    def add(self, record: dict[str, Any]) -> None:
        self.records += 1
        if record.get("event") in ("decision", "error"):
            self.decisions += 1
        stamp = record.get("timestamp")
        if isinstance(stamp, str):
            if self.first is None or stamp < self.first:
                self.first = stamp
            if self.last is None or stamp > self.last:
                self.last = stamp


@dataclass
class AuditSummary:
    """What a log (or trail) says, filtered: counts, score statistics, hourly timeline, recent flagged requests and
    errors, and the writers."""

    path: str
    filter: AuditFilter
    lines: int = 0
    unreadable: int = 0
    records: int = 0
    matched: int = 0
    first: str | None = None
    last: str | None = None
    actions: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    rules: Counter = field(default_factory=Counter)
    policies: Counter = field(default_factory=Counter)
    prompt_modes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    thresholds: Counter = field(default_factory=Counter)
    hours: dict[str, Counter] = field(default_factory=dict)
    awaiting: dict[tuple[Any, Any], dict[str, Any]] = field(default_factory=dict)
    outcome_records: int = 0
    rewrites: Counter = field(default_factory=Counter)
    scores: ScoreSample = field(default_factory=ScoreSample)
    flagged: deque = field(default_factory=lambda: deque(maxlen=200))
    recent_errors: deque = field(default_factory=lambda: deque(maxlen=50))
    events: Counter = field(default_factory=Counter)
    signing: SignatureTally = field(default_factory=SignatureTally)
    verification: Any = None  # a VerifyReport (or a trail's TrailReport) when the log was also verified
    writers: dict[str, WriterTally] = field(default_factory=dict)
    segments: int = 1
    trail: bool = False  # records carry writer ids (trail segments)
    drift: DriftCounters = field(default_factory=DriftCounters)
    findings: deque = field(default_factory=lambda: deque(maxlen=20))

    @property
    def decisions(self) -> int:
        """Decision (and error) records counted."""
        return sum(self.actions.values())

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def add(self, record: dict[str, Any]) -> None:
        """Count one record: a decision (or error) record, the outcome record that follows one, or another event."""
        if record.get("event") == "outcome":
            self._add_outcome(record)
            return
        if record.get("event") not in ("decision", "error"):
            self.add_event(record)
            return
        if not self.filter.actions:  # drift needs every decision of a calibration, not a chosen action's
            self.drift.add_decision(record)
        stamp = record.get("timestamp") or ""
        if self.first is None or stamp < self.first:
            self.first = stamp
        if self.last is None or stamp > self.last:
            self.last = stamp
        action = record.get("action")
        self.actions[action] += 1
        brief = _brief(record)
        outcome = record.get("outcome")
        if outcome == "pending":
            self.awaiting[(record.get("request_id"), record.get("prompt_index"))] = brief
        else:
            self.outcomes[outcome] += 1
        rule = record.get("rule") or "-"
        self.rules[(rule, action)] += 1
        policy = record.get("policy") or {}
        self.policies[(policy.get("name"), policy.get("version"))] += 1
        self.prompt_modes[record.get("prompt_mode")] += 1
        hour = self.hours.get(stamp[:13])
        if hour is None:
            hour = self.hours[stamp[:13]] = Counter()
        hour[action] += 1
        score = record.get("score")
        if isinstance(score, (int, float)) and math.isfinite(score):
            self.scores.add(float(score))
        for threshold in record.get("thresholds") or ():
            if threshold.get("metric") == "score" and len(self.thresholds) < 10_000:
                self.thresholds[(rule, threshold.get("op"), threshold.get("value"), threshold.get("above_fpr"))] += 1
        error = record.get("error")
        if error is not None or record.get("event") == "error":
            kind = (error or {}).get("type") or "error"
            self.errors[kind] += 1
            hour["error"] += 1
            self.recent_errors.append(brief)
        if action in _FLAGGED:
            self.flagged.append(brief)

    def add_event(self, record: dict[str, Any]) -> None:
        """A record that is no decision: calibration findings (guard/monitor.py) and other events, counted."""
        self.events[str(record.get("event"))] += 1
        self.drift.add_event(record)
        if record.get("event") in ("calibration_mismatch", "drift"):
            self.findings.append({"timestamp": record.get("timestamp"), "event": record.get("event"),
                                  "check": record.get("check"), "calibration": record.get("calibration"),
                                  "message": record.get("message")})

    def _add_outcome(self, record: dict[str, Any]) -> None:
        self.outcome_records += 1
        self.outcomes[record.get("outcome")] += 1
        mitigation = (record.get("extras") or {}).get("mitigation")
        if isinstance(mitigation, dict) and "verified" in mitigation:
            self.rewrites["verified" if mitigation.get("verified") else f"fell back: {record.get('action')}"] += 1
        decided = self.awaiting.pop((record.get("request_id"), record.get("prompt_index")), None)
        if decided is not None:  # the flagged list shows the same entry: complete it with what was done
            decided.update(outcome=record.get("outcome"), final_action=record.get("action"),
                           score_after=_score_after(record.get("extras") or {}))
        error = record.get("error")
        if error is not None:
            self.errors[(error or {}).get("type") or "error"] += 1
            self.recent_errors.append(_brief(record))

    @property
    def without_outcome(self) -> list[dict[str, Any]]:
        """Decisions written before acting whose outcome record never followed (e.g. the process died)."""
        return list(self.awaiting.values())

    def timeline(self, bucket: str = "auto") -> list[dict[str, Any]]:
        """Counts per action (and errors) per hour or day; ``auto`` is hourly for spans up to 3 days."""
        keys = sorted(self.hours)
        if bucket == "auto":
            bucket = "hour" if len(keys) <= 72 else "day"
        width = 13 if bucket == "hour" else 10
        merged: dict[str, Counter] = {}
        for key in keys:
            merged.setdefault(key[:width], Counter()).update(self.hours[key])
        return [{"bucket": k + (":00Z" if width == 13 else ""), "total": sum(c[a] for a in ACTIONS),
                 **{a: c[a] for a in ACTIONS}, "error": c["error"]} for k, c in merged.items()]

    def threshold_lines(self, limit: int = 12) -> list[dict[str, Any]]:
        """The score thresholds the decisions applied, most used first."""
        return [{"rule": r, "op": op, "value": v, "above_fpr": fpr, "count": n}
                for (r, op, v, fpr), n in self.thresholds.most_common(limit) if isinstance(v, (int, float))]

    def to_dict(self, bucket: str = "auto") -> dict[str, Any]:
        return {
            "path": self.path,
            "filter": self.filter.describe(),
            "lines": self.lines,
            "unreadable_lines": self.unreadable,
            "records": self.records,
            "matched": self.matched,
            "decisions": self.decisions,
            "first": self.first,
            "last": self.last,
            "actions": {a: self.actions.get(a, 0) for a in ACTIONS} | {
                str(k): v for k, v in self.actions.items() if k not in ACTIONS},
            "outcomes": dict(self.outcomes.most_common()),
            "without_outcome": {"count": len(self.awaiting), "recent": self.without_outcome[-20:]},
            "rewrites": dict(self.rewrites.most_common()),
            "rules": [{"rule": r, "action": a, "count": n} for (r, a), n in self.rules.most_common()],
            "policies": [{"name": p, "version": v, "count": n} for (p, v), n in self.policies.most_common()],
            "prompt_modes": dict(self.prompt_modes),
            "scores": {"count": self.scores.count, "exact": self.scores.exact,
                       "mean": self.scores.total / self.scores.count if self.scores.count else None,
                       "quantiles": self.scores.quantiles()},
            "thresholds": self.threshold_lines(),
            "timeline": self.timeline(bucket),
            "errors": {"count": self.error_count, "by_type": dict(self.errors.most_common()),
                       "recent": list(self.recent_errors)},
            "flagged_recent": list(self.flagged),
            "events": {str(k): v for k, v in self.events.most_common()},
            "signature": self.signing.to_dict(self.verification),
            "segments": self.segments,
            "writers": [{"writer": w, **vars(t)} for w, t in self.writers.items()],
            "calibration_findings": list(self.findings),
            "drift": {"computed": not self.filter.actions, "confidence": self.drift.confidence,
                      "rows": self.drift.rows() if not self.filter.actions else []},
        }


def _brief(record: dict[str, Any]) -> dict[str, Any]:
    policy = record.get("policy") or {}
    error = record.get("error") or {}
    extras = record.get("extras") or {}
    return {
        "timestamp": record.get("timestamp"), "seq": record.get("seq"), "request_id": record.get("request_id"),
        "policy": policy.get("name"), "rule": record.get("rule"), "action": record.get("action"),
        "outcome": record.get("outcome"), "score": record.get("score"), "prompt": record.get("prompt"),
        "prompt_mode": record.get("prompt_mode"), "reason": record.get("reason"),
        "error": f"{error.get('type')}: {error.get('message')}" if error else None,
        "prompt_index": record.get("prompt_index"),
        "writer": record.get("writer"),
        "score_after": _score_after(extras),
        "explanation": record.get("explanation"),
    }


def _score_after(extras: dict[str, Any]) -> float | None:
    """The score after a rewrite, as the mitigation recorded it."""
    mitigation = extras.get("mitigation")
    value = mitigation.get("score_after") if isinstance(mitigation, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def summarize(path: TrailPaths, filters: AuditFilter | None = None, *, sample_size: int = 100_000,
              keep_flagged: int = 200, keep_errors: int = 50) -> AuditSummary:
    """Read a log, or a trail (directories and/or files, merged by time), once; unreadable lines are counted, not
    fatal. Raises ``OSError`` if a path is unreadable (or a directory holds no segments)."""
    filters = filters or AuditFilter()
    if not isinstance(path, (str, os.PathLike)):
        path = list(path)
    shown = os.fspath(path) if isinstance(path, (str, os.PathLike)) else ", ".join(os.fspath(p) for p in path)
    summary = AuditSummary(shown, filters, scores=ScoreSample(sample_size),
                           flagged=deque(maxlen=keep_flagged), recent_errors=deque(maxlen=keep_errors))
    matches, active = filters.matches, filters.active
    stats = TrailStats()
    writers = summary.writers
    for segment, record in iter_trail(path, stats=stats):
        summary.records += 1
        writer = writer_of(record, segment) or "-"
        if not summary.trail and isinstance(record.get("writer"), str):
            summary.trail = True
        tally = writers.get(writer)
        if tally is None:
            tally = writers[writer] = WriterTally(str(segment.path))
        tally.add(record)
        summary.signing.note(record, segment.path)
        if active and not matches(record):
            if record.get("event") == "calibration":  # thresholds of the calibrations, whatever the window
                summary.drift.add_event(record)
            continue
        summary.matched += 1
        summary.add(record)
    summary.lines, summary.unreadable, summary.segments = stats.lines, stats.unreadable, len(stats.segments)
    return summary


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for n, row in enumerate(cells):
        out.append("  " + "  ".join(c.rjust(w) if n and _numeric(c) else c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def render_text(summary: AuditSummary, bucket: str = "auto") -> str:
    """The terminal view of ``memguard audit summary``."""
    data = summary.to_dict(bucket)
    out = [f"{data['path']}: {data['matched']} of {data['records']} records ({data['filter']})"]
    if data["unreadable_lines"]:
        out.append(f"  warning: {data['unreadable_lines']} unreadable line(s) skipped")
    if data["first"]:
        out.append(f"  from {data['first']} to {data['last']}")
    out.append("  " + summary.signing.line(summary.verification))
    if summary.segments > 1 or summary.trail:
        out += ["", f"writers ({len(summary.writers)}, {summary.segments} segment(s))"] + _table(
            ["writer", "records", "decisions", "first", "last"],
            [[w, t.records, t.decisions, t.first, t.last] for w, t in sorted(summary.writers.items())])
    if data["events"]:
        out.append("  events: " + ", ".join(f"{k} {v}" for k, v in data["events"].items()))
    total = max(sum(data["actions"].values()), 1)
    out += ["", "actions"] + _table(["action", "count", "share"], [
        [a, n, f"{100 * n / total:.1f}%"] for a, n in data["actions"].items()])
    out += ["", "outcomes"] + _table(["outcome", "count"], [[k, v] for k, v in data["outcomes"].items()])
    if data["rewrites"]:
        out += ["", "rewrites (verified before release, or fell back)"] + _table(
            ["result", "count"], [[k, v] for k, v in data["rewrites"].items()])
    missing = data["without_outcome"]
    if missing["count"]:
        out.append(f"  {missing['count']} decision(s) without an outcome record (acted on, then interrupted?)")
        out += _table(["time", "request", "prompt", "action"], [
            [m["timestamp"], m["request_id"], m.get("prompt_index"), m["action"]] for m in missing["recent"]])
    out += ["", "rules"] + _table(["rule", "action", "count"], [[r["rule"], r["action"], r["count"]]
                                                                for r in data["rules"]])
    out += ["", "policies"] + _table(["policy", "version", "count"], [[p["name"], p["version"], p["count"]]
                                                                      for p in data["policies"]])
    scores = data["scores"]
    how = "exact" if scores["exact"] else f"estimated from a {summary.scores.capacity}-score sample"
    out += ["", f"scores ({scores['count']} scored; quantiles {how})"]
    if scores["count"]:
        q = scores["quantiles"]
        out += _table(list(q), [list(q.values())])
    timeline = data["timeline"]
    out += ["", "blocked / rewritten over time"] + _table(
        ["bucket", "total", "block", "rewrite", "warn", "error"],
        [[t["bucket"], t["total"], t["block"], t["rewrite"], t["warn"], t["error"]] for t in timeline[-48:]])
    if len(timeline) > 48:
        out.append(f"  ({len(timeline) - 48} earlier buckets not shown; use --json)")
    drift = data["drift"]
    out += ["", f"relative thresholds: observed vs promised rate ({100 * drift['confidence']:g}% intervals)"]
    out += drift_text(drift["rows"], drift["confidence"]) if drift["computed"] else [
        "  not computed with --action (it needs every decision judged with a calibration)"]
    for finding in data["calibration_findings"]:
        out.append(f"  {finding['timestamp']} {finding['event']} ({finding['check']}): {finding['message']}")
    errors = data["errors"]
    out += ["", f"errors: {errors['count']}"]
    if errors["count"]:
        out += _table(["type", "count"], [[k, v] for k, v in errors["by_type"].items()])
        last = errors["recent"][-1]
        out.append(f"  last: {last['timestamp']} {last['error']}")
    return "\n".join(out)
