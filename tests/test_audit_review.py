"""``memguard audit summary`` and ``audit report`` on real logs; the report is rendered in headless Chromium."""

import importlib.util
import json
import shutil
import statistics
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from click.testing import CliRunner

from guard.audit import AuditLog, AuditLogger
from guard.audit.review import AuditFilter, ScoreSample, parse_time, summarize
from guard.cli import main
from guard.policy import decide, decide_on_error, load_policy
from guard.scoring.result import MemorizationScore

EVIL = "<script>alert('x')</script> & \"quoted\""
START = datetime(2024, 5, 1, tzinfo=timezone.utc)


def _policy(name, prompt_mode):
    return load_policy({
        "name": name,
        "rules": [
            {"name": "block-high", "when": {"score": {"gte": 3.0}}, "action": "block"},
            {"name": "rewrite-mid", "when": {"score": {"gte": 2.5}}, "action": "rewrite",
             "rewrite": {"target": {"score": 1.5}}},
            {"name": "warn-low", "when": {"score": {"gte": 2.0}}, "action": "warn"},
        ],
        "audit": {"prompt": prompt_mode},
    })


def _score(value):
    return MemorizationScore(norm=value - 0.4, cos=0.2, score=value, g_norm=1.0, g_cos=2.0, profile="sd1", t_hi=981,
                             t_lo=41, samples=1, seed=51, prediction_space="eps")


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    """123 requests every 30 minutes from 2024-05-01 (two policies; 3 errors), as the guard writes them: a
    decision record, then an outcome record (the last decision never gets one: the process 'died')."""
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    policies = {"alpha": _policy("alpha", "plain"), "beta": _policy("beta", "hash")}
    expected = {"actions": {}, "scores": [], "alpha": 0}
    with AuditLog(path) as sink:
        loggers = {name: AuditLogger(sink, prompt_mode=p.audit.prompt, context={"policy": {
            "name": p.name, "version": p.version, "hash": p.content_hash}}) for name, p in policies.items()}
        for i in range(123):
            name = "alpha" if i % 3 else "beta"
            policy, logger = policies[name], loggers[name]
            expected["alpha"] += name == "alpha"
            when = (START + timedelta(minutes=30 * i)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            prompt = EVIL if i == 34 else f"prompt {i}"
            extras = {}
            if i >= 120:
                decision = decide_on_error(policy, 0, "RuntimeError: scorer crashed")
                outcome = "blocked"
            else:
                value = 1.0 + (i % 40) * 0.06  # 1.0 .. 3.34
                decision = decide(policy, _score(value), prompt)
                expected["scores"].append(round(value, 10))
                outcome = {"block": "blocked", "rewrite": "rewritten"}.get(decision.action, "generated")
                if decision.action == "rewrite":
                    extras = {"mitigation": {"score_after": 1.4}}
            expected["actions"][decision.action] = expected["actions"].get(decision.action, 0) + 1
            written = logger.log_decision(decision, prompt=prompt, outcome="pending", request_id=f"r{i}",
                                          timestamp=when)
            if i < 122:
                logger.log_outcome(request_id=f"r{i}", prompt_index=0, action=decision.action, outcome=outcome,
                                   decision_record=written, timestamp=when, extras=extras)
    return path, expected


def test_counts_quantiles_and_errors(log):
    path, expected = log
    summary = summarize(path)
    data = summary.to_dict()
    assert data["records"] == data["matched"] == 245 and data["unreadable_lines"] == 0
    assert data["decisions"] == 123 and data["outcomes"]["generated"] > 0
    assert {a: n for a, n in data["actions"].items() if n} == expected["actions"]
    rules = {(r["rule"], r["action"]): r["count"] for r in data["rules"]}
    assert rules[("on_error", "block")] == 3
    assert sum(rules.values()) == 123
    assert data["errors"]["count"] == 3 and data["errors"]["by_type"] == {"DecisionError": 3}
    assert data["without_outcome"]["count"] == 1 and data["without_outcome"]["recent"][0]["request_id"] == "r122"
    scores = data["scores"]
    assert scores["exact"] and scores["count"] == 120
    assert scores["quantiles"]["p50"] == pytest.approx(statistics.median(expected["scores"]))
    assert scores["quantiles"]["p100"] == pytest.approx(max(expected["scores"]))
    assert {(t["rule"], t["op"], t["value"]) for t in data["thresholds"]} == {
        ("block-high", ">=", 3.0), ("rewrite-mid", ">=", 2.5), ("warn-low", ">=", 2.0)}
    assert sum(t["total"] for t in data["timeline"]) == 123
    assert data["timeline"][0]["bucket"] == "2024-05-01T00:00Z"  # 61.5 hours: hourly
    assert sum(t["error"] for t in data["timeline"]) == 3
    flagged = data["flagged_recent"]
    assert len(flagged) == expected["actions"]["block"] + expected["actions"]["rewrite"]
    assert any(f["score_after"] == 1.4 and f["outcome"] == "rewritten" for f in flagged)


def test_filters(log):
    path, expected = log
    assert summarize(path, AuditFilter(policies=frozenset({"alpha"}))).decisions == expected["alpha"]
    blocked = summarize(path, AuditFilter(actions=frozenset({"block"})))
    assert blocked.decisions == expected["actions"]["block"] and set(blocked.actions) == {"block"}
    window = AuditFilter(since=parse_time("2024-05-01T10:00"), until=parse_time("2024-05-01T12:00Z"))
    assert summarize(path, window).decisions == 4  # 10:00, 10:30, 11:00, 11:30
    assert parse_time("2024-05-01T12:00+02:00") == parse_time("2024-05-01T10:00Z")
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_time("yesterday")


def test_reservoir_keeps_memory_bounded_and_quantiles_close():
    sample = ScoreSample(capacity=2000, seed=1)
    for i in range(50_000):
        sample.add(i / 50_000)
    assert len(sample.values) == 2000 and not sample.exact
    q = sample.quantiles()
    assert q["p0"] == 0.0 and q["p100"] == pytest.approx(49_999 / 50_000)
    for name, target in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        assert q[name] == pytest.approx(target, abs=0.03)
    edges, counts = sample.histogram(10)
    assert len(edges) == 11 and sum(counts) == pytest.approx(50_000)


def test_unreadable_lines_are_counted(tmp_path, log):
    path = tmp_path / "damaged.jsonl"
    path.write_bytes(log[0].read_bytes() + b"garbage\n[1]\n")
    summary = summarize(path)
    assert summary.unreadable == 2 and summary.decisions == 123


def test_summary_cli_text_and_json(log):
    path, expected = log
    text = CliRunner().invoke(main, ["audit", "summary", str(path)])
    assert text.exit_code == 0, text.output
    for heading in ("actions", "rules", "scores (120 scored; quantiles exact)", "blocked / rewritten over time",
                    "errors: 3", "DecisionError", "1 decision(s) without an outcome record"):
        assert heading in text.output
    filtered = CliRunner().invoke(main, ["audit", "summary", str(path), "--json", "--policy", "alpha",
                                         "--action", "block", "--action", "rewrite", "--bucket", "day"])
    assert filtered.exit_code == 0, filtered.output
    data = json.loads(filtered.output)
    assert data["filter"] == "action in block, rewrite; policy in alpha"
    assert set(data["actions"]) >= {"block", "rewrite"} and data["actions"]["allow"] == 0
    assert [t["bucket"] for t in data["timeline"]] == ["2024-05-01", "2024-05-02", "2024-05-03"]


def test_summary_cli_errors_are_one_line(tmp_path):
    missing = CliRunner().invoke(main, ["audit", "summary", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code == 1 and missing.output.strip().count("\n") == 0 and "cannot read" in missing.output
    (tmp_path / "log.jsonl").write_text("")
    bad_time = CliRunner().invoke(main, ["audit", "summary", str(tmp_path / "log.jsonl"), "--since", "soon"])
    assert bad_time.exit_code == 2 and "ISO 8601" in bad_time.output
    for command in (["audit", "summary", "--help"], ["audit", "report", "--help"]):
        help_text = CliRunner().invoke(main, command).output
        assert all(option in help_text for option in ("--since", "--until", "--action", "--policy"))


def _report(log_path, out):
    result = CliRunner().invoke(main, ["audit", "report", str(log_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out.read_text(encoding="utf-8")


def test_report_is_self_contained_and_escaped(log, tmp_path):
    page = _report(log[0], tmp_path / "report.html")
    assert "<script" not in page and "http://" not in page and "https://" not in page and "<link" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in page
    assert "Hash chain intact: 245 records" in page
    assert 'id="without-outcome-table"' in page and "r122" in page
    assert '<p id="drift-status">No relative thresholds (above_fpr) in these records.</p>' in page


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _dump_dom(browser: str, page: Path, profile: Path) -> str:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()]
    done = subprocess.run([browser, *flags], capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_report_renders_in_headless_chromium(log, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (CI installs it via .ci/system-deps; locally: apt-get install chromium)")
    path, expected = log
    page = tmp_path / "report.html"
    _report(path, page)
    dom = _dump_dom(browser, page, tmp_path / "chromium-profile")
    assert "<title>memguard audit report: audit.jsonl</title>" in dom
    assert 'id="chain-status" class="status ok"' in dom and "Hash chain intact: 245 records" in dom
    assert '<svg id="score-histogram"' in dom and dom.count('class="threshold"') == 3
    assert "block-high &gt;= 3" in dom and '<svg id="decisions-over-time"' in dom
    table = dom.split('id="flagged-table"', 1)[1].split("</table>", 1)[0]
    assert table.count("<tr>") == 1 + expected["actions"]["block"] + expected["actions"]["rewrite"]
    assert "&lt;script&gt;alert('x')&lt;/script&gt;" in dom and "<script>alert" not in dom
    assert 'id="errors-table"' in dom and "DecisionError: RuntimeError: scorer crashed" in dom
    assert "No relative thresholds (above_fpr) in these records." in dom  # absolute thresholds only: no drift

    tampered = tmp_path / "tampered.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[5] = lines[5].replace('"outcome":"generated"', '"outcome":"blocked"').replace(
        '"outcome":"rewritten"', '"outcome":"blocked"').replace('"outcome":"pending"', '"outcome":"checked"')
    tampered.write_text("".join(lines), encoding="utf-8")
    _report(tampered, tmp_path / "tampered.html")
    dom = _dump_dom(browser, tmp_path / "tampered.html", tmp_path / "chromium-profile")
    assert 'class="status bad"' in dom and "BROKEN at line 6" in dom


def test_benchmark_generator_writes_a_valid_log(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "audit_summary_bench", Path(__file__).resolve().parents[1] / "benchmarks" / "audit_summary.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    path = bench.write_synthetic_log(tmp_path / "bench.jsonl", 500)
    from guard.audit import verify_log

    assert verify_log(path).ok
    summary = summarize(path)
    assert summary.decisions == 500 and summary.actions["allow"] > 400 and summary.error_count > 0
