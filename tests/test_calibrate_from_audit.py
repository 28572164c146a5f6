"""``memguard calibrate --from-audit``: a profile from the scores of real requests in an audit log."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from guard.audit import AuditLog, AuditLogger
from guard.audit.from_audit import AuditCalibrationError, profile_from_audit, stability
from guard.calibration import CalibrationProfile
from guard.cli import main
from guard.policy import decide, load_policy
from guard.scoring.result import MemorizationScore
from guard.testing import DEFAULT_WORDS

MEASURED = {"fingerprint": "0123456789abcdef", "steps": 50, "seed": 51, "samples": 1, "prediction_space": "eps",
            "g_norm": 1.0, "g_cos": 2.0}
MONITOR = load_policy({"name": "monitor-abs", "calibration": "off", "audit": {"prompt": "hash"}, "rules": [
    {"name": "flag-outlier", "when": {"score": {"gte": 4.0}}, "action": "warn"}]})


def _score(value: float, seed: int = 51, cos: float = 0.2) -> MemorizationScore:
    """A score of ``value`` with weights (1, 2): the norm is what the cosine leaves."""
    return MemorizationScore(norm=value - 2.0 * cos, cos=cos, score=value, g_norm=1.0, g_cos=2.0, profile="sd1",
                             t_hi=981, t_lo=41, samples=1, seed=seed, prediction_space="eps")


def _write(path, values, *, measured=MEASURED, seed=51, start=0, with_measurement=True, coses=None):
    """Decision records as a guard writes them (hashed prompts), one per value, a minute apart."""
    with AuditLog(path) as sink:
        logger = AuditLogger(sink, prompt_mode="hash", context={
            "policy": {"name": MONITOR.name, "version": MONITOR.version, "hash": MONITOR.content_hash},
            "model": {"id": "m", "class": "StableDiffusionPipeline"}})
        for i, value in enumerate(values):
            decision = decide(MONITOR, _score(value, seed, coses[i] if coses else 0.2), f"prompt {i}")
            extra = {"measurement": {**measured, "seed": seed}} if with_measurement else {}
            logger.log_decision(decision, prompt=f"prompt {i}", outcome="checked", request_id=f"r{start + i}",
                                timestamp=f"2024-05-01T{(start + i) // 60 % 24:02d}:{(start + i) % 60:02d}:00.000000Z",
                                **extra)


def _traffic(n_ordinary: int, n_memorized: int, seed: int = 0) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    ordinary = [rng.gauss(2.0, 0.3) for _ in range(n_ordinary)]
    memorized = [rng.gauss(5.0, 0.4) for _ in range(n_memorized)]
    mixed = ordinary + memorized
    rng.shuffle(mixed)
    return mixed, ordinary


def test_memorized_prompts_mixed_in_are_excluded_and_counted(tmp_path):
    log = tmp_path / "audit.jsonl"
    mixed, ordinary = _traffic(2000, 30)
    _write(log, mixed)
    made = profile_from_audit(log)
    profile = made.profile
    assert max(profile.scores) < min(v for v in mixed if v not in ordinary)  # every memorized one excluded
    assert 2000 - 20 <= made.used <= 2000  # and at most 1% of the ordinary tail (a normal body: about 0.4%)
    (reason,) = made.excluded
    assert reason.startswith("above the fence ") and made.body is not None and made.body.score.value == made.fence
    reference = CalibrationProfile.from_scores(ordinary, fingerprint="x", model_class="x", profile="sd1", g_norm=1.0,
                                               g_cos=2.0, seed=51, samples=1, steps=50, prediction_space="eps",
                                               source="x")
    for fpr in (0.001, 0.01, 0.05):  # the ordinary tail the fence cut makes them tighter, never looser
        assert profile.threshold_at_fpr(fpr) <= reference.threshold_at_fpr(fpr)
    for fpr in (0.01, 0.05):  # by less than 0.3 standard deviations where the cut tail is small against fpr
        assert profile.threshold_at_fpr(fpr) >= reference.threshold_at_fpr(fpr) - 0.3 * 0.3
    assert (profile.model_fingerprint, profile.seed, profile.steps, profile.g_cos) == ("0123456789abcdef", 51, 50, 2.0)
    assert profile.model_class == "StableDiffusionPipeline" and profile.profile == "sd1"
    assert profile.norms is not None and profile.coses is not None
    excluded = sum(made.excluded.values())
    assert any(f"excluded {excluded} ({100 * excluded / 2030:.2f}%) as likely memorized" in line
               for line in made.lines())
    assert made.remaining(0.01).memorized < 1  # the memorized ones lie far above: none left near the threshold

    unfenced = profile_from_audit(log, fence=None).profile
    assert unfenced.n_prompts == 2030 and unfenced.threshold_at_fpr(0.01) > 4.0  # memorized scores set the threshold
    by_rule = profile_from_audit(log, fence=None, exclude_rules=["flag-outlier"])
    assert by_rule.used == 2000 and by_rule.excluded == {"matched by rule flag-outlier": 30}
    assert [d.consistent for d in by_rule.decisions] == [True]  # an absolute rule promises no rate: trusted
    absolute = profile_from_audit(log, fence=None, exclude_above=3.9)
    assert absolute.used == 2000 and absolute.excluded == {"above 3.9": 30}


def test_records_of_two_settings_are_never_mixed(tmp_path):
    log = tmp_path / "audit.jsonl"
    _write(log, [2.0 + i / 100 for i in range(40)], seed=51)
    _write(log, [9.0 + i / 100 for i in range(30)], seed=7, start=40)
    with pytest.raises(AuditCalibrationError, match="2 models or scoring settings") as caught:
        profile_from_audit(log)
    assert "seed 51" in str(caught.value) and "seed 7" in str(caught.value) and "--model" in str(caught.value)
    from guard.scoring import Measurement

    chosen = Measurement(fingerprint=MEASURED["fingerprint"], model_class="StableDiffusionPipeline", profile="sd1",
                         g_norm=1.0, g_cos=2.0, seed=7, samples=1, steps=50, prediction_space="eps")
    made = profile_from_audit(log, measurement=chosen, fence=None)
    assert made.profile.seed == 7 and made.used == 30 and min(made.profile.scores) >= 9.0
    with pytest.raises(AuditCalibrationError, match="no scored decisions were measured like this model"):
        profile_from_audit(log, measurement=chosen.__class__(**{**chosen.__dict__, "steps": 30}))


def test_unusable_records_are_skipped_and_counted(tmp_path):
    log = tmp_path / "audit.jsonl"
    _write(log, [2.0] * 10, with_measurement=False)
    _write(log, [2.0 + i / 50 for i in range(25)], start=10)
    with log.open("a") as handle:
        handle.write("not json\n")
    made = profile_from_audit(log)
    assert made.used == 25
    assert made.skipped == {"without a measurement (written before memguard recorded it)": 10,
                            "unreadable lines": 1}
    with pytest.raises(AuditCalibrationError, match="only 25 usable scored decisions"):
        profile_from_audit(log, min_records=26)
    from guard.audit.review import parse_time

    window = profile_from_audit(log, since=parse_time("2024-05-01T00:20Z"), min_records=5)
    assert window.used == 15 and window.first.startswith("2024-05-01T00:20")


def test_a_tenth_of_memorized_traffic_does_not_move_the_fence():
    """The old fence (median + 3.5 (P90 - median)) sat among the memorized scores once they were a tenth."""
    rng = random.Random(4)
    ordinary = [rng.gauss(2.0, 0.3) for _ in range(900)]
    memorized = [rng.gauss(3.6, 0.5) for _ in range(100)]  # mild: the nearest start at the ordinary tail
    made_clean = profile_from_audit_values(ordinary)
    made = profile_from_audit_values(ordinary + memorized)
    assert made.fence == pytest.approx(made_clean.fence, abs=0.1)
    for fpr in (0.005, 0.02):
        assert made.profile.threshold_at_fpr(fpr) <= made_clean.profile.threshold_at_fpr(fpr) + 0.05
    left = sum(1 for v in memorized if v <= made.fence)
    assert 0 < left < 10 and made.remaining(0.02).memorized >= 1  # some left, and the estimate says so


def test_memorized_prompts_the_cosine_weight_hides_are_caught_by_their_guidance_norm(tmp_path):
    """With weights that do not suit the model, memorized prompts score inside the ordinary tail, norm far out."""
    rng = random.Random(5)
    ordinary = [(rng.gauss(1.0, 0.1), rng.gauss(0.5, 0.1)) for _ in range(900)]  # score about 2.0 +- 0.22
    memorized = [(rng.gauss(2.0, 0.1), rng.gauss(0.2, 0.05)) for _ in range(100)]  # score about 2.4: the tail
    mixed = ordinary + memorized
    rng.shuffle(mixed)
    log = tmp_path / "audit.jsonl"
    _write(log, [n + 2 * c for n, c in mixed], coses=[c for _, c in mixed])
    clean_log = tmp_path / "clean.jsonl"
    _write(clean_log, [n + 2 * c for n, c in ordinary], coses=[c for _, c in ordinary])
    clean = profile_from_audit(clean_log, fence=None).profile
    made = profile_from_audit(log)
    assert any(reason.startswith("guidance norm above its fence") for reason in made.excluded)
    floor, norm_fence = made.body.norm_score_floor, made.body.norm.value
    above_floor = [(n, c) for n, c in memorized if n + 2 * c > floor]  # those that could move a threshold
    assert len(above_floor) > 30 and all(n > norm_fence for n, _ in above_floor)
    assert len(memorized) > sum(made.excluded.values()) >= len(above_floor)  # those below the floor may stay
    assert floor < clean.threshold_at_fpr(0.05) + 0.01  # the rest score below every policy threshold
    for fpr in (0.005, 0.02):  # as tight as the clean profile's; by score alone they would be far looser
        assert made.profile.threshold_at_fpr(fpr) <= clean.threshold_at_fpr(fpr) + 0.01
    by_score = profile_from_audit(log, fence=None, exclude_above=made.fence).profile
    assert by_score.threshold_at_fpr(0.02) > clean.threshold_at_fpr(0.02) + 0.1


def profile_from_audit_values(values, **options):
    """``profile_from_audit`` on a log of these scores, in this order."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "audit.jsonl"
        _write(log, values)
        return profile_from_audit(log, **options)


def test_stability_check_notices_traffic_that_changed_over_the_log():
    rng = random.Random(1)
    steady = [rng.gauss(2.0, 0.3) for _ in range(4000)]
    changed = steady[:2000] + [rng.gauss(2.4, 0.3) for _ in range(2000)]
    assert all(row["consistent"] for row in stability(steady, [0.01, 0.05]))
    assert not any(row["consistent"] for row in stability(changed, [0.01, 0.05]))


# ---------------------------------------------------------------- end to end on a real pipeline


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny pipeline saved to disk and a log written by a real Guard with an absolute monitor policy."""
    from guard import Guard
    from guard.testing import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("from-audit")
    pipe = tiny_sd_pipeline()
    pipe.save_pretrained(root / "model")
    rng = random.Random(3)
    prompts = [" ".join(rng.choices(list(DEFAULT_WORDS), k=5)) for _ in range(80)]
    guard = Guard(pipe, MONITOR, audit_path=root / "audit.jsonl")
    for start in range(0, 60, 20):
        guard.check_many(prompts[start:start + 20])
    return root, pipe, prompts, guard


def test_cli_builds_a_profile_a_policy_can_name_and_the_guard_accepts(served):
    root, pipe, prompts, guard = served
    records = [r for r in map(json.loads, (root / "audit.jsonl").read_text().splitlines()) if r["event"] == "decision"]
    assert all(r["measurement"]["fingerprint"] == guard.core.scorer.measurement().fingerprint for r in records)
    assert all(len(r["prompt"]) == 64 for r in records)  # hashed: the profile needs scores, not prompts
    out, policy_out = root / "traffic.json", root / "policies" / "traffic.yaml"
    result = CliRunner().invoke(main, ["calibrate", "--from-audit", str(root / "audit.jsonl"), "--out", str(out),
                                       "--fprs", "0.05,0.1", "--policy-out", str(policy_out), "--fence", "0"])
    assert result.exit_code == 0, result.output
    profile = CalibrationProfile.load(out)
    assert profile.n_prompts == 60 and sorted(r["score"] for r in records) == pytest.approx(list(profile.scores))
    assert profile.source.startswith("audit:audit.jsonl:")
    assert f"calibration {profile.id}: 60 requests" in result.output
    assert "threshold at FPR 0.05" in result.output and "stability: thresholds from the first half" in result.output
    load_policy(policy_out)

    (root / "relative.yaml").write_text(
        "name: relative\ncalibration: traffic.json\naudit: {prompt: hash}\n"
        "rules:\n  - {name: top, when: {score: {above_fpr: 0.1}}, action: block}\n")
    from guard import Guard

    relative = Guard(pipe, str(root / "relative.yaml"), audit_path=root / "relative.jsonl")
    reports = relative.check_many(prompts[60:])
    assert all(r.calibration_id == profile.id and r.rule != "on_error" for r in reports)

    with_model = CliRunner().invoke(main, ["calibrate", "--from-audit", str(root / "audit.jsonl"), "--out",
                                           str(root / "again.json"), "--model", str(root / "model"),
                                           "--device", "cpu", "--fence", "0"])
    assert with_model.exit_code == 0, with_model.output
    assert CalibrationProfile.load(root / "again.json").scores == profile.scores
    other_seed = CliRunner().invoke(main, ["calibrate", "--from-audit", str(root / "audit.jsonl"), "--out",
                                           str(root / "none.json"), "--model", str(root / "model"), "--seed", "3",
                                           "--device", "cpu"])
    assert other_seed.exit_code == 1 and "no scored decisions were measured like this model" in other_seed.output
    assert other_seed.output.strip().count("\n") == 0


def test_cli_usage_errors(served, tmp_path):
    root = served[0]
    both = CliRunner().invoke(main, ["calibrate", "--from-audit", str(root / "audit.jsonl"), "--nmem",
                                     str(root / "audit.jsonl"), "--out", str(tmp_path / "x.json")])
    assert both.exit_code == 2 and "drop --nmem/--mem" in both.output
    neither = CliRunner().invoke(main, ["calibrate", "--out", str(tmp_path / "x.json")])
    assert neither.exit_code == 2 and "give --model (or --from-audit" in neither.output
    help_text = CliRunner().invoke(main, ["calibrate", "--help"]).output
    for option in ("--from-audit", "--since", "--until", "--fence", "--exclude-above", "--exclude-action",
                   "--exclude-rule"):
        assert option in help_text


def test_a_trail_of_many_writers_calibrates_as_one_log(tmp_path):
    """Many workers' segments (a trail directory, or the files given one by one) give the profile the same log
    of all their records would: the writers' records merged, none lost, none counted twice."""
    mixed, _ = _traffic(600, 12, seed=3)
    trail = tmp_path / "trail"
    trail.mkdir()
    thirds = [mixed[i::3] for i in range(3)]
    for k, part in enumerate(thirds):
        _write(trail / f"writer-{k}.jsonl", part, start=1000 * k)
    single = tmp_path / "one.jsonl"
    _write(single, [v for part in thirds for v in part])
    whole = profile_from_audit(single)
    from_dir = profile_from_audit(trail)
    from_files = profile_from_audit(sorted(trail.glob("*.jsonl")))
    assert sorted(from_dir.profile.scores) == sorted(whole.profile.scores) == sorted(from_files.profile.scores)
    assert from_dir.used == whole.used and from_dir.excluded == whole.excluded
    out = tmp_path / "p.json"
    result = CliRunner().invoke(main, ["calibrate", "--from-audit", str(trail), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(CalibrationProfile.load(out).scores) == sorted(whole.profile.scores)
    files = [arg for path in sorted(trail.glob("*.jsonl")) for arg in ("--from-audit", str(path))]
    again = CliRunner().invoke(main, ["calibrate", *files, "--out", str(tmp_path / "q.json")])
    assert again.exit_code == 0, again.output
