"""Drift alarms from an audit log: does each relative threshold hold the rate its calibration promised?

For every rule condition with ``above_fpr``, per calibration: **observed** = decisions judged with that
calibration whose value crossed the threshold / all decisions judged with it (only records carrying the same
``calibration`` id count in a denominator), with a Wilson interval; **promised** = the rate at which
ordinary prompts like the calibration's cross the threshold, with the calibration's own sampling error
(Beta(k + 1, n - k) when k of its n scores lie above the threshold, mean (k + 1)/(n + 1)). A rule is flagged
``too many`` or ``too few`` when the two intervals do not overlap.

The thresholds, k and n come from the ``calibration`` record the guard writes when it takes a profile into
use. A log without it (older logs, or one cut before it) still works: the threshold is learned from the
first decision that applied it, counting starts after that record, and the promise is the asked
``above_fpr`` alone (no allowance for the calibration's size; said in ``promise_basis``).

Memory is bounded: one counter per (calibration, rule, metric, above_fpr), at most ``MAX_COUNTERS``.
"""

from __future__ import annotations

import html
import math
from typing import Any

from guard.monitor import DEFAULT_CONFIDENCE, ThresholdCounter, drift_advice

__all__ = ["DriftCounters", "drift_advice_text", "drift_svg", "drift_text"]

MAX_COUNTERS = 1000
_Key = tuple[str, str, float]


class DriftCounters:
    """Per (calibration, rule, metric, above_fpr): decisions judged and thresholds crossed, streamed."""

    def __init__(self, confidence: float = DEFAULT_CONFIDENCE) -> None:
        self.confidence = confidence
        self.counters: dict[str, dict[_Key, ThresholdCounter]] = {}
        self._size = 0

    def _register(self, calibration: str, rule: str, metric: str, above_fpr: float, value: float,
                  exceeded: int = 0, n: int = 0) -> None:
        known = self.counters.setdefault(calibration, {})
        key = (rule, metric, float(above_fpr))
        existing = known.get(key)
        if existing is not None and (existing.calibration_n > 0 or n <= 0):
            return
        if existing is None and self._size >= MAX_COUNTERS:
            return
        counter = ThresholdCounter(rule, metric, float(above_fpr), float(value), calibration, n, exceeded,
                                   self.confidence)
        if existing is not None:  # a calibration record after learned decisions: keep the counts, gain the promise
            counter.n, counter.crossed = existing.n, existing.crossed
        else:
            self._size += 1
        known[key] = counter

    def add_event(self, record: dict[str, Any]) -> None:
        """A ``calibration`` record: the profile's relative thresholds and how many of its scores exceed them."""
        calibration = record.get("calibration")
        details = record.get("details") or {}
        if record.get("event") != "calibration" or not calibration:
            return
        for item in details.get("relative") or ():
            try:
                self._register(str(calibration), str(item["rule"]), str(item["metric"]), float(item["above_fpr"]),
                               float(item["value"]), int(item["exceeded"]), int(item["n"]))
            except (KeyError, TypeError, ValueError):
                continue

    def add_decision(self, record: dict[str, Any]) -> None:
        """One decision record: counted against every known threshold of its calibration."""
        calibration = record.get("calibration")
        if not calibration:
            return
        for counter in self.counters.get(calibration, {}).values():
            value = record.get(counter.metric)
            if isinstance(value, (int, float)) and math.isfinite(value):
                counter.n += 1
                counter.crossed += value > counter.value
        for applied in record.get("thresholds") or ():  # learned after counting: this record does not count
            fpr, value = applied.get("above_fpr"), applied.get("value")
            if isinstance(fpr, (int, float)) and isinstance(value, (int, float)):
                self._register(calibration, record.get("rule") or "-", applied.get("metric") or "score", fpr, value)

    def rows(self) -> list[dict[str, Any]]:
        """One row per counter: observed and promised rates with intervals, and the verdict."""
        out = []
        for known in self.counters.values():
            for counter in known.values():
                row = counter.to_dict()
                row["verdict"] = row["verdict"] or ("no decisions" if not counter.n else "consistent")
                out.append(row)
        return sorted(out, key=lambda r: (r["calibration"], r["metric"], r["above_fpr"]))

    @property
    def flagged(self) -> list[dict[str, Any]]:
        return [r for r in self.rows() if r["verdict"] in ("too many", "too few")]


def drift_advice_text(flagged: list[dict[str, Any]]) -> str:
    """What to do about the flagged rows: one sentence per verdict among them (too many first)."""
    verdicts = [v for v in ("too many", "too few") if any(r["verdict"] == v for r in flagged)]
    return " ".join(f"{verdict.capitalize()}: {drift_advice(verdict)}." for verdict in verdicts)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.3g}%"


def drift_text(rows: list[dict[str, Any]], confidence: float = DEFAULT_CONFIDENCE) -> list[str]:
    """Lines for ``memguard audit summary``: one per rule threshold, flagged ones marked."""
    if not rows:
        return ["  no relative thresholds (above_fpr) in the matched records"]
    headers = ["rule", "above_fpr", "calibration", "decisions", "crossed", "observed",
               f"{100 * confidence:g}% interval", "promised", "promised interval", "verdict"]
    table = [[r["rule"] + ("" if r["metric"] == "score" else f" ({r['metric']})"), f"{r['above_fpr']:g}",
              r["calibration"], str(r["decisions"]), str(r["crossed"]), _pct(r["observed"]),
              f"{_pct(r['observed_low'])}-{_pct(r['observed_high'])}" if r["decisions"] else "-",
              _pct(r["promised"]), f"{_pct(r['promised_low'])}-{_pct(r['promised_high'])}",
              ("!! " if r["verdict"] in ("too many", "too few") else "") + r["verdict"]] for r in rows]
    widths = [max(len(x) for x in column) for column in zip(headers, *table)]
    lines = ["  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  " + "  ".join("-" * w for w in widths)]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table]
    bases = sorted({r["promise_basis"].split(":")[0] for r in rows})
    lines.append(f"  promised: {'; '.join(bases)} (see docs/calibration.md); flagged when the intervals do not "
                 "overlap")
    flagged = [r for r in rows if r["verdict"] in ("too many", "too few")]
    if flagged:
        lines.append(f"  {drift_advice_text(flagged)}")
    return lines


def drift_svg(rows: list[dict[str, Any]]) -> str:
    """An inline SVG: per rule, the promised interval (grey band, tick at the expected rate) and the observed
    rate with its interval (dot and bar; red when flagged), on a log scale of rates."""
    shown = [r for r in rows if r["decisions"]]
    if not shown:
        return '<p id="drift-chart-empty">No decisions were judged with a relative threshold.</p>'
    positives = [v for r in shown for v in (r["observed_low"], r["observed_high"], r["promised_low"],
                                            r["promised_high"], r["observed"]) if v and v > 0]
    lo = 10 ** math.floor(math.log10(min(positives + [1e-3]) / 1.5))
    hi = 1.0
    width, left, right, lane, top = 960, 260, 20, 34, 24
    height = top + lane * len(shown) + 34

    def x(v: float | None) -> float:
        v = max(v or 0.0, lo)
        return left + (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (width - left - right)

    parts = [f'<svg id="drift-chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
             f'aria-label="observed versus promised threshold rates">']
    decade = lo
    while decade <= hi * 1.0001:
        gx = x(decade)
        parts.append(f'<line x1="{gx:.1f}" y1="{top - 6}" x2="{gx:.1f}" y2="{height - 28}" stroke="#e1e4e8"/>'
                     f'<text x="{gx:.1f}" y="{height - 12}" text-anchor="middle">{decade:g}</text>')
        decade *= 10
    for i, r in enumerate(shown):
        y = top + lane * i + lane / 2
        flagged = r["verdict"] in ("too many", "too few")
        color = "#c8433c" if flagged else "#2f6f4f"
        label = f'{r["rule"]} (above_fpr {r["above_fpr"]:g})'
        parts.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{html.escape(label)}</text>')
        p0, p1 = x(r["promised_low"]), x(r["promised_high"])
        parts.append(f'<rect class="promised" x="{p0:.1f}" y="{y - 9:.1f}" width="{max(p1 - p0, 2):.1f}" '
                     f'height="18" fill="#d5dae1"><title>promised {_pct(r["promised_low"])} to '
                     f'{_pct(r["promised_high"])}</title></rect>')
        parts.append(f'<line x1="{x(r["promised"]):.1f}" y1="{y - 11:.1f}" x2="{x(r["promised"]):.1f}" '
                     f'y2="{y + 11:.1f}" stroke="#555" stroke-width="2"/>')
        parts.append(f'<line class="observed" x1="{x(r["observed_low"]):.1f}" y1="{y:.1f}" '
                     f'x2="{x(r["observed_high"]):.1f}" y2="{y:.1f}" stroke="{color}" stroke-width="3"/>')
        parts.append(f'<circle class="{"flagged" if flagged else "consistent"}" cx="{x(r["observed"]):.1f}" '
                     f'cy="{y:.1f}" r="5" fill="{color}"><title>observed {r["crossed"]} of {r["decisions"]} '
                     f'({_pct(r["observed"])}): {html.escape(r["verdict"])}</title></circle>')
    parts.append(f'<text x="{(left + width) / 2:.0f}" y="{height - 1}" text-anchor="middle">share of decisions '
                 "above the threshold (log scale)</text></svg>")
    legend = ('<div class="legend"><span><i style="background:#d5dae1"></i>promised interval (tick: expected)'
              '</span><span><i style="background:#2f6f4f"></i>observed, consistent</span>'
              '<span><i style="background:#c8433c"></i>observed, flagged</span></div>')
    return "".join(parts) + legend
