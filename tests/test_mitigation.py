import json
import warnings

import pytest
import torch

from guard import Guard, MemorizationBlocked, MemorizationWarning, score_prompts, verify_log
from guard.actions.mitigation import mitigate_initial_noise, mitigate_prompt_embedding
from guard.policy import Optimisation
from guard.scoring import Scorer

CAT, DOG = "a red cat on the beach", "a small dog in the garden"


def unet_grads(pipe):
    return sum(p.grad is not None for p in pipe.unet.parameters())


def rewrite_policy(target, *, method="prompt_embedding", max_steps=10, fallback="block", gte=-1e9,
                   verify=None, **overrides):
    """Rewrite every prompt with one method; ``verify=None``: released when the score target is met (unverified)."""
    rule = {
        "name": "rewrite-all",
        "when": {"score": {"gte": gte}},
        "action": "rewrite",
        "rewrite": {"method": method, "target": {"score": target}, "max_steps": max_steps, "fallback": fallback,
                    "verify": verify},
    }
    base = {"name": "test", "version": 1, "calibration": "off", "rules": [rule], "default": "allow"}
    base.update(overrides)
    return base


def generate(target, prompt, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    return target(prompt=prompt, generator=torch.Generator("cpu").manual_seed(0), **kwargs)


def records(path):
    """The outcome records (what was done with each prompt)."""
    return [r for r in _all_records(path) if r["event"] == "outcome"]


def _all_records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("fixture", ["sd_pipe", "sdxl_pipe"])
def test_prompt_embedding_lowers_the_score_under_no_grad(request, fixture):
    pipe = request.getfixturevalue(fixture)
    scorer = Scorer(pipe)
    cond = scorer.encode([CAT])
    before = cond.embeds.clone()
    with torch.no_grad():
        result = mitigate_prompt_embedding(scorer, cond, target=-1e6, max_steps=3)
    assert result.steps == 3 and not result.met
    assert result.score_after < result.score_before
    assert result.score_before == pytest.approx(scorer.score_conditioning(cond)[0].score, abs=1e-5)
    assert result.score_after == pytest.approx(scorer.score_conditioning(result.cond)[0].score, abs=1e-5)
    assert torch.equal(cond.embeds, before)  # the caller's conditioning is untouched
    assert torch.equal(result.cond.embeds[:, 0], cond.embeds[:, 0].float())  # BOS token frozen
    assert not torch.equal(result.cond.embeds, cond.embeds.float())
    if cond.pooled is not None:  # SDXL: the pooled embedding moves with the tokens
        assert not torch.equal(result.cond.pooled, cond.pooled.float())
    assert unet_grads(pipe) == 0
    assert json.dumps(result.summary().model_dump(mode="json"))


def test_prompt_embedding_stops_as_soon_as_the_target_is_met(sd_pipe):
    scorer = Scorer(sd_pipe)
    cond = scorer.encode([CAT])
    one = mitigate_prompt_embedding(scorer, cond, target=-1e6, max_steps=1)
    target = (one.score_before + one.score_after) / 2
    result = mitigate_prompt_embedding(scorer, cond, target=target, max_steps=10)
    assert result.met and result.steps == 1
    assert result.score_after == pytest.approx(one.score_after) and result.score_after <= target
    already = mitigate_prompt_embedding(scorer, cond, target=one.score_before + 1.0, max_steps=10)
    assert already.met and already.steps == 0 and torch.equal(already.cond.embeds, cond.embeds.float())


def test_proximity_keeps_the_embedding_closer(sd_pipe):
    scorer = Scorer(sd_pipe)
    cond = scorer.encode([CAT])
    free = mitigate_prompt_embedding(scorer, cond, target=-1e6, max_steps=4, lr=0.1)
    tied = mitigate_prompt_embedding(scorer, cond, target=-1e6, max_steps=4, lr=0.1, proximity=1e4)
    distance = [(r.cond.embeds - cond.embeds).norm().item() for r in (free, tied)]
    assert distance[1] < distance[0]


def test_bf16_pipeline():
    from guard.testing import tiny_sd_pipeline

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = tiny_sd_pipeline().to(torch.bfloat16)
    scorer = Scorer(pipe)
    cond = scorer.encode([CAT])
    assert cond.embeds.dtype == torch.bfloat16
    with torch.no_grad():
        result = mitigate_prompt_embedding(scorer, cond, target=-1e6, max_steps=2)
        noise = mitigate_initial_noise(scorer, cond, torch.randn(1, 4, 8, 8), target=-1e6, max_steps=2, candidates=2)
    assert result.cond.embeds.dtype == torch.float32
    assert result.score_after < result.score_before
    assert noise.score_after < noise.score_before
    assert unet_grads(pipe) == 0


def test_initial_noise_lowers_the_score_and_keeps_met_noise(sd_pipe):
    scorer = Scorer(sd_pipe)
    cond = scorer.encode([CAT])
    own = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        result = mitigate_initial_noise(scorer, cond, own, target=-1e6, max_steps=2, candidates=3)
    assert result.steps == 2 and not result.met
    assert result.score_after < result.score_before
    assert result.latents.shape == own.shape
    assert unet_grads(sd_pipe) == 0
    easy = mitigate_initial_noise(scorer, cond, own, target=1e6, max_steps=3, candidates=2)
    assert easy.met and easy.steps == 0 and torch.equal(easy.latents, own)  # the caller's noise already passes
    wide = mitigate_initial_noise(scorer, cond, torch.randn(1, 4, 12, 16), target=-1e6, max_steps=1, candidates=1)
    assert wide.latents.shape == (1, 4, 12, 16)  # another resolution works at its own latent size


def test_guard_rewrites_with_prompt_embedding_and_audits_it(sd_pipe, tmp_path):
    log = tmp_path / "audit.jsonl"
    score = score_prompts(sd_pipe, [CAT])[0].score
    guard = Guard(sd_pipe, rewrite_policy(score - 0.02, verify={"max_similarity": 1.0}), audit_path=log)
    with torch.no_grad():
        out = generate(guard, CAT)
    plain = generate(sd_pipe, CAT)
    report = out.memguard
    assert report.actions == ["rewrite"] and report.generated == [0]
    ladder = report.mitigations[0]
    assert ladder.verified and ladder.released == "prompt_embedding"
    (mitigation,) = ladder.rungs[0].optimisations
    assert isinstance(mitigation, Optimisation) and mitigation.met
    assert mitigation.score_before == pytest.approx(score, abs=1e-5) and mitigation.score_after <= score - 0.02
    assert not (out.images == plain.images).all()
    (record,) = records(log)
    assert record["outcome"] == "rewritten"
    audited = record["extras"]["mitigation"]
    assert audited == ladder.to_dict() and audited["released"] == "prompt_embedding" and audited["verified"] is True
    assert audited["rungs"][0]["mitigations"][0]["met"] is True
    assert report.decisions[0].mitigation.to_dict() == audited  # the decision carries what the rewrite did
    assert verify_log(log).ok


def test_guard_initial_noise_leaves_other_prompts_bit_identical(sd_pipe, tmp_path):
    log = tmp_path / "audit.jsonl"
    cat, dog = score_prompts(sd_pipe, [CAT, DOG])
    cut = (cat.score + dog.score) / 2
    high, low = (0, 1) if cat.score > dog.score else (1, 0)
    target = max(cat.score, dog.score) - 0.05
    policy = rewrite_policy(target, method="initial_noise", max_steps=20, gte=cut, verify={"max_similarity": 1.0})
    guard = Guard(sd_pipe, policy, audit_path=log)
    out = generate(guard, [CAT, DOG], num_images_per_prompt=2, output_type="latent")
    plain = generate(sd_pipe, [CAT, DOG], num_images_per_prompt=2, output_type="latent")
    assert out.memguard.actions[high] == "rewrite" and out.memguard.actions[low] == "allow"
    assert out.memguard.mitigations[high].released == "initial_noise" and out.memguard.mitigations[high].verified
    rows = {i: slice(2 * i, 2 * i + 2) for i in (0, 1)}
    assert torch.equal(out.images[rows[low]], plain.images[rows[low]])
    assert not torch.equal(out.images[rows[high]], plain.images[rows[high]])
    outcomes = [r["outcome"] for r in records(log)]
    assert outcomes[high] == "rewritten" and outcomes[low] == "generated"
    assert verify_log(log).ok


def test_fallback_block_when_the_budget_runs_out(sd_pipe, tmp_path):
    log = tmp_path / "audit.jsonl"
    guard = Guard(sd_pipe, rewrite_policy(-1e6, max_steps=1), audit_path=log)
    with pytest.raises(MemorizationBlocked) as caught:
        generate(guard, CAT)
    (decision,) = caught.value.decisions
    assert decision.action == "block"
    assert "no rung passed" in decision.reason and "fallback: block" in decision.reason
    (record,) = records(log)
    assert record["outcome"] == "blocked" and verify_log(log).ok
    assert record["extras"]["mitigation"]["verified"] is False
    assert record["extras"]["mitigation"]["rungs"][0]["mitigations"][0]["met"] is False


def test_fallback_drops_only_the_unmitigated_prompt(sd_pipe, tmp_path):
    cat, dog = score_prompts(sd_pipe, [CAT, DOG])
    high = 0 if cat.score > dog.score else 1
    policy = rewrite_policy(-1e6, max_steps=1, gte=(cat.score + dog.score) / 2, batch="drop_blocked")
    guard = Guard(sd_pipe, policy, audit_path=tmp_path / "a.jsonl")
    out = generate(guard, [CAT, DOG])
    assert out.memguard.dropped == [high] and out.memguard.generated == [1 - high]
    assert out.images.shape[0] == 1 and list(out.memguard.mitigations) == [high]
    assert not out.memguard.mitigations[high].met
    assert (out.images == generate(sd_pipe, [CAT, DOG][1 - high]).images).all()


def test_fallback_warn_generates_unchanged_and_warns(sd_pipe, tmp_path):
    log = tmp_path / "audit.jsonl"
    guard = Guard(sd_pipe, rewrite_policy(-1e6, max_steps=1, fallback="warn"), audit_path=log)
    with pytest.warns(MemorizationWarning, match="fallback: warn"):
        out = generate(guard, CAT)
    assert out.memguard.actions == ["warn"] and not out.memguard.mitigations[0].met
    assert (out.images == generate(sd_pipe, CAT).images).all()
    (record,) = records(log)
    assert record["outcome"] == "generated" and record["action"] == "warn"
    rung = record["extras"]["mitigation"]["rungs"][0]
    assert rung["mitigations"][0]["met"] is False and rung["mitigations"][0]["steps"] == 1
