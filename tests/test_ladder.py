"""The rewrite ladder: each rung, the order, verification passing and failing, fallbacks and the records."""

from __future__ import annotations

import json

import pytest
import torch

from guard import Guard, MemorizationBlocked, MemorizationWarning, verify_log
from guard.actions.guidance import scale_at, scheduled_guidance
from guard.actions.verification import probe_noise, probe_similarity
from guard.audit.review import summarize
from guard.policy import GuidanceStage, load_policy

CAT, DOG = "a red cat on the beach", "a small dog in the garden"
RUNGS = ["guidance_schedule", "prompt_embedding", "initial_noise", "combined"]


def ladder_policy(ladder, *, verify, fallback="block", target=-1e9, max_steps=2, **overrides):
    rule = {"name": "rewrite-all", "when": {"score": {"gte": -1e9}}, "action": "rewrite",
            "rewrite": {"ladder": ladder, "target": {"score": target}, "max_steps": max_steps, "verify": verify,
                        "fallback": fallback}}
    return {"name": "ladder", "calibration": "off", "rules": [rule], "default": "allow", **overrides}


def generate(target, prompt, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("output_type", "latent")
    return target(prompt=prompt, generator=torch.Generator("cpu").manual_seed(0), **kwargs)


def outcomes(path):
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "outcome"]


# ---------------------------------------------------------------- the guidance schedule


class Halves(torch.nn.Module):
    """A stand-in denoiser whose guidance batch is [uncond = 1s; cond = 3s], called with a timestep."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        half = sample.shape[0] // 2
        return torch.cat([torch.ones(half, 2), torch.full((half, 2), 3.0)])


def test_scheduled_guidance_gives_the_stage_scale_to_chosen_rows_only():
    stages = (GuidanceStage(until=0.5, scale=-1.0),)
    denoiser, g = Halves(), 7.5
    timesteps = torch.tensor([900, 700, 500, 300])
    with scheduled_guidance(denoiser, rows={1: stages}, images=2, guidance_scale=g, schedule=lambda: timesteps):
        early = denoiser(torch.zeros(4, 2), torch.tensor(700))
        late = denoiser(torch.zeros(4, 2), torch.tensor(300))
    combine = lambda out: out[:2] + g * (out[2:] - out[:2])  # noqa: E731 - what the pipeline does
    assert torch.allclose(combine(early)[1], torch.tensor([1.0 - 2.0] * 2))  # u + s (c - u) with s = -1
    assert torch.allclose(combine(early)[0], torch.tensor([1.0 + g * 2.0] * 2))  # other rows untouched
    assert torch.allclose(combine(late), torch.tensor([[1.0 + g * 2.0] * 2] * 2))  # after the stage: normal
    plain = denoiser(torch.zeros(4, 2), torch.tensor(700))
    assert torch.equal(plain, torch.cat([torch.ones(2, 2), torch.full((2, 2), 3.0)]))  # hook removed
    assert scale_at(stages, 0.49) == -1.0 and scale_at(stages, 0.5) is None


def test_probe_noise_is_fixed_and_independent_of_the_caller():
    state = torch.random.get_rng_state()
    assert torch.equal(probe_noise((4, 8, 8), 2, 51), probe_noise((4, 8, 8), 2, 51))
    assert not torch.equal(probe_noise((4, 8, 8), 2, 51), probe_noise((4, 8, 8), 2, 52))
    assert torch.equal(torch.random.get_rng_state(), state)
    a = torch.randn(3, 4, 8, 8)
    expected = [torch.nn.functional.cosine_similarity(a[i].flatten(), a[0].flatten(), dim=0).abs() for i in (1, 2)]
    assert torch.allclose(probe_similarity(a, a[:1]), torch.stack([torch.tensor(1.0), *expected]), atol=1e-6)
    assert probe_similarity(-a[:1], a[:1])[0] == pytest.approx(1.0)  # an inverted copy is a copy


# ---------------------------------------------------------------- rungs, order, verification


@pytest.mark.parametrize("rung", RUNGS)
def test_each_rung_runs_and_releases_when_verified(sd_pipe, tmp_path, rung):
    log = tmp_path / "audit.jsonl"
    guard = Guard(sd_pipe, ladder_policy([rung], verify={"max_similarity": 1.0}), audit_path=log)
    out = generate(guard, CAT)
    plain = generate(sd_pipe, CAT)
    ladder = out.memguard.mitigations[0]
    assert ladder.verified and ladder.released == rung and [r.rung for r in ladder.rungs] == [rung]
    assert len(ladder.rungs[0].similarity) == 1 and ladder.threshold == 1.0
    assert not torch.equal(out.images, plain.images)  # the released image came from the rung's input
    (record,) = outcomes(log)
    assert record["outcome"] == "rewritten" and record["extras"]["mitigation"]["released"] == rung
    assert verify_log(log).ok


def test_guidance_schedule_is_not_available_without_classifier_free_guidance(sd_pipe, tmp_path):
    guard = Guard(sd_pipe, ladder_policy(["guidance_schedule", "prompt_embedding"], verify={"max_similarity": 1.0}),
                  audit_path=tmp_path / "a.jsonl")
    out = generate(guard, CAT, guidance_scale=1.0)
    first, second = out.memguard.mitigations[0].rungs
    assert not first.ran and "guidance_scale is <= 1" in first.note
    assert second.ran and out.memguard.mitigations[0].released == "prompt_embedding"


def test_every_rung_in_order_then_the_fallback(sd_pipe, tmp_path):
    log = tmp_path / "audit.jsonl"
    guard = Guard(sd_pipe, ladder_policy(RUNGS, verify={"max_similarity": -1.0}, fallback="warn"), audit_path=log)
    with pytest.warns(MemorizationWarning, match="no rung passed verification"):
        out = generate(guard, [CAT, DOG])
    assert out.memguard.actions == ["warn", "warn"]
    for ladder in out.memguard.mitigations.values():
        assert [r.rung for r in ladder.rungs] == RUNGS and all(r.ran and not r.verified for r in ladder.rungs)
        assert not ladder.verified and ladder.released is None
    assert torch.equal(out.images, generate(sd_pipe, [CAT, DOG]).images)  # warn releases the unmodified call
    assert [r["outcome"] for r in outcomes(log)] == ["generated", "generated"]
    assert all(r["extras"]["mitigation"]["verified"] is False for r in outcomes(log))


def test_a_budget_caps_what_a_prompt_s_rewrite_spends(sd_pipe, tmp_path):
    """With ``max_generations``, a rung starts only if its generation fits in what is left and its optimisation
    steps are cut to fit: the prompt takes its fallback having spent no more than the budget, the rungs it could
    not afford recorded as skipped."""
    policy = ladder_policy(RUNGS, verify={"max_similarity": -1.0}, fallback="warn", max_steps=4)
    unbounded = Guard(sd_pipe, policy, audit_path=tmp_path / "a.jsonl")
    with pytest.warns(MemorizationWarning):
        full = generate(unbounded, CAT).memguard.mitigations[0]
    probes = full.generations - sum(r.generations for r in full.rungs)
    noise_step = (full.rungs[2].generations - 1.0) / full.rungs[2].optimisations[0].steps
    # two rungs, then initial_noise's generation and 2.5 of its optimisation steps
    budget = probes + full.rungs[0].generations + full.rungs[1].generations + 1.0 + 2.5 * noise_step
    assert full.generations > budget + 1.0
    policy["rules"][0]["rewrite"]["max_generations"] = budget
    bounded = Guard(sd_pipe, policy, audit_path=tmp_path / "b.jsonl")
    with pytest.warns(MemorizationWarning):
        ladder = generate(bounded, CAT).memguard.mitigations[0]
    assert [r.rung for r in ladder.rungs] == RUNGS
    assert [r.ran for r in ladder.rungs[:2]] == [True, True]
    assert ladder.rungs[0].generations == pytest.approx(full.rungs[0].generations)
    assert ladder.generations <= budget + 1e-9
    noise, combined = ladder.rungs[2:]
    assert noise.ran and [o.steps for o in noise.optimisations] == [2]  # cut to what the budget leaves
    assert not combined.ran and "budget" in combined.note


def test_the_ladder_stops_at_the_first_rung_that_passes(sd_pipe, tmp_path):
    similarity = {}
    for rung in ("guidance_schedule", "prompt_embedding"):
        out = generate(Guard(sd_pipe, ladder_policy([rung], verify={"max_similarity": 1.0}),
                             audit_path=tmp_path / f"{rung}.jsonl"), CAT)
        similarity[rung] = out.memguard.mitigations[0].rungs[0].similarity[0]
    first, second = sorted(similarity, key=similarity.get, reverse=True)  # the less similar one passes
    assert similarity[first] > similarity[second]
    threshold = (similarity[first] + similarity[second]) / 2
    guard = Guard(sd_pipe, ladder_policy([first, second, "combined"], verify={"max_similarity": threshold}),
                  audit_path=tmp_path / "a.jsonl")
    ladder = generate(guard, CAT).memguard.mitigations[0]
    assert [r.rung for r in ladder.rungs] == [first, second]  # combined never ran
    assert not ladder.rungs[0].verified and ladder.rungs[1].verified and ladder.released == second
    assert ladder.rungs[0].similarity[0] == pytest.approx(similarity[first], abs=1e-6)


def test_fallback_block_raises_and_records_every_rung(sd_pipe, tmp_path):
    log = tmp_path / "audit.jsonl"
    guard = Guard(sd_pipe, ladder_policy(RUNGS[:2], verify={"max_similarity": -1.0}), audit_path=log)
    with pytest.raises(MemorizationBlocked, match="no rung passed verification"):
        generate(guard, CAT)
    (record,) = outcomes(log)
    assert record["outcome"] == "blocked" and record["action"] == "block"
    assert [r["rung"] for r in record["extras"]["mitigation"]["rungs"]] == RUNGS[:2]
    summary = summarize(log).to_dict()
    assert summary["rewrites"] == {"fell back: block": 1}


def test_a_rewrite_leaves_the_other_prompts_of_the_call_bit_identical(sd_pipe, tmp_path):
    policy = ladder_policy(["guidance_schedule"], verify={"max_similarity": 1.0},
                           lists={"always_allow": [DOG]})
    out = generate(Guard(sd_pipe, policy, audit_path=tmp_path / "a.jsonl"), [CAT, DOG], num_images_per_prompt=2)
    plain = generate(sd_pipe, [CAT, DOG], num_images_per_prompt=2)
    assert out.memguard.actions == ["rewrite", "allow"]
    assert torch.equal(out.images[2:], plain.images[2:]) and not torch.equal(out.images[:2], plain.images[:2])


def test_verification_threshold_comes_from_the_calibration(sd_pipe, tmp_path):
    from click.testing import CliRunner

    from guard.cli import main

    model, prompts = tmp_path / "model", tmp_path / "nmem.txt"
    sd_pipe.save_pretrained(model)
    prompts.write_text("\n".join(f"a {c} {o}" for c in ("red", "blue", "old") for o in ("cat", "dog", "house")) + "\n")
    profile = tmp_path / "profile.json"
    result = CliRunner().invoke(main, ["calibrate", "--model", str(model), "--nmem", str(prompts), "--out",
                                       str(profile), "--verification", "6", "--verify-probe-steps", "3",
                                       "--generation-steps", "4", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    verification = json.loads(profile.read_text())["verification"]
    assert len(verification["nearest"]) == len(verification["same"]) == 6
    assert len(verification["unrelated"]) == 6 * 5  # every ordered pair of different prompts
    assert max(verification["unrelated"]) == pytest.approx(max(verification["nearest"]), abs=1e-6)
    assert verification["steps"] == 4 and verification["probe_steps"] == 3
    policy = ladder_policy(["guidance_schedule"], verify={"above_fpr": 0.2, "probe_steps": 3})
    policy["calibration"] = str(profile)
    ladder = generate(Guard(sd_pipe, policy, audit_path=tmp_path / "a.jsonl"), CAT).memguard.mitigations[0]
    expected = sorted(verification["unrelated"])[30 - 1 - 6]  # the quantile rule at 0.2 of 30 values
    assert ladder.threshold == pytest.approx(expected) and ladder.above_fpr == 0.2
    nearest = ladder_policy(["guidance_schedule"], verify={"above_fpr": 0.2, "probe_steps": 3, "against": "nearest"})
    nearest["calibration"] = str(profile)
    ladder = generate(Guard(sd_pipe, nearest, audit_path=tmp_path / "n.jsonl"), CAT).memguard.mitigations[0]
    assert ladder.threshold == pytest.approx(sorted(verification["nearest"])[6 - 1 - 1])

    from guard.calibration import CalibrationProfile

    made = CalibrationProfile.load(profile)
    old = made.with_verification(made.verification.model_copy(update={"unrelated": None})).save(tmp_path / "o.json")
    stale = ladder_policy(["guidance_schedule"], verify={"above_fpr": 0.2, "probe_steps": 3}, on_error="warn")
    stale["calibration"] = str(old)
    with pytest.warns(MemorizationWarning):
        decision = generate(Guard(sd_pipe, stale, audit_path=tmp_path / "o.jsonl"), CAT).memguard.decisions[0]
    assert decision.rule == "on_error" and "no 'unrelated' values" in decision.reason
    other = ladder_policy(["guidance_schedule"], verify={"above_fpr": 0.2, "probe_steps": 5}, on_error="warn")
    other["calibration"] = str(profile)
    with pytest.warns(MemorizationWarning):
        decision = generate(Guard(sd_pipe, other, audit_path=tmp_path / "b.jsonl"), CAT).memguard.decisions[0]
    assert decision.rule == "on_error" and "probes of 3 steps" in decision.reason


def test_without_a_verification_calibration_the_rewrite_is_an_error(sd_pipe, tmp_path):
    policy = ladder_policy(["guidance_schedule"], verify={"above_fpr": 0.01}, on_error="warn")
    with pytest.warns(MemorizationWarning):
        out = generate(Guard(sd_pipe, policy, audit_path=tmp_path / "a.jsonl"), CAT)
    assert out.memguard.decisions[0].rule == "on_error"
    assert "no verification values" in out.memguard.decisions[0].reason


def test_unverified_rules_release_on_the_score_target(sd_pipe, tmp_path):
    log = tmp_path / "audit.jsonl"
    guard = Guard(sd_pipe, ladder_policy(["guidance_schedule", "prompt_embedding"], verify=None, target=1e9),
                  audit_path=log)
    ladder = generate(guard, CAT).memguard.mitigations[0]
    assert not ladder.rungs[0].ran and "without verification" in ladder.rungs[0].note
    assert ladder.released == "prompt_embedding" and not ladder.verified
    (record,) = outcomes(log)
    assert record["outcome"] == "generated"  # "rewritten" is only said of verified rewrites


def test_shipped_policies_rewrite_by_a_verified_ladder():
    strict = load_policy("strict")
    rewrites = [rule.rewrite for rule in strict.rules if rule.action == "rewrite"]
    assert rewrites and all(r.verify is not None and r.fallback == "block" and len(r.rungs) > 1 for r in rewrites)
