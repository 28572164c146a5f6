"""Does a calibration fit its traffic? Fit checks, live drift alarms, drift in audit summary/report, /metrics."""

from __future__ import annotations

import json
import logging
import random
import warnings

import pytest

from guard.audit import AuditLog, AuditLogger
from guard.audit.review import AuditFilter, render_text, summarize
from guard.calibration import CalibrationProfile
from guard.calibration.checks import (
    body_fence,
    caption_fit,
    distribution_fit,
    ks_two_sample,
    promise_interval,
    threshold_fit,
    wilson_interval,
)
from guard.monitor import CalibrationMonitor, relative_thresholds
from guard.policy import decide, load_policy
from guard.scoring.result import MemorizationScore
from guard.testing import DEFAULT_WORDS, build_word_tokenizer

RULES = [
    {"name": "block-top", "when": {"score": {"above_fpr": 0.01}}, "action": "block"},
    {"name": "warn-top", "when": {"score": {"above_fpr": 0.05}}, "action": "warn"},
]


def _policy(**overrides):
    return load_policy({"name": "drift", "calibration": "off", "rules": RULES, "audit": {"prompt": "hash"},
                        **overrides})


def _score(value: float) -> MemorizationScore:
    return MemorizationScore(norm=value - 0.4, cos=0.2, score=value, g_norm=1.0, g_cos=2.0, profile="sd1", t_hi=981,
                             t_lo=41, samples=1, seed=51, prediction_space="eps")


def _profile(scores) -> CalibrationProfile:
    return CalibrationProfile.from_scores(scores, fingerprint="f" * 16, model_class="StableDiffusionPipeline",
                                          profile="sd1", g_norm=1.0, g_cos=2.0, seed=51, samples=1, steps=50,
                                          prediction_space="eps", source="test")


def _normal(n: int, mean: float, seed: int, sd: float = 0.3) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(mean, sd) for _ in range(n)]


# ---------------------------------------------------------------- statistics


def test_wilson_and_promise_intervals_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 50), (3, 1000), (40, 200), (200, 200)):
        low, high = wilson_interval(k, n, 0.95)
        ref = stats.binomtest(k, n).proportion_ci(0.95, method="wilson")
        assert (low, high) == pytest.approx((ref.low, ref.high), abs=1e-9)
    for exceeded, n in ((0, 500), (1, 1000), (20, 1000), (5, 40)):
        expected, low, high = promise_interval(exceeded, n, 0.99)
        assert expected == pytest.approx((exceeded + 1) / (n + 1))
        assert low == pytest.approx(stats.beta.ppf(0.005, exceeded + 1, n - exceeded), rel=1e-6, abs=1e-12)
        assert high == pytest.approx(stats.beta.ppf(0.995, exceeded + 1, n - exceeded), rel=1e-6)


def test_ks_statistic_matches_scipy_and_separates_shifted_samples():
    stats = pytest.importorskip("scipy.stats")
    a, same, shifted = _normal(300, 2.0, 1), _normal(900, 2.0, 2), _normal(900, 2.3, 3)
    for other in (same, shifted):
        d, p = ks_two_sample(a, other)
        ref = stats.ks_2samp(a, other, method="asymp")
        assert d == pytest.approx(ref.statistic)
        assert p == pytest.approx(ref.pvalue, rel=0.2, abs=1e-3)
    assert ks_two_sample(a, same)[1] > 0.01 and ks_two_sample(a, shifted)[1] < 1e-6
    described = distribution_fit(a, shifted).describe()
    assert "score above the calibration's median" in described and "KS distance" in described


def _relative(calibration, fprs=(0.01, 0.05)):
    """What ``relative_thresholds`` gives for rules at ``fprs`` on these calibration scores."""
    profile = _profile(calibration)
    out = []
    for fpr in fprs:
        value = profile.threshold_at_fpr(fpr)
        out.append({"rule": f"top-{fpr:g}", "metric": "score", "above_fpr": fpr, "value": value,
                    "exceeded": sum(v > value for v in profile.scores), "n": profile.n_prompts})
    return out


def test_body_fence_ignores_a_far_tenth_and_catches_a_near_group():
    body = _normal(1000, 2.0, 70)
    clean = body_fence(body)
    assert clean.value is not None and clean.excluded <= 10  # a normal body loses about 0.4% to the fence
    far = body + _normal(110, 6.0, 71)  # 10% far above: the P90 of all values lies among them
    fenced = body_fence(far)
    assert fenced.value == pytest.approx(clean.value, rel=0.02) and fenced.excluded >= 110
    assert max(body) < 2.0 + 6 * 0.3 < min(_normal(110, 6.0, 71))
    # a short-tailed body (uniform on [1, 3]: median + 4 (P75 - median) = 4) with a group just above its end:
    # the tail term (P95 + 1.5 (P95 - P75) = 3.5) binds and catches it
    rng = random.Random(72)
    short = [rng.uniform(1.0, 3.0) for _ in range(1000)]
    near = [rng.uniform(3.6, 3.9) for _ in range(30)]
    tight = body_fence(short + near)
    assert tight.bound == "tail" and 3.0 <= tight.value < 3.6 and tight.excluded == 30
    assert body_fence(short + near, tail=None).excluded == 0
    assert body_fence([2.0] * 50 + [9.0]).value is None  # no spread: no fence rather than a wrong one
    assert body_fence([1.0, 2.0, 3.0]).value is None


def test_threshold_fit_judges_the_thresholds_not_the_body():
    calibration = _normal(1000, 2.0, 80)
    relative = _relative(calibration)
    # a narrower body, shifted up: a KS test on 200 requests calls it different (the old check fired on p)...
    narrower = _normal(200, 2.1, 100, sd=0.2)
    fit = threshold_fit({"score": narrower}, relative, calibration)
    assert fit.distribution is not None and fit.distribution.p_value < 1e-4
    assert fit.problem is None and all(c.verdict is None for c in fit.checks)  # ...but every threshold holds
    # a few memorized prompts among the first requests are what a guard is for, not a misfit
    with_memorized = _normal(190, 2.0, 81) + _normal(10, 6.0, 82)
    fit = threshold_fit({"score": with_memorized}, relative, calibration)
    assert fit.problem is None and 180 <= fit.counted <= 190  # the 10 far above, and a few of the tail
    # memorized prompts just above the strictest threshold, below the fence: an excess in the far tail only
    strictest = relative[0]["value"]
    near = _normal(190, 2.0, 86) + [strictest + 0.003 * i for i in range(1, 11)]
    fit = threshold_fit({"score": near}, relative, calibration)
    assert fit.checks[0].verdict == "too many" and fit.checks[1].verdict is None
    assert fit.problem is None and [c.rule for c in fit.tail_only] == ["top-0.01"]
    # traffic whose tail crosses the thresholds far more often than promised
    shifted = _normal(200, 2.4, 83)
    fit = threshold_fit({"score": shifted}, relative, calibration)
    assert [c.verdict for c in fit.checks] == ["too many", "too many"]
    assert "top-0.01 (score > " in fit.problem and "too many" in fit.problem and "KS distance" in fit.problem
    lower = _normal(200, 1.2, 84)
    fit = threshold_fit({"score": lower}, relative, calibration)
    assert fit.checks[1].verdict == "too few" and "memorized prompts may pass" in fit.problem
    assert threshold_fit({"score": shifted}, [], calibration).problem is None  # no relative threshold: nothing


# ---------------------------------------------------------------- caption fit


class _Pipe:
    def __init__(self, **tokenizers):
        self.__dict__.update(tokenizers)


def test_caption_fit_counts_unknown_tokens_per_tokenizer():
    captions = ["a red cat on the beach", "a zebra in a spaceship", "the old house"]
    known = build_word_tokenizer()
    everything = build_word_tokenizer(list(DEFAULT_WORDS) + ["zebra", "spaceship"])
    fit = caption_fit(_Pipe(tokenizer=known, tokenizer_2=everything), captions)
    first, second = fit.tokenizers
    assert (first.name, first.tokens, first.unknown) == ("tokenizer", 14, 2) and second.unknown == 0
    assert fit.worst is first and fit.problem is not None and "14.3% of the generic captions' tokens" in fit.problem
    assert caption_fit(_Pipe(tokenizer=everything), captions).problem is None
    assert caption_fit(_Pipe(), captions).tokenizers == ()


def test_caption_fit_counts_byte_fallback_pieces():
    class ByteFallback:  # a SentencePiece tokenizer with byte fallback, reduced to what caption_fit uses
        unk_token_id = 0
        all_special_ids = [0, 1]
        pieces = {2: "▁a", 3: "<0xE2>", 4: "<0x98>", 5: "▁cat"}

        def __call__(self, texts, **kwargs):
            class Out:
                input_ids = [[2, 3, 4, 5, 1] for _ in texts]
            return Out()

        def convert_ids_to_tokens(self, ids):
            return [self.pieces[i] for i in ids]

    fit = caption_fit(_Pipe(tokenizer_3=ByteFallback()), ["a ☘ cat"] * 4)
    (only,) = fit.tokenizers
    assert (only.name, only.tokens, only.unknown, only.byte_fallback) == ("tokenizer_3", 16, 0, 8)
    assert only.share == 0.5 and fit.problem is not None


@pytest.fixture(scope="module")
def auto_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("memguard-cache")


@pytest.fixture(autouse=True)
def fewer_captions(monkeypatch):
    """The first 200 generic captions stand in for all 1000, so the automatic calibration takes seconds."""
    import guard.calibration.making
    import guard.data

    some = guard.data.generic_captions()[:200]
    monkeypatch.setattr(guard.calibration.making, "generic_captions", lambda: list(some))
    monkeypatch.setattr(guard.data, "generic_captions", lambda: list(some))


def test_auto_calibration_on_a_tiny_vocabulary_warns_logs_and_records(auto_cache, tmp_path, monkeypatch, caplog):
    """A tiny random pipeline whose 100-word vocabulary misses most generic-caption words."""
    from guard import Guard
    from guard.testing import tiny_sd_pipeline

    monkeypatch.setenv("MEMGUARD_CACHE_DIR", str(auto_cache))
    log = tmp_path / "a.jsonl"
    with caplog.at_level(logging.WARNING, logger="memguard"), pytest.warns(RuntimeWarning) as caught:
        guard = Guard(tiny_sd_pipeline(), _policy(calibration="auto"), audit_path=log)
        report = guard.check("a red cat on the beach")
    message = next(str(w.message) for w in caught if "generic captions' tokens are unknown" in str(w.message))
    share = float(message.split("memguard: ", 1)[1].split("%", 1)[0])
    assert share > 40  # most generic-caption words are not among the tiny vocabulary's
    assert "calibration_mismatch" in caplog.text and "check='caption_fit'" in caplog.text
    provenance = ("policy_loaded", "calibration_loaded")  # the signing branch's records; not the monitor's
    records = [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] not in provenance]
    loaded, mismatch, decision = records
    assert loaded["event"] == "calibration" and len(loaded["details"]["relative"]) == 2
    assert mismatch["event"] == "calibration_mismatch" and mismatch["check"] == "caption_fit"
    assert mismatch["details"]["tokenizers"][0]["share"] == pytest.approx(share / 100, abs=1e-3)
    assert not mismatch["details"]["strict"]
    assert decision["event"] == "decision" and decision["calibration"] == loaded["calibration"]
    assert report.rule != "on_error"  # only auto-strict turns the finding into on_error
    from guard.audit import verify_log

    assert verify_log(log).ok


def test_auto_strict_turns_a_misfit_calibration_into_on_error(auto_cache, tmp_path, monkeypatch):
    from guard import Guard
    from guard.testing import tiny_sd_pipeline

    monkeypatch.setenv("MEMGUARD_CACHE_DIR", str(auto_cache))
    policy = _policy(calibration="auto-strict", on_error="warn")
    assert policy.calibration_path is None
    with pytest.warns(RuntimeWarning, match="auto-strict"):
        guard = Guard(tiny_sd_pipeline(), policy, audit_path=tmp_path / "a.jsonl")
        report = guard.check("a red cat on the beach")
    assert report.rule == "on_error" and report.action == "warn"
    assert "calibration: auto-strict" in report.reason and "unknown to the model's tokenizer" in report.reason


# ---------------------------------------------------------------- live monitor


def _decisions(policy, profile, values):
    return [decide(policy, _score(v), "p", profile) for v in values]


def test_monitor_threshold_check_fires_once_on_traffic_unlike_the_calibration(recwarn):
    policy = _policy()
    profile = _profile(_normal(1000, 2.0, 10))
    emitted = []
    monitor = CalibrationMonitor(policy, emit=lambda event, fields: emitted.append((event, fields)), first_n=200,
                                 min_decisions=10**9)
    assert monitor.start(profile) is None
    monitor.observe(_decisions(policy, profile, _normal(199, 2.4, 11)))
    assert monitor.problems == {}
    monitor.observe(_decisions(policy, profile, _normal(50, 2.4, 12)))
    assert list(monitor.problems) == ["score_distribution"]
    assert [e for e, _ in emitted] == ["calibration", "calibration_mismatch"]
    details = emitted[1][1]["details"]
    assert details["n"] == 200 and {t["verdict"] for t in details["thresholds"]} == {"too many"}
    assert details["distribution"]["p_value"] < 0.001  # described, not what decided
    assert any("first 200 scored requests cross the policy's thresholds" in str(w.message) for w in recwarn)
    assert monitor.blocking_problem is None  # not auto-strict, not automatic

    for traffic in (_normal(400, 2.0, 13), _normal(400, 2.1, 14, sd=0.2),
                    _normal(380, 2.0, 15) + _normal(20, 6.0, 16)):  # same; narrower body; 5% memorized
        quiet = CalibrationMonitor(policy, first_n=200, min_decisions=10**9)
        quiet.start(profile)
        quiet.observe(_decisions(policy, profile, traffic))
        assert quiet.problems == {}


def test_monitor_drift_alarm_fires_once_for_too_many_and_stays_quiet_on_the_right_distribution(caplog):
    policy = _policy()
    profile = _profile(_normal(2000, 2.0, 20))
    right = CalibrationMonitor(policy, first_n=10**9)
    right.start(profile)
    with caplog.at_level(logging.WARNING, logger="memguard"):
        for start in range(0, 6000, 100):
            right.observe(_decisions(policy, profile, _normal(100, 2.0, 1000 + start)))
    assert "threshold_drift" not in caplog.text
    assert all(row["verdict"] is None and row["decisions"] == 6000 for row in right.snapshot()["thresholds"])

    emitted = []
    wrong = CalibrationMonitor(policy, emit=lambda e, f: emitted.append((e, f)), first_n=10**9, min_decisions=200)
    wrong.start(profile)
    with caplog.at_level(logging.WARNING, logger="memguard"):
        wrong.observe(_decisions(policy, profile, _normal(199, 2.3, 30)))
        assert not [e for e, _ in emitted if e == "drift"]  # not before min_decisions
        for seed in range(31, 41):
            wrong.observe(_decisions(policy, profile, _normal(100, 2.3, seed)))
    drifts = [f for e, f in emitted if e == "drift"]
    assert {d["details"]["rule"] for d in drifts} == {"block-top", "warn-top"}  # each rule once
    assert all(d["details"]["verdict"] == "too many" for d in drifts)
    assert caplog.text.count("threshold_drift") == 2
    assert "promised" in drifts[0]["message"] and "memguard calibrate --from-audit" in drifts[0]["message"]
    assert "first look at what crossed" in drifts[0]["message"]  # memorized prompts cross thresholds too


def test_monitor_flags_too_few_crossings():
    policy = _policy()
    profile = _profile(_normal(2000, 2.0, 40))
    monitor = CalibrationMonitor(policy, first_n=10**9)
    monitor.start(profile)
    monitor.observe(_decisions(policy, profile, _normal(3000, 1.6, 41)))
    verdicts = {row["rule"]: row["verdict"] for row in monitor.snapshot()["thresholds"]}
    assert verdicts == {"block-top": "too few", "warn-top": "too few"}


def test_relative_thresholds_state_the_calibration_exceedance():
    profile = _profile([float(i) for i in range(1000)])
    rows = relative_thresholds(_policy(), profile)
    assert [(r["rule"], r["above_fpr"], r["value"], r["exceeded"], r["n"]) for r in rows] == [
        ("block-top", 0.01, 989.0, 10, 1000), ("warn-top", 0.05, 949.0, 50, 1000)]


# ---------------------------------------------------------------- audit summary and report


def _write_log(path, traffic_mean: float, *, n: int = 3000, with_event: bool = True, calibration_seed: int = 50):
    """A log as a guard writes it: the calibration record, then decision records of ``n`` requests."""
    policy = _policy()
    profile = _profile(_normal(1000, 2.0, calibration_seed))
    with AuditLog(path) as sink:
        logger = AuditLogger(sink, prompt_mode="hash", context={"policy": {
            "name": policy.name, "version": policy.version, "hash": policy.content_hash}})
        if with_event:
            logger.log("calibration", calibration=profile.id, check="loaded", message="judging",
                       details={"relative": relative_thresholds(policy, profile)})
        for i, value in enumerate(_normal(n, traffic_mean, 60)):
            decision = decide(policy, _score(value), f"p{i}", profile)
            logger.log_decision(decision, prompt=f"p{i}", outcome="checked", request_id=f"r{i}")
    return profile


def test_summary_flags_a_policy_calibrated_on_the_wrong_distribution_and_not_the_right_one(tmp_path):
    right, wrong = tmp_path / "right.jsonl", tmp_path / "wrong.jsonl"
    _write_log(right, 2.0)
    profile = _write_log(wrong, 2.25)
    quiet = summarize(right).to_dict()["drift"]
    assert quiet["computed"] and len(quiet["rows"]) == 2
    assert {r["verdict"] for r in quiet["rows"]} == {"consistent"}
    assert all(r["decisions"] == 3000 for r in quiet["rows"])
    loud = summarize(wrong)
    rows = {r["rule"]: r for r in loud.to_dict()["drift"]["rows"]}
    assert {r["verdict"] for r in rows.values()} == {"too many"}
    block = rows["block-top"]
    assert block["value"] == profile.threshold_at_fpr(0.01) and block["calibration"] == profile.id
    assert block["crossed"] == sum(1 for v in _normal(3000, 2.25, 60) if v > block["value"])
    assert block["promised"] == pytest.approx((round(profile.fpr_of(block["value"]) * 1000) + 1) / 1001)
    assert block["promise_basis"].startswith("calibration:")
    text = render_text(loud)
    assert "relative thresholds: observed vs promised rate (99% intervals)" in text and "!! too many" in text
    assert "Too many: memorized prompts cross thresholds too, so first look at what crossed" in text
    assert summarize(wrong, AuditFilter(actions=frozenset({"block"}))).to_dict()["drift"]["computed"] is False


def test_summary_learns_thresholds_from_decisions_when_the_calibration_record_is_missing(tmp_path):
    path = tmp_path / "old.jsonl"
    _write_log(path, 2.3, with_event=False)
    rows = summarize(path).to_dict()["drift"]["rows"]
    assert {r["rule"] for r in rows} == {"block-top", "warn-top"}
    assert all(r["promise_basis"] == "asked above_fpr (calibration size unknown)" for r in rows)
    assert all(r["promised"] == r["above_fpr"] and r["verdict"] == "too many" for r in rows)
    assert all(0 < r["decisions"] < 3000 for r in rows)  # counted from the record after the one that showed it


def test_summary_keeps_calibration_thresholds_outside_the_time_window(tmp_path):
    path = tmp_path / "log.jsonl"
    _write_log(path, 2.25)
    lines = path.read_text().splitlines()
    first_decision = json.loads(lines[1])["timestamp"]
    from guard.audit.review import parse_time

    window = AuditFilter(since=parse_time(first_decision))
    rows = summarize(path, window).to_dict()["drift"]["rows"]
    assert rows and all(r["promise_basis"].startswith("calibration:") for r in rows)


def test_report_shows_the_drift_chart(tmp_path):
    from guard.audit.report import render_html

    _write_log(tmp_path / "wrong.jsonl", 2.25)
    page = render_html(summarize(tmp_path / "wrong.jsonl"), None)
    section = page.split('<section id="drift">', 1)[1].split("</section>", 1)[0]
    assert '<svg id="drift-chart"' in section and section.count('class="flagged"') == 2
    assert 'id="drift-status" class="status bad"' in section and 'id="drift-table"' in section
    status = section.split('id="drift-status"', 1)[1].split("</div>", 1)[0]
    assert "first look at what crossed" in status and "memguard calibrate --from-audit" in status
    assert "<script" not in page
    _write_log(tmp_path / "right.jsonl", 2.0)
    page = render_html(summarize(tmp_path / "right.jsonl"), None)
    assert page.count('class="consistent"') == 2 and 'id="drift-status" class="status ok"' in page


# ---------------------------------------------------------------- service /metrics


def test_service_exposes_the_monitor_counters_to_prometheus(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    pytest.importorskip("prometheus_client")
    from fastapi.testclient import TestClient

    from guard import Guard, calibrate
    from guard.scoring import Scorer
    from guard.service import create_app
    from guard.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    words = list(DEFAULT_WORDS)
    rng = random.Random(0)
    prompts = [" ".join(rng.choices(words, k=5)) for _ in range(40)]
    profile = calibrate(Scorer(pipe), prompts[:30], progress=False)
    guard = Guard(pipe, _policy(), audit_path=tmp_path / "a.jsonl", calibration=profile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with TestClient(create_app(guard)) as client:
            assert client.post("/v1/check", json={"prompts": prompts[30:]}).status_code == 200
            body = client.get("/metrics")
    assert body.status_code == 200 and body.headers["content-type"].startswith("text/plain")
    text = body.text
    labels = f'above_fpr="0.01",calibration="{profile.id}",metric="score",policy="drift",rule="block-top"'
    assert f"memguard_threshold_decisions_total{{{labels}}} 10.0" in text
    crossed = guard.core.monitor.snapshot()["thresholds"][0]["crossed"]
    assert f"memguard_threshold_crossed_total{{{labels}}} {float(crossed)}" in text
    assert 'memguard_threshold_promised_rate{above_fpr="0.01",bound="expected",calibration=' in text
    assert f"memguard_threshold_drift{{{labels}}} 0.0" in text
    assert 'memguard_decisions_total{action="' in text
    assert 'memguard_calibration_mismatch{check="caption_fit",policy="drift"} 0.0' in text


def test_drift_chart_renders_in_headless_chromium(tmp_path):
    from test_audit_review import _chromium, _dump_dom

    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (CI installs it via .ci/system-deps; locally: apt-get install chromium)")
    from guard.audit.report import write_report

    _write_log(tmp_path / "wrong.jsonl", 2.25)
    page = write_report(summarize(tmp_path / "wrong.jsonl"), None, tmp_path / "wrong.html")
    dom = _dump_dom(browser, page, tmp_path / "chromium-profile")
    chart = dom.split('<svg id="drift-chart"', 1)[1].split("</svg>", 1)[0]
    assert chart.count('class="flagged"') == 2 and chart.count('class="promised"') == 2
    assert "block-top (above_fpr 0.01)" in chart and 'id="drift-status" class="status bad"' in dom


def test_service_runs_without_prometheus_client(monkeypatch):
    pytest.importorskip("fastapi")
    import sys

    from fastapi import FastAPI

    from guard.service.metrics import add_metrics_route

    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed: importing it fails
    app = FastAPI()
    assert add_metrics_route(app, guard=None) is False
    assert "/metrics" not in {route.path for route in app.routes}
