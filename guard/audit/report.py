"""A self-contained HTML report of an audit log or trail (``memguard audit report``).

One file: inline CSS and inline SVG charts, no scripts and no network resources, so it can be mailed,
archived next to the log, and opened offline. Every string from the log is HTML-escaped.
"""

from __future__ import annotations

import html
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .drift import drift_advice_text, drift_svg
from .review import ACTIONS, AuditSummary
from .trail_verify import TrailReport
from .verify import VerifyReport

__all__ = ["render_html", "write_report"]

_COLORS = {"allow": "#4c9f70", "warn": "#e0a526", "rewrite": "#4a7fc1", "block": "#c8433c", "error": "#7a4bb0"}
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f5f6f8;color:#1d232b}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.meta{color:#5b6573;font-size:13px}
section{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:14px 18px;margin:14px 0}
.status{font-weight:600;padding:10px 14px;border-radius:6px}
.ok{background:#e5f4ea;color:#1d6b3c;border:1px solid #a9d8b8}
.bad{background:#fbe7e6;color:#8c1d17;border:1px solid #eab1ad}
.warn{background:#fff6e0;color:#7a5300;border:1px solid #f0d48a}
.cards{display:flex;gap:12px;flex-wrap:wrap}
.card{flex:1;min-width:120px;border-radius:6px;padding:10px 12px;background:#f7f8fa;border-left:5px solid #999}
.card b{display:block;font-size:22px}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #e6e9ed;vertical-align:top}
th{background:#f0f2f5} #score-quantiles th,td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;word-break:break-all}
svg text{font:11px system-ui,sans-serif;fill:#333}
.legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:11px;height:11px;margin-right:4px}
td.explained mark{padding:0 2px;border-radius:3px;color:inherit}
"""


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value), quote=True)


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else _e(value)


def _histogram_svg(summary: AuditSummary, thresholds: list[dict[str, Any]]) -> str:
    edges, counts = summary.scores.histogram(40)
    if not counts:
        return "<p>No scored records.</p>"
    width, height, left, bottom, top = 960, 280, 50, 36, 14
    lo = min([edges[0]] + [t["value"] for t in thresholds])
    hi = max([edges[-1]] + [t["value"] for t in thresholds])
    span = (hi - lo) or 1.0
    peak = max(counts) or 1.0

    def x(v: float) -> float:
        return left + (v - lo) / span * (width - left - 30)

    def y(c: float) -> float:
        return height - bottom - c / peak * (height - bottom - top)

    parts = [f'<svg id="score-histogram" viewBox="0 0 {width} {height}" width="100%" role="img" '
             f'aria-label="score histogram">']
    for i, count in enumerate(counts):
        x0, x1 = x(edges[i]), x(edges[i + 1])
        parts.append(f'<rect x="{x0:.1f}" y="{y(count):.1f}" width="{max(x1 - x0 - 1, 0.5):.1f}" '
                     f'height="{height - bottom - y(count):.1f}" fill="#7f9cc4"><title>{edges[i]:.4g} to '
                     f'{edges[i + 1]:.4g}: {count:.0f}</title></rect>')
    axis_y = height - bottom
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{width - 10}" y2="{axis_y}" stroke="#555"/>')
    for k in range(6):
        v = lo + span * k / 5
        parts.append(f'<text x="{x(v):.1f}" y="{axis_y + 16}" text-anchor="middle">{v:.3g}</text>')
    parts.append(f'<text x="{left - 6}" y="{top + 8}" text-anchor="end">{peak:.0f}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 4}" text-anchor="middle">score</text>')
    for i, t in enumerate(thresholds):
        tx = x(t["value"])
        label = f'{t["rule"]} {t["op"]} {t["value"]:.4g}'
        parts.append(f'<line class="threshold" x1="{tx:.1f}" y1="{top}" x2="{tx:.1f}" y2="{axis_y}" '
                     f'stroke="#c8433c" stroke-dasharray="5,3"/>'
                     f'<text class="threshold-label" x="{tx + 3:.1f}" y="{top + 10 + 12 * i}">{_e(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _timeline_svg(timeline: list[dict[str, Any]], actions: tuple[str, ...], svg_id: str, height: int = 260) -> str:
    if not timeline:
        return "<p>No records.</p>"
    width, left, bottom, top = 960, 50, 40, 10
    peak = max(sum(t[a] for a in actions) for t in timeline) or 1
    step = (width - left - 10) / len(timeline)
    parts = [f'<svg id="{svg_id}" viewBox="0 0 {width} {height}" width="100%" role="img" '
             f'aria-label="{svg_id.replace("-", " ")}">']
    scale = (height - bottom - top) / peak
    for i, t in enumerate(timeline):
        base = height - bottom
        for action in actions:
            h = t[action] * scale
            if h <= 0:
                continue
            base -= h
            parts.append(f'<rect x="{left + i * step:.1f}" y="{base:.1f}" width="{max(step - 1, 0.5):.1f}" '
                         f'height="{h:.1f}" fill="{_COLORS[action]}"><title>{_e(t["bucket"])} {action}: '
                         f'{t[action]}</title></rect>')
    axis_y = height - bottom
    parts.append(f'<line x1="{left}" y1="{axis_y}" x2="{width - 10}" y2="{axis_y}" stroke="#555"/>')
    parts.append(f'<text x="{left - 6}" y="{top + 8}" text-anchor="end">{peak}</text>')
    for i in sorted({0, len(timeline) // 2, len(timeline) - 1}):
        parts.append(f'<text x="{left + (i + 0.5) * step:.1f}" y="{axis_y + 16}" text-anchor="middle">'
                     f'{_e(timeline[i]["bucket"])}</text>')
    parts.append("</svg>")
    legend = "".join(f'<span><i style="background:{_COLORS[a]}"></i>{a}</span>' for a in actions)
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def _table(table_id: str, headers: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return f'<p id="{table_id}-empty">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(rows_cell for rows_cell in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _td(value: Any, numeric: bool = False) -> str:
    return f'<td class="num">{_num(value)}</td>' if numeric else f"<td>{_e(value)}</td>"


def _prompt_cell(item: dict[str, Any]) -> str:
    mode, prompt = item.get("prompt_mode"), item.get("prompt")
    if mode == "plain":
        highlighted = _highlighted(prompt, item.get("explanation"))
        if highlighted is not None:
            return f'<td class="explained">{highlighted}</td>'
        return f"<td>{_e(prompt)}</td>"
    if mode == "hash" and prompt:
        return f'<td><code title="SHA-256 of the prompt">{_e(str(prompt)[:16])}…</code></td>'
    return f"<td><i>{_e(prompt or mode)}</i></td>"


def _highlighted(prompt: Any, explanation: Any) -> str | None:
    """The plain prompt with its words highlighted by the decision's explanation weights (escaped); None when the
    record has no usable explanation."""
    if not isinstance(prompt, str) or not isinstance(explanation, dict):
        return None
    from ..scoring import Explanation

    try:
        parsed = Explanation.model_validate(explanation)
    except ValueError:
        return None
    top = ", ".join(f"{_e(prompt[w.start:w.end])} {w.weight:+.3g}" for w in parsed.top(3))
    return (f'{parsed.html(prompt)}<div class="meta">words driving the score ({_e(parsed.method)}): '
            f"{top}</div>")


def _trail_section(summary: AuditSummary, verify: VerifyReport | TrailReport | None) -> str:
    """Per writer: its segment, records, time span and (verified) chain and signature state; then the problems."""
    if summary.segments <= 1 and not summary.trail:
        return ""
    states = {s.writer: s for s in verify.segments} if isinstance(verify, TrailReport) else {}
    rows = []
    for writer, tally in sorted(summary.writers.items()):
        state = states.get(writer)
        if state is None:
            verdict = "not verified"
        elif not state.report.ok:
            verdict = f"FAILED at line {state.report.first_bad_line}: {state.report.reason}"
        else:
            verdict = (f"intact, {state.report.checkpoints} checkpoint(s), {state.report.unsigned_tail} after the "
                       f"last, {'closed' if state.report.closed else 'open'}")
        rows.append([_td(writer), _td(Path(tally.segment).name), _td(tally.records, True), _td(tally.decisions, True),
                     _td(tally.first), _td(tally.last), _td(verdict)])
    problems = ""
    if isinstance(verify, TrailReport) and verify.problems:
        problems = '<ul id="trail-problems">' + "".join(f"<li>{_e(p)}</li>" for p in verify.problems) + "</ul>"
    headers = ["writer", "segment", "records", "decisions", "first", "last", "chain"]
    return f'<h2>Writers</h2>{_table("writers", headers, rows, "No records.")}{problems}'


def render_html(summary: AuditSummary, verify: VerifyReport | TrailReport | None, *, bucket: str = "auto") -> str:
    """The report as one HTML document (no scripts, no external resources)."""
    data = summary.to_dict(bucket)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    if verify is None:
        chain = '<div id="chain-status" class="status bad">Chain not verified.</div>'
    elif isinstance(verify, TrailReport):
        state = "ok" if verify.ok else "bad"
        text = verify.headline() if verify.ok else f"Trail BROKEN: {verify.one_line()}"
        chain = f'<div id="chain-status" class="status {state}">{_e(text)}</div>'
    elif verify.ok:
        chain = (f'<div id="chain-status" class="status ok">Hash chain intact: {verify.n_records} records '
                 f'verified.</div>')
    else:
        chain = (f'<div id="chain-status" class="status bad">Hash chain BROKEN at line {verify.first_bad_line}: '
                 f'{_e(verify.reason)} ({verify.n_records} records verified before it).</div>')
    signed = verify is not None and verify.ok and verify.key_checked
    chain += (f'<div id="signature-status" class="status {"ok" if signed else "warn"}" style="margin-top:8px">'
              f'{_e(summary.signing.line(verify))}</div>')
    total = sum(data["actions"].values())
    cards = "".join(
        f'<div class="card" style="border-left-color:{_COLORS[a]}" id="count-{a}">{a}<b>{data["actions"][a]}</b>'
        f'{100 * data["actions"][a] / max(total, 1):.1f}%</div>' for a in ACTIONS)
    cards += (f'<div class="card" style="border-left-color:{_COLORS["error"]}" id="count-error">errors'
              f'<b>{data["errors"]["count"]}</b></div>')
    scores = data["scores"]
    quant = scores["quantiles"]
    how = "exact" if scores["exact"] else f"estimated from a {summary.scores.capacity}-score uniform sample"
    quant_table = _table("score-quantiles", list(quant), [[_td(v, True) for v in quant.values()]] if quant else [],
                         "No scored records.")
    thresholds = data["thresholds"]
    threshold_rows = [[_td(t["rule"]), _td(t["op"]), _td(t["value"], True), _td(t["above_fpr"], True),
                       _td(t["count"], True)] for t in thresholds]
    rules = [[_td(r["rule"]), _td(r["action"]), _td(r["count"], True)] for r in data["rules"]]
    flagged = [[_td(f["timestamp"]), _td(f["policy"]), _td(f["rule"]), _td(f["action"]), _td(f["outcome"]),
                _td(f["score"], True), _td(f["score_after"], True), _prompt_cell(f), _td(f["reason"])]
               for f in reversed(data["flagged_recent"])]
    n_flagged = data["actions"]["block"] + data["actions"]["rewrite"]
    shown = f"the {len(flagged)} most recent of {n_flagged}" if n_flagged > len(flagged) else f"all {n_flagged}"
    errors = [[_td(e["timestamp"]), _td(e["policy"]), _td(e["action"]), _td(e["error"])]
              for e in reversed(data["errors"]["recent"])]
    error_types = ", ".join(f"{_e(k)}: {v}" for k, v in data["errors"]["by_type"].items()) or "none"
    warning = (f'<p class="status bad">{data["unreadable_lines"]} unreadable line(s) skipped.</p>'
               if data["unreadable_lines"] else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>memguard audit report: {_e(Path(summary.path).name)}</title>
<style>{_CSS}</style></head>
<body><main>
<h1>memguard audit report</h1>
<div class="meta"><code>{_e(summary.path)}</code> · generated {generated} · {total} of {data["records"]} records
({_e(data["filter"])}) · {_e(data["first"])} to {_e(data["last"])}</div>
<section id="chain"><h2>Chain verification</h2>{chain}{warning}{_trail_section(summary, verify)}</section>
<section id="decisions"><h2>Decisions</h2><div class="cards">{cards}</div>
<h2>Rules</h2>{_table("rules", ["rule", "action", "count"], rules, "No records.")}
<h2>Rewrites</h2><p class="meta">A rewrite is released only when its generation passed verification; otherwise
its rule's fallback applied.</p>
{_table("rewrites", ["result", "count"], [[_td(k), _td(v, True)] for k, v in data["rewrites"].items()],
        "No rewrites.")}</section>
<section id="scores"><h2>Score distribution</h2>{_histogram_svg(summary, thresholds)}
<p class="meta">{scores["count"]} scored records; quantiles {how}. Dashed lines: the score thresholds the
policies applied (from the records' decisions).</p>{quant_table}
{_table("thresholds", ["rule", "op", "value", "above_fpr", "decisions"], threshold_rows, "No thresholds recorded.")}
</section>
{_drift_section(data)}
<section id="timeline"><h2>Decisions over time</h2>
{_timeline_svg(data["timeline"], ACTIONS, "decisions-over-time")}
<h2>Blocked and rewritten over time</h2>
{_timeline_svg(data["timeline"], ("rewrite", "block"), "flagged-over-time", 200)}</section>
<section id="flagged"><h2>Blocked and rewritten requests</h2><p class="meta">Showing {shown}, most recent first.
Prompts are shown as the log stores them (hashed unless the policy logged them plain); where a decision carries an
explanation and the prompt is plain, its words are highlighted by weight (red raises the score, blue lowers it).</p>
{_table("flagged-table", ["time", "policy", "rule", "action", "outcome", "score", "score after", "prompt", "reason"],
        flagged, "No blocked or rewritten requests.")}</section>
<section id="without-outcome"><h2>Decisions without an outcome</h2>
<p class="meta">Decisions are written before the guard acts on them; an outcome record follows. These never got
one (the process stopped in between, or the log could not be written).</p>
{_table("without-outcome-table", ["time", "request", "prompt index", "rule", "action"],
        [[_td(m["timestamp"]), _td(m["request_id"]), _td(m.get("prompt_index")), _td(m["rule"]), _td(m["action"])]
         for m in data["without_outcome"]["recent"]], "Every decision has its outcome.")}</section>
<section id="errors"><h2>Errors</h2><p>{data["errors"]["count"]} error(s); by type: {error_types}</p>
{_table("errors-table", ["time", "policy", "action taken", "error"], errors, "No errors.")}</section>
</main></body></html>
"""


def _drift_section(data: dict[str, Any]) -> str:
    """Observed vs promised rate per relative threshold: chart, table and the guard's calibration findings."""
    drift = data["drift"]
    if not drift["computed"]:
        return ('<section id="drift"><h2>Do the thresholds hold?</h2><p>Not computed with an action filter: it '
                "needs every decision judged with a calibration.</p></section>")
    rows = drift["rows"]
    flagged = [r for r in rows if r["verdict"] in ("too many", "too few")]
    status = (f'<div id="drift-status" class="status bad">{len(flagged)} rule(s) cross their threshold at a rate '
              f"the calibration did not promise. {_e(drift_advice_text(flagged))}</div>" if flagged else
              '<div id="drift-status" class="status ok">Every relative threshold holds its promised rate.</div>'
              if rows else '<p id="drift-status">No relative thresholds (above_fpr) in these records.</p>')
    table = _table("drift-table", ["rule", "metric", "above_fpr", "calibration", "decisions", "crossed", "observed",
                                   "observed interval", "promised", "promised interval", "verdict"],
                   [[_td(r["rule"]), _td(r["metric"]), _td(r["above_fpr"], True), _td(r["calibration"]),
                     _td(r["decisions"], True), _td(r["crossed"], True), _td(r["observed"], True),
                     _td(f'{_num(r["observed_low"])} to {_num(r["observed_high"])}'), _td(r["promised"], True),
                     _td(f'{_num(r["promised_low"])} to {_num(r["promised_high"])}'), _td(r["verdict"])]
                    for r in rows], "No relative thresholds in these records.")
    findings = _table("calibration-findings", ["time", "event", "check", "calibration", "message"],
                      [[_td(f["timestamp"]), _td(f["event"]), _td(f["check"]), _td(f["calibration"]),
                        _td(f["message"])] for f in reversed(data["calibration_findings"])],
                      "The guard recorded no calibration findings.")
    how = ("Observed: decisions judged with the calibration whose value crossed the threshold, with a Wilson "
           f"interval; promised: the rate the calibration's own scores imply, with its sampling error "
           f"({100 * drift['confidence']:g}% intervals). Flagged when the intervals do not overlap.")
    return (f'<section id="drift"><h2>Do the thresholds hold?</h2>{status}{drift_svg(rows) if rows else ""}'
            f'<p class="meta">{_e(how)}</p>{table}<h2>Calibration findings</h2>{findings}</section>')


def write_report(summary: AuditSummary, verify: VerifyReport | TrailReport | None, out: str | os.PathLike[str], *,
                 bucket: str = "auto") -> Path:
    """Write the report, creating its folder; returns its path."""
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_html(summary, verify, bucket=bucket), encoding="utf-8")
    return target
