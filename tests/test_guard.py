import json
import threading
import warnings

import pytest
import torch

from guard import (
    CalibrationProfile,
    Guard,
    GuardedOutput,
    MemorizationBlocked,
    MemorizationWarning,
    score_prompts,
    verify_log,
)

CAT, DOG, CITY = "a red cat on the beach", "a small dog in the garden", "watercolor city street at night"


def policy(**overrides):
    base = {"name": "test", "version": 1, "calibration": "off", "rules": [], "default": "allow"}
    base.update(overrides)
    return base


def threshold_between(pipe, low_prompt, high_prompt):
    low, high = score_prompts(pipe, [low_prompt, high_prompt])
    assert low.score != high.score
    return (low.score + high.score) / 2, low.score < high.score


def records(path):
    """The per-prompt records (decisions and outcomes), without provenance events such as policy_loaded."""
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] in ("decision", "error", "outcome")]


def decision_records(path):
    return [r for r in records(path) if r["event"] in ("decision", "error")]


def outcome_records(path):
    return [r for r in records(path) if r["event"] == "outcome"]


def generate(target, prompt, **kwargs):
    kwargs.setdefault("num_inference_steps", 2)
    kwargs.setdefault("output_type", "np")
    return target(prompt=prompt, generator=torch.Generator("cpu").manual_seed(0), **kwargs)


@pytest.mark.parametrize("fixture", ["sd_pipe", "sdxl_pipe"])
def test_allowed_prompts_give_bit_identical_images(request, fixture, tmp_path):
    pipe = request.getfixturevalue(fixture)
    guard = Guard(pipe, policy(), audit_path=tmp_path / "audit.jsonl")
    guarded = generate(guard, [CAT, DOG], num_images_per_prompt=2)
    plain = generate(pipe, [CAT, DOG], num_images_per_prompt=2)
    assert guarded.images.shape == plain.images.shape == (4, 16, 16, 3)
    assert (guarded.images == plain.images).all()
    assert guarded.memguard.actions == ["allow", "allow"]
    assert guarded.memguard.generated == [0, 1]
    assert verify_log(tmp_path / "audit.jsonl").ok


def test_block_raises_with_the_decisions_and_is_audited(sd_pipe, tmp_path):
    log = tmp_path / "audit.jsonl"
    cut, cat_is_low = threshold_between(sd_pipe, CAT, DOG)
    high = DOG if cat_is_low else CAT
    guard = Guard(sd_pipe, policy(rules=[{"name": "too-high", "when": {"score": {"gte": cut}}, "action": "block"}]),
                  audit_path=log)
    with pytest.raises(MemorizationBlocked) as caught:
        generate(guard, high)
    (decision,) = caught.value.decisions
    assert decision.action == "block" and decision.rule == "too-high"
    assert "too-high" in str(caught.value)
    record, outcome = records(log)  # the decision, written before acting, then what was done
    assert record["action"] == "block" and record["outcome"] == "pending" and record["rule"] == "too-high"
    assert record["score"] == pytest.approx(decision.score.score)
    assert record["prompt"] != high and len(record["prompt"]) == 64  # hashed by default
    assert outcome["event"] == "outcome" and outcome["outcome"] == "blocked" and outcome["action"] == "block"
    assert (outcome["decision_seq"], outcome["decision_hash"]) == (record["seq"], record["hash"])
    assert "prompt" not in outcome
    assert verify_log(log).ok


def test_withhold_mode_returns_no_images(sd_pipe, tmp_path):
    guard = Guard(sd_pipe, policy(block_mode="withhold", lists={"always_block": [CAT]}),
                  audit_path=tmp_path / "a.jsonl")
    out = generate(guard, CAT)
    assert type(out) is GuardedOutput and out.withheld and out.images == [] and out.output is None
    assert out.memguard.withheld and out.memguard.blocked
    assert outcome_records(tmp_path / "a.jsonl")[0]["outcome"] == "withheld"


def test_warn_generates_warns_and_audits(sd_pipe, tmp_path):
    guard = Guard(sd_pipe, policy(rules=[{"when": {"norm": {"gte": 0.0}}, "action": "warn"}]),
                  audit_path=tmp_path / "a.jsonl")
    with pytest.warns(MemorizationWarning, match="rules\\[0\\] matched"):
        out = generate(guard, CAT)
    assert out.images.shape[0] == 1 and out.memguard.actions == ["warn"]
    assert records(tmp_path / "a.jsonl")[0]["action"] == "warn"


def test_rules_are_checked_in_order_first_match_wins(sd_pipe, tmp_path):
    rules = [
        {"name": "first", "when": {"score": {"gte": -100.0}}, "action": "warn"},
        {"name": "second", "when": {"score": {"gte": -100.0}}, "action": "block"},
    ]
    decision = Guard(sd_pipe, policy(rules=rules), audit_path=tmp_path / "a.jsonl").check(CAT)
    assert (decision.rule, decision.action) == ("first", "warn")


@pytest.mark.parametrize("mode", ["block_whole", "drop_blocked"])
def test_a_blocked_prompt_in_a_batch(sd_pipe, tmp_path, mode):
    log = tmp_path / "a.jsonl"
    guard = Guard(sd_pipe, policy(batch=mode, lists={"always_block": [DOG]}), audit_path=log)
    prompts = [CAT, DOG, CITY]
    if mode == "block_whole":
        with pytest.raises(MemorizationBlocked):
            generate(guard, prompts, num_images_per_prompt=2)
        assert [r["outcome"] for r in outcome_records(log)] == ["blocked"] * 3
        return
    out = generate(guard, prompts, num_images_per_prompt=2, negative_prompt=["blurry", "dark", "noisy"])
    assert out.memguard.generated == [0, 2] and out.memguard.dropped == [1]
    assert out.images.shape[0] == 4
    plain = generate(sd_pipe, [CAT, CITY], num_images_per_prompt=2, negative_prompt=["blurry", "noisy"])
    assert (out.images == plain.images).all()
    assert [r["outcome"] for r in outcome_records(log)] == ["generated", "dropped", "generated"]
    assert [r["outcome"] for r in decision_records(log)] == ["pending"] * 3


def test_caller_prompt_embeds_are_scored_and_passed_through(sd_pipe, tmp_path):
    embeds, _ = sd_pipe.encode_prompt([CAT], "cpu", 1, False)
    guard = Guard(sd_pipe, policy(), audit_path=tmp_path / "a.jsonl")
    out = generate(guard, None, prompt_embeds=embeds)
    plain = generate(sd_pipe, CAT)
    assert (out.images == plain.images).all()
    (decision,) = out.memguard.decisions
    assert decision.score.score == pytest.approx(score_prompts(sd_pipe, CAT)[0].score, abs=1e-6)
    assert records(tmp_path / "a.jsonl")[0]["prompt"] is None


def test_check_returns_the_verdict_without_generating(sd_pipe, tmp_path):
    guard = Guard(sd_pipe, policy(lists={"always_allow": ["A red cat on the beach!"]}), audit_path=tmp_path / "a.jsonl")
    listed, scored = guard.check_many([CAT, DOG])
    assert listed.rule == "lists.always_allow" and listed.score is None
    assert scored.rule == "default" and scored.score.prompt == DOG
    assert [r["outcome"] for r in records(tmp_path / "a.jsonl")] == ["checked", "checked"]  # no outcome records


def test_concurrent_calls_keep_the_audit_chain_intact(sd_pipe, tmp_path):
    log = tmp_path / "a.jsonl"
    guard = Guard(sd_pipe, policy(), audit_path=log)
    failures = []

    def worker(n):
        try:
            for i in range(25):
                guard.check(f"{CAT} {n} {i}")
        except Exception as error:  # pragma: no cover - reported below
            failures.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    report = verify_log(log)
    assert report.ok and report.n_records == 201  # the guard's policy_loaded record, then 200 decisions
    assert len({r["request_id"] for r in records(log)}) == 200


# ---------------------------------------------------------------- errors are decisions too


def test_scorer_exception_fails_closed_and_is_audited(tmp_path):
    from guard.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    guard = Guard(pipe, policy(), audit_path=tmp_path / "a.jsonl")

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    guard.scorer.adapter.predict = broken
    with pytest.raises(MemorizationBlocked, match="scoring failed: RuntimeError: CUDA out of memory"):
        generate(guard, CAT)
    record, outcome = records(tmp_path / "a.jsonl")
    assert record["event"] == "error" and record["rule"] == "on_error" and outcome["outcome"] == "blocked"
    assert "CUDA out of memory" in record["error"]["message"]


def test_nan_score_fails_closed(tmp_path):
    from guard.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    guard = Guard(pipe, policy(), audit_path=tmp_path / "a.jsonl")
    original = guard.scorer.adapter.predict
    guard.scorer.clear_cache()
    guard.scorer.adapter.predict = lambda s, t, c: original(s, t, c) * float("nan")
    decision = guard.check(CAT)
    assert decision.action == "block" and decision.rule == "on_error" and "non-finite" in decision.reason
    record = records(tmp_path / "a.jsonl")[0]
    assert record["event"] == "error" and record["score"] is None


def test_unscorable_model_follows_on_error(tmp_path):
    from diffusers import UNet2DConditionModel

    from guard.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    config = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    pipe.unet = UNet2DConditionModel.from_config({**config, "time_cond_proj_dim": 32})
    guard = Guard(pipe, policy(), audit_path=tmp_path / "a.jsonl")
    with pytest.raises(MemorizationBlocked, match="cannot score this model"):
        generate(guard, CAT)
    lenient = Guard(pipe, policy(on_error="warn"), audit_path=tmp_path / "b.jsonl")
    assert lenient.check(CAT).action == "warn"
    assert records(tmp_path / "b.jsonl")[0]["event"] == "error"


def test_unwritable_audit_log_fails_closed(sd_pipe, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    guard = Guard(sd_pipe, policy(), audit_path=blocker / "audit.jsonl")
    with pytest.raises(MemorizationBlocked, match="audit log not writable") as caught:
        generate(guard, CAT)
    assert caught.value.report.generated == []
    allowing = Guard(sd_pipe, policy(on_error="allow"), audit_path=blocker / "audit.jsonl")
    assert allowing.check(CAT).rule == "on_error"


def test_missing_calibration_says_how_to_calibrate(sd_pipe, tmp_path):
    relative = policy(rules=[{"when": {"score": {"above_fpr": 0.01}}, "action": "block"}], on_error="warn")
    decision = Guard(sd_pipe, relative, audit_path=tmp_path / "a.jsonl").check(CAT)
    assert decision.action == "warn" and decision.rule == "on_error"
    assert "memguard calibrate --model" in decision.reason


def test_relative_thresholds_use_the_calibration(sd_pipe, tmp_path):
    from guard import Scorer, calibrate

    profile = calibrate(Scorer(sd_pipe), [CAT, DOG, CITY, "a dog", "a cat", "old man", "blue sky", "green tree"])
    path = profile.save(tmp_path / "profile.json")
    relative = policy(rules=[{"when": {"score": {"above_fpr": 0.2}}, "action": "block"}])
    guard = Guard(sd_pipe, relative, audit_path=tmp_path / "a.jsonl", calibration=path)
    decisions = guard.check_many([CAT, DOG, CITY, "a dog", "a cat", "old man", "blue sky", "green tree"])
    assert sum(d.action == "block" for d in decisions) == 1  # top 20% of 8 calibration prompts, strictly above
    assert all(d.calibration_id == profile.id for d in decisions)
    assert records(tmp_path / "a.jsonl")[0]["calibration"] == profile.id


def test_auto_calibration_is_computed_once_per_model(sd_pipe, tmp_path, monkeypatch):
    import guard.calibration.making as calibrate_module

    calls = []
    captions = [f"a {c} {o}" for c in ("red", "blue", "green", "old") for o in ("cat", "dog", "house", "tree", "boat")]

    def few_captions():
        calls.append(1)
        return captions

    monkeypatch.setattr(calibrate_module, "generic_captions", few_captions)
    relative = policy(calibration="auto", rules=[{"when": {"score": {"above_fpr": 0.1}}, "action": "warn"}])
    first = Guard(sd_pipe, relative, audit_path=tmp_path / "a.jsonl").check(CAT)
    second = Guard(sd_pipe, relative, audit_path=tmp_path / "a.jsonl").check(CAT)
    assert len(calls) == 1
    assert first.calibration_id == second.calibration_id is not None
    assert isinstance(CalibrationProfile, type)


def test_audit_path_precedence(sd_pipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env_path = tmp_path / "env.jsonl"
    monkeypatch.setenv("MEMGUARD_AUDIT_PATH", str(env_path))
    Guard(sd_pipe, policy(audit={"path": "policy.jsonl"})).check(CAT)
    assert env_path.exists() and not (tmp_path / "policy.jsonl").exists()
    Guard(sd_pipe, policy(audit={"path": "policy.jsonl"}), audit_path=tmp_path / "arg.jsonl").check(CAT)
    assert (tmp_path / "arg.jsonl").exists()
    monkeypatch.delenv("MEMGUARD_AUDIT_PATH")
    Guard(sd_pipe, policy(audit={"path": "policy.jsonl"})).check(CAT)
    assert (tmp_path / "policy.jsonl").exists()


def test_shipped_policy_by_name_on_the_fixture(sd_pipe, tmp_path, monkeypatch):
    import guard.calibration.making as calibrate_module

    monkeypatch.setattr(calibrate_module, "generic_captions", lambda: [f"a red cat {i}" for i in range(30)])
    guard = Guard(sd_pipe, "monitor", audit_path=tmp_path / "a.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemorizationWarning)
        out = generate(guard, CAT)
    assert out.memguard.decisions[0].action in ("allow", "warn")
    assert guard.policy.name == "monitor"


def test_calibration_argument_speaks_the_policy_modes(sd_pipe, tmp_path):
    """The failure this replaced: `Guard(calibration="auto")` was read as a file named auto, while the policy's
    `calibration: auto` is a mode. One vocabulary: a profile, its file, or auto / auto-strict / off."""
    from guard import Scorer, calibrate

    profile = calibrate(Scorer(sd_pipe), [CAT, DOG, CITY, "a dog", "a cat", "old man", "blue sky", "green tree"])
    path = profile.save(tmp_path / "profile.json")
    relative = policy(calibration=str(path), rules=[{"when": {"score": {"above_fpr": 0.2}}, "action": "warn"}])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the automatic calibration's caption-fit warning on this tiny vocabulary
        auto = Guard(sd_pipe, relative, calibration="auto", audit_path=tmp_path / "a.jsonl").check(CAT)
    assert auto.calibration_id is not None and auto.calibration_id != profile.id  # the automatic profile
    off = Guard(sd_pipe, relative, calibration="off", audit_path=tmp_path / "b.jsonl").check(CAT)
    assert off.rule == "on_error" and "no calibration" in off.reason
    from_file = Guard(sd_pipe, relative, audit_path=tmp_path / "c.jsonl").check(CAT)
    assert from_file.calibration_id == profile.id
