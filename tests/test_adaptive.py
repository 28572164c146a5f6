"""Adaptive sampling: draws are rows of one fixed noise draw, the band logic, the unconditional cache, adaptive
calibration profiles (never mixed with fixed ones), and the policy path through the Guard, the CLI and the core."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from reference_score import reference_score

from guard import CalibrationMismatch, Guard, PolicyError, Scorer, calibrate, load_policy
from guard.assets import SHIPPED_MODEL
from guard.calibration import CalibrationProfile, SampleSpread
from guard.policy import decision_limits, rule_thresholds
from guard.prompts_io import read_prompts
from guard.scoring import AdaptiveScorer, DecisionLimits, detection_noise, make_scorer, sample_stages

PROMPTS = [
    "a red cat on the beach",
    "portrait of an old man with a hat, oil painting",
    "green mountain river at night",
    "a dog",
    "watercolor city street in the morning",
]
ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [f"a {c} {o} {w}" for c in ("red", "blue", "green", "old", "young") for o in ("cat", "dog", "house", "tree")
            for w in ("at night", "on the beach")]


def side(value: float, threshold: float) -> bool:
    return value > threshold


@pytest.fixture(scope="module")
def n4(sd_pipe):
    """Every caption's n=4 score and per-draw values (the truth adaptive decisions must reproduce)."""
    scorer = Scorer(sd_pipe, samples=4)
    with torch.no_grad():
        norms, coses = scorer.sample_statistics(scorer.encode(CAPTIONS))
    return scorer.score(CAPTIONS), norms, coses


# ---------------------------------------------------------------- draws are rows of one draw


def test_the_first_k_draws_of_any_sample_count_are_the_same_noise():
    four = detection_noise((4, 8, 8), samples=4, seed=51)
    for k in (1, 2, 3):
        assert torch.equal(detection_noise((4, 8, 8), samples=k, seed=51), four[:k])


@pytest.mark.parametrize("fixture", ["sd_pipe", "sdxl_pipe"])
def test_per_draw_statistics_average_to_the_fixed_scores(request, fixture):
    pipe = request.getfixturevalue(fixture)
    scorer = Scorer(pipe, samples=4)
    with torch.no_grad():
        norms, coses = scorer.sample_statistics(scorer.encode(PROMPTS))
        later_norms, later_coses = scorer.sample_statistics(scorer.encode(PROMPTS), 2, 2)
    assert norms.shape == (len(PROMPTS), 4)
    torch.testing.assert_close(later_norms, norms[:, 2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(later_coses, coses[:, 2:], atol=1e-5, rtol=1e-5)
    one = Scorer(pipe, samples=1).score(PROMPTS)
    for row, first in zip(norms, one):
        assert float(row[0]) == pytest.approx(first.norm, abs=1e-5, rel=1e-5)
    for result, n, c in zip(scorer.score(PROMPTS), norms, coses):
        assert result.norm == pytest.approx(float(n.mean()), rel=1e-6, abs=1e-6)
        assert result.cos == pytest.approx(float(c.mean()), abs=1e-6)


def test_adaptive_with_every_draw_equals_n4_and_the_plain_formula(sd_pipe):
    adaptive = AdaptiveScorer(sd_pipe, max_samples=4).score(PROMPTS)  # no limits: every prompt gets all 4 draws
    fixed = Scorer(sd_pipe, samples=4).score(PROMPTS)
    for got, want, prompt in zip(adaptive, fixed, PROMPTS):
        assert got.samples == 4 and got.sampling == "adaptive" and got.max_samples == 4
        assert got.score == pytest.approx(want.score, abs=1e-6, rel=1e-6)
        assert got.norm == pytest.approx(want.norm, abs=1e-6, rel=1e-6)
        assert got.cos == pytest.approx(want.cos, abs=1e-6)
        norm, cos, score, _ = reference_score(sd_pipe, prompt, samples=4)
        assert got.score == pytest.approx(score, abs=1e-5, rel=1e-5)
        assert got.norm == pytest.approx(norm, abs=1e-5, rel=1e-5) and got.cos == pytest.approx(cos, abs=1e-5)


def test_a_prompt_stopped_at_k_draws_has_the_fixed_k_draw_score(sd_pipe):
    one = Scorer(sd_pipe, samples=1).score(PROMPTS)
    two = Scorer(sd_pipe, samples=2).score(PROMPTS)
    scorer = AdaptiveScorer(sd_pipe, max_samples=4)
    near = one[2].score
    # the band of stage 1 covers prompt 2 only; at stage 2 nothing is within 0 of the threshold... unless equal
    limits = DecisionLimits({"score": (near,)}, {("score", 1): 1e-4, ("score", 2): 0.0})
    results = scorer.score(PROMPTS, limits=limits)
    assert [r.samples for r in results] == [1, 1, 2, 1, 1]
    for got, want in zip(results, one):
        if got.samples == 1:
            assert got.score == pytest.approx(want.score, abs=1e-5, rel=1e-5)
    assert results[2].score == pytest.approx(two[2].score, abs=1e-5, rel=1e-5)


# ---------------------------------------------------------------- the band


def test_stages_double_up_to_the_maximum():
    assert sample_stages(4) == (1, 2, 4)
    assert sample_stages(3) == (1, 2, 3)
    assert sample_stages(8) == (1, 2, 4, 8)
    assert sample_stages(1) == (1,)


def test_far_from_every_threshold_one_draw_near_one_more(sd_pipe):
    scorer = AdaptiveScorer(sd_pipe, max_samples=4)
    base = Scorer(sd_pipe, samples=1).score(PROMPTS)
    far = DecisionLimits({"score": (1e6,), "norm": (-1e6,)}, {(m, k): 0.5 for m in ("score", "norm") for k in (1, 2)})
    assert [r.samples for r in scorer.score(PROMPTS, limits=far)] == [1] * len(PROMPTS)
    near = DecisionLimits({"score": (base[0].score + 0.01, 1e6)}, {("score", 1): 0.05, ("score", 2): 0.05})
    used = [r.samples for r in scorer.score(PROMPTS, limits=near)]
    assert used[0] > 1
    assert all(u == 1 for i, u in enumerate(used) if abs(base[i].score - near.thresholds["score"][0]) > 0.06)
    # a band never measured (a missing stage) means "keep sampling": nothing is ruled out without evidence
    unknown = DecisionLimits({"score": (1e6,)}, {})
    assert [r.samples for r in scorer.score(PROMPTS, limits=unknown)] == [4] * len(PROMPTS)


def test_settled_looks_at_every_metric_and_stops_on_non_finite_values():
    limits = DecisionLimits({"score": (2.0,), "cos": (0.1,)}, {("score", 1): 0.1, ("cos", 1): 0.05})
    assert limits.settled({"score": 3.0, "norm": 1.0, "cos": 0.5}, 1)
    assert not limits.settled({"score": 2.05, "norm": 1.0, "cos": 0.5}, 1)
    assert not limits.settled({"score": 3.0, "norm": 1.0, "cos": 0.12}, 1)
    assert limits.settled({"score": math.nan, "norm": 1.0, "cos": 0.12}, 1)


@pytest.fixture(scope="module")
def memorizer():
    """The shipped memorizing model with 40 ordinary and 12 memorized captions: unlike a random tiny model, its
    draws scatter less than its scores, as on real models."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODEL)
    prompts = ROOT / "benchmarks" / "memorizer" / "prompts"
    captions = read_prompts(prompts / "calib.txt")[:40] + read_prompts(prompts / "mem.txt")[-12:]
    return pipe, captions


def test_wherever_the_band_settles_a_prompt_its_decision_is_the_n4_decision(memorizer):
    """With the band at the largest deviation the calibration prompts show (quantile 1), a prompt that stops at k
    draws is farther from every threshold than its k-draw mean can lie from its 4-draw mean: on those prompts the
    side of every threshold, so every rule's outcome, is exactly n=4's."""
    pipe, captions = memorizer
    scorer = Scorer(pipe, samples=4)
    with torch.no_grad():
        norms, coses = scorer.sample_statistics(scorer.encode(captions))
    fixed = scorer.score(captions)
    spread = SampleSpread.measure(norms.tolist(), coses.tolist(), scorer.combine, (1, 2))
    scores = sorted(r.score for r in fixed)
    thresholds = (scores[len(scores) // 2], scores[-8])
    limits = DecisionLimits({"score": thresholds}, spread.bands(1.0))
    results = AdaptiveScorer(pipe, max_samples=4).score(captions, limits=limits)
    used = [r.samples for r in results]
    assert used.count(1) >= 10 and used.count(4) >= 2, used  # not vacuous: some stop early, some do not
    for got, want in zip(results, fixed):
        for t in thresholds:
            assert side(got.score, t) == side(want.score, t), (got.samples, got.score, want.score, t)
        if got.samples < 4:
            assert all(abs(got.score - t) > limits.band("score", got.samples) for t in thresholds)


def test_band_quantiles_read_the_spread_of_the_calibration_prompts():
    spread = SampleSpread(stages=(1, 2), score=((0.4, 0.1, 0.2, 0.3), (0.1, 0.05, 0.0, 0.2)),
                          norm=((0.0,) * 4, (0.0,) * 4), cos=((0.0,) * 4, (0.0,) * 4))
    assert spread.score[0] == (0.1, 0.2, 0.3, 0.4)
    assert spread.band("score", 1, 1.0) == 0.4
    assert spread.band("score", 1, 0.75) == 0.3
    assert spread.band("score", 1, 0.5) == 0.2
    assert spread.band("score", 2, 0.99) == 0.2
    with pytest.raises(KeyError):
        spread.band("score", 4)


# ---------------------------------------------------------------- the unconditional cache


def _count_calls(scorer):
    calls = []
    original = scorer.adapter.predict

    def counting(sample, timesteps, cond):
        calls.append(sample.shape[0])
        return original(sample, timesteps, cond)

    scorer.adapter.predict = counting
    return calls


def test_one_unconditional_cache_entry_serves_every_sample_count(sd_pipe):
    scorer = Scorer(sd_pipe, samples=1)
    calls = _count_calls(scorer)
    scorer.score(PROMPTS)
    assert calls == [2, 2 * len(PROMPTS)]  # uncond for 1 draw (t_hi + t_lo); the prompts' rows
    calls.clear()
    with torch.no_grad():
        scorer.sample_statistics(scorer.encode(PROMPTS[:2]), 0, 4)
    assert calls == [2 * 4, 2 * 2 * 4]  # the cache grows once to 4 draws
    calls.clear()
    scorer.score(PROMPTS)
    with torch.no_grad():
        scorer.sample_statistics(scorer.encode(PROMPTS[:1]), 1, 3)
    assert calls == [2 * len(PROMPTS), 2 * 3]  # no unconditional call for 1 draw nor for draws 1..3


def test_adaptive_stages_only_add_the_new_draws_of_unsettled_prompts(sd_pipe):
    scorer = AdaptiveScorer(sd_pipe, max_samples=4)
    base = Scorer(sd_pipe, samples=1).score(PROMPTS)
    calls = _count_calls(scorer)
    limits = DecisionLimits({"score": (base[1].score,)}, {("score", 1): 1e-4, ("score", 2): 1e9})
    used = [r.samples for r in scorer.score(PROMPTS, limits=limits)]
    assert used == [1, 4, 1, 1, 1]
    # uncond for all 4 draws once; stage 1: 5 prompts x 1 draw; stage 2: 1 prompt x draw 1; stage 4: draws 2, 3
    assert calls == [2 * 4, 2 * 5, 2 * 1, 2 * 2]


# ---------------------------------------------------------------- calibration profiles


@pytest.fixture(scope="module")
def adaptive_profile(sd_pipe):
    return calibrate(AdaptiveScorer(sd_pipe, max_samples=4), CAPTIONS, source="captions", progress=False)


def test_adaptive_profile_holds_the_max_draw_scores_and_their_spread(adaptive_profile, n4, sd_pipe):
    fixed, norms, coses = n4
    profile = adaptive_profile
    assert profile.sampling == "adaptive" and profile.samples == 4 and profile.spread.stages == (1, 2)
    assert list(profile.scores) == pytest.approx(sorted(r.score for r in fixed), abs=1e-6)
    combine = Scorer(sd_pipe).combine
    one = sorted(abs(float(combine(n[0], c[0]) - combine(n.mean(), c.mean()))) for n, c in zip(norms, coses))
    assert list(profile.spread.score[0]) == pytest.approx(one, abs=1e-5)


def test_adaptive_and_fixed_profiles_are_never_mixed(adaptive_profile, sd_pipe, tmp_path):
    fixed4 = calibrate(Scorer(sd_pipe, samples=4), CAPTIONS, source="captions", progress=False)
    assert list(fixed4.scores) == pytest.approx(list(adaptive_profile.scores), abs=1e-6)
    assert fixed4.id != adaptive_profile.id
    with pytest.raises(CalibrationMismatch, match="sampling: scores 'adaptive', calibration 'fixed'"):
        fixed4.check_measurement(AdaptiveScorer(sd_pipe, max_samples=4).measurement())
    with pytest.raises(CalibrationMismatch, match="sampling: scores 'fixed', calibration 'adaptive'"):
        adaptive_profile.check_measurement(Scorer(sd_pipe, samples=4).measurement())
    with pytest.raises(CalibrationMismatch, match="samples: scores 8"):
        adaptive_profile.check_measurement(AdaptiveScorer(sd_pipe, max_samples=8).measurement())
    policy = load_policy({"name": "a", "scoring": {"samples": "adaptive"},
                          "rules": [{"when": {"score": {"above_fpr": 0.1}}, "action": "block"}]})
    with pytest.raises(CalibrationMismatch, match="adaptive sampling needs a profile made with adaptive"):
        decision_limits(policy, fixed4)
    path = adaptive_profile.save(tmp_path / "adaptive.json")
    assert CalibrationProfile.load(path) == adaptive_profile


def test_profiles_made_before_adaptive_sampling_keep_their_ids(tmp_path):
    """A fixed-sampling profile written before profiles had a ``sampling`` field loads with the same id."""
    data = json.loads((SHIPPED_MODEL / "calibration.json").read_text(encoding="utf-8"))
    assert data.get("sampling", "fixed") == "fixed"
    data.pop("sampling", None)
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data), encoding="utf-8")
    loaded = CalibrationProfile.load(old)
    assert loaded.id == data["id"] and loaded.sampling == "fixed"


def test_a_profile_says_whether_its_spread_fits(adaptive_profile):
    data = adaptive_profile.model_dump(mode="json")
    with pytest.raises(ValueError, match="spread belongs to adaptive profiles"):
        CalibrationProfile.model_validate({**data, "id": "", "sampling": "fixed"})
    with pytest.raises(ValueError, match="needs the spread"):
        CalibrationProfile.model_validate({**data, "id": "", "spread": None})


# ---------------------------------------------------------------- policies and the guard


def test_policy_scoring_says_adaptive_with_its_maximum():
    policy = load_policy({"name": "a", "scoring": {"samples": "adaptive", "max_samples": 6, "band_quantile": 0.95}})
    assert policy.scoring.adaptive and policy.scoring.draws == 6 and policy.scoring.quantile == 0.95
    plain = load_policy({"name": "p", "scoring": {"samples": 4}})
    assert not plain.scoring.adaptive and plain.scoring.draws == 4
    with pytest.raises(PolicyError, match="max_samples only apply to samples: adaptive"):
        load_policy({"name": "x", "scoring": {"samples": 2, "max_samples": 4}})
    with pytest.raises(PolicyError, match="'adaptive'"):
        load_policy({"name": "x", "scoring": {"samples": "many"}})
    with pytest.raises(PolicyError, match="reads its band from a calibration"):
        load_policy({"name": "x", "calibration": "off", "scoring": {"samples": "adaptive"}})


def test_rule_thresholds_collects_every_bound_resolved(adaptive_profile):
    policy = load_policy({"name": "a", "scoring": {"samples": "adaptive"}, "rules": [
        {"when": {"score": {"above_fpr": 0.1}}, "action": "block"},
        {"when": {"score": {"gte": 1.0, "lt": 5.0}, "cos": {"gt": 0.2}}, "action": "warn"}]})
    found = rule_thresholds(policy, adaptive_profile)
    assert found == {"score": tuple(sorted({1.0, 5.0, adaptive_profile.threshold_at_fpr(0.1)})), "cos": (0.2,)}


def _policy(samples, **scoring):
    return {"name": "adaptive-test", "scoring": {"samples": samples, **scoring}, "on_error": "warn",
            "rules": [{"name": "top", "when": {"score": {"above_fpr": 0.1}}, "action": "block"},
                      {"name": "elevated", "when": {"score": {"above_fpr": 0.3}}, "action": "warn"}],
            "audit": {"prompt": "hash"}}


def test_guard_decides_adaptively_as_n4_decides_and_records_the_draws(memorizer, tmp_path):
    pipe, captions = memorizer
    ordinary = captions[:40]
    adaptive_profile = calibrate(AdaptiveScorer(pipe, max_samples=4), ordinary, source="c", progress=False)
    fixed_profile = calibrate(Scorer(pipe, samples=4), ordinary, source="c", progress=False)
    log = tmp_path / "adaptive.jsonl"
    with Guard(pipe, _policy("adaptive"), calibration=adaptive_profile, audit_path=log) as guard:
        adaptive = guard.check_many(captions)
    with Guard(pipe, _policy(4), calibration=fixed_profile, audit_path=tmp_path / "n4.jsonl") as guard:
        fixed = guard.check_many(captions)
    # on its 40 calibration prompts, band quantile 0.99 is their largest deviation: every decision must agree
    assert [d.action for d in adaptive[:40]] == [d.action for d in fixed[:40]]
    assert [d.action for d in adaptive[40:]] == [d.action for d in fixed[40:]] == ["block"] * 12
    assert {d.action for d in fixed[:40]} == {"block", "warn", "allow"}
    used = [d.score.samples for d in adaptive]
    assert used.count(1) > len(used) / 2 and max(used) == 4
    for got, want in zip(adaptive, fixed):
        if got.score.samples == 4:
            assert got.score.score == pytest.approx(want.score.score, abs=1e-5)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    decisions = [r for r in records if r["event"] == "decision"]
    assert [r["samples"] for r in decisions] == used
    assert all(d.score.sampling == "adaptive" and d.score.max_samples == 4 for d in adaptive)


def test_adaptive_policy_with_a_fixed_calibration_fails_as_the_policy_says(sd_pipe, tmp_path):
    fixed_profile = calibrate(Scorer(sd_pipe, samples=4), CAPTIONS[:8], source="captions", progress=False)
    with Guard(sd_pipe, _policy("adaptive"), calibration=fixed_profile, audit_path=tmp_path / "a.jsonl") as guard:
        decision = guard.check(PROMPTS[0])
    assert decision.rule == "on_error" and decision.action == "warn"
    assert "sampling" in decision.reason
    assert decision.score.samples == 4  # without the band every draw is taken


def test_make_scorer_and_the_cli_calibrate_adaptive_profiles(sd_pipe, tmp_path):
    assert isinstance(make_scorer(sd_pipe, samples="adaptive"), AdaptiveScorer)
    assert make_scorer(sd_pipe, samples="adaptive", max_samples=6).samples == 6
    with pytest.raises(ValueError, match="only for samples='adaptive'"):
        make_scorer(sd_pipe, samples=2, max_samples=4)
    from guard.cli import main

    model = tmp_path / "model"
    sd_pipe.save_pretrained(model)
    nmem = tmp_path / "nmem.txt"
    nmem.write_text("\n".join(CAPTIONS[:12]) + "\n")
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(main, ["calibrate", "--model", str(model), "--nmem", str(nmem), "--samples",
                                       "adaptive", "--max-samples", "3", "--out", str(out), "--no-progress",
                                       "--policy-out", str(tmp_path / "policy.yaml")])
    assert result.exit_code == 0, result.output
    profile = CalibrationProfile.load(out)
    assert profile.sampling == "adaptive" and profile.samples == 3 and profile.spread.stages == (1, 2)
    written = load_policy(tmp_path / "policy.yaml")
    assert written.scoring.samples == "adaptive" and written.scoring.draws == 3
    bad = CliRunner().invoke(main, ["calibrate", "--model", str(model), "--nmem", str(nmem), "--samples", "2",
                                    "--max-samples", "3", "--out", str(tmp_path / "x.json")])
    assert bad.exit_code != 0 and "--max-samples is only for --samples adaptive" in bad.output
