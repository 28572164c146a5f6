"""Errors anywhere in the action phase become the policy's decision, audited: nothing escapes ``guard(...)`` but
``MemorizationBlocked`` (under ``block_mode: raise``) and the pipeline's own failure of an ordinary generation.

Each test injects one failure at one stage of a rewrite (the call's noise, the probes, the verification
calibration, a rung's optimisation, a candidate generation, the release, the release's second verification) or of
the records, and checks what the caller gets and what the log says.
"""

from __future__ import annotations

import json

import pytest
import torch

from guard import Guard, MemorizationBlocked, MemorizationWarning, verify_log
from guard.guard import PipelineGenerator
from guard.scoring import Scorer

CAT, DOG = "a red cat on the beach", "a small dog in the garden"


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def outcomes(path) -> list[dict]:
    return [r for r in records(path) if r["event"] == "outcome"]


def rewrite_rule(name="rewrite-all", *, when=None, verify=None, ladder=("guidance_schedule", "prompt_embedding"),
                 fallback="block"):
    return {"name": name, "when": when or {"score": {"gte": -1e9}}, "action": "rewrite",
            "rewrite": {"ladder": list(ladder), "target": {"score": -1e9}, "max_steps": 2,
                        "verify": verify if verify is not None else {"max_similarity": 1.0}, "fallback": fallback}}


def policy(*rules, **extra):
    return {"name": "fail-closed", "calibration": "off", "rules": list(rules), "default": "allow", **extra}


def call(guard, prompt, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("output_type", "latent")
    return guard(prompt=prompt, generator=torch.Generator("cpu").manual_seed(0), **kwargs)


def fail_jobs(monkeypatch, when):
    """Make the diffusers front end's generator raise for the jobs ``when(job)`` picks."""
    original = PipelineGenerator.__call__

    def generate(self, job):
        if when(job):
            raise RuntimeError("injected generation failure")
        return original(self, job)

    monkeypatch.setattr(PipelineGenerator, "__call__", generate)


def assert_audited(log, *, outcome, error_type=None, action=None):
    """One decision and one outcome record per prompt, chained, the chain intact, the outcome as expected."""
    decided = [r for r in records(log) if r["event"] in ("decision", "error")]
    done = outcomes(log)
    assert len(decided) == len(done) >= 1
    assert [r["decision_hash"] for r in done] == [r["hash"] for r in decided]
    assert all(r["outcome"] == outcome for r in done), [r["outcome"] for r in done]
    if action is not None:
        assert all(r["action"] == action for r in done)
    if error_type is not None:
        assert all((r["error"] or {}).get("type") == error_type for r in done), [r["error"] for r in done]
    assert verify_log(log).ok


def test_the_call_noise_cannot_be_drawn(sd_pipe, tmp_path, monkeypatch):
    log = tmp_path / "a.jsonl"
    monkeypatch.setattr(PipelineGenerator, "initial_noise", lambda self: (_ for _ in ()).throw(
        RuntimeError("injected noise failure")))
    with pytest.raises(MemorizationBlocked, match="rewrite failed: RuntimeError: injected noise failure"):
        call(Guard(sd_pipe, policy(rewrite_rule()), audit_path=log), CAT)
    assert_audited(log, outcome="blocked", error_type="RuntimeError", action="block")


def test_the_probes_fail(sd_pipe, tmp_path, monkeypatch):
    log = tmp_path / "a.jsonl"
    fail_jobs(monkeypatch, lambda job: job.kind == "internal" and job.steps is not None)
    with pytest.raises(MemorizationBlocked, match="injected generation failure"):
        call(Guard(sd_pipe, policy(rewrite_rule()), audit_path=log), CAT)
    assert_audited(log, outcome="blocked", error_type="RuntimeError", action="block")


def test_the_fallback_can_let_the_unchanged_prompt_through(sd_pipe, tmp_path, monkeypatch):
    log = tmp_path / "a.jsonl"
    fail_jobs(monkeypatch, lambda job: job.kind == "internal" and job.steps is not None)
    with pytest.warns(MemorizationWarning, match="rewrite failed"):
        out = call(Guard(sd_pipe, policy(rewrite_rule(fallback="warn")), audit_path=log), CAT)
    assert torch.equal(out.images, call(sd_pipe, CAT).images)  # the call as the caller made it
    assert_audited(log, outcome="generated", error_type="RuntimeError", action="warn")


def test_the_verification_calibration_cannot_be_measured(sd_pipe, tmp_path, monkeypatch):
    import guard.core

    def broken(*args, **kwargs):
        raise RuntimeError("injected calibration failure")

    monkeypatch.setattr(guard.core, "auto_verification", broken)
    log = tmp_path / "a.jsonl"
    rule = rewrite_rule(verify={"above_fpr": 0.05, "probe_steps": 2})
    with pytest.raises(MemorizationBlocked, match="verification calibration failed: RuntimeError"):
        call(Guard(sd_pipe, policy(rule, calibration="auto"), audit_path=log), CAT)
    decided = [r for r in records(log) if r["event"] in ("decision", "error")]
    assert decided[0]["action"] == "rewrite"  # decided before acting; the outcome says what became of it
    (done,) = outcomes(log)
    assert done["outcome"] == "blocked" and done["action"] == "block" and "on_error" in done["reason"]
    assert verify_log(log).ok


def test_a_rung_whose_optimisation_fails_is_skipped(sd_pipe, tmp_path, monkeypatch):
    import guard.actions.ladder as ladder

    def broken(*args, **kwargs):
        raise FloatingPointError("injected optimisation failure")

    monkeypatch.setattr(ladder, "mitigate_prompt_embedding", broken)
    log = tmp_path / "a.jsonl"
    guard = Guard(sd_pipe, policy(rewrite_rule(ladder=("prompt_embedding", "guidance_schedule"))), audit_path=log)
    out = call(guard, CAT)
    first, second = out.memguard.mitigations[0].rungs
    assert not first.ran and "FloatingPointError: injected optimisation failure" in first.note
    assert second.ran and second.verified and out.memguard.mitigations[0].released == "guidance_schedule"
    assert_audited(log, outcome="rewritten", action="rewrite")


def test_a_candidate_generation_fails(sd_pipe, tmp_path, monkeypatch):
    log = tmp_path / "a.jsonl"
    fail_jobs(monkeypatch, lambda job: job.kind == "release" and job.latents is not None)
    with pytest.raises(MemorizationBlocked, match="rewrite failed: RuntimeError: injected generation failure"):
        call(Guard(sd_pipe, policy(rewrite_rule()), audit_path=log), CAT)
    assert_audited(log, outcome="blocked", error_type="RuntimeError", action="block")


@pytest.fixture(scope="module")
def split(sd_pipe):
    """A score between CAT's and DOG's: rules on either side of it rewrite one and not the other."""
    low, high = sorted(Scorer(sd_pipe).score([CAT, DOG]), key=lambda s: s.score)
    return low.prompt, high.prompt, (low.score + high.score) / 2


def two_rules(middle):
    """The higher prompt's rewrite always verifies; the lower one's never does (it falls back to block)."""
    return policy(rewrite_rule("passes", when={"score": {"gte": middle}}, ladder=("guidance_schedule",)),
                  rewrite_rule("fails", when={"score": {"lt": middle}}, ladder=("guidance_schedule",),
                               verify={"max_similarity": -1.0}),
                  batch="drop_blocked")


def test_the_release_of_a_verified_rewrite_fails(sd_pipe, tmp_path, monkeypatch, split):
    """The ladder generated both prompts; one fell back to block, so the release is a generation of its own."""
    low, high, middle = split
    log = tmp_path / "a.jsonl"
    fail_jobs(monkeypatch, lambda job: job.kind == "release" and job.rows == 1)
    with pytest.raises(MemorizationBlocked, match="generating the rewritten image failed: RuntimeError"):
        call(Guard(sd_pipe, two_rules(middle), audit_path=log), [high, low])
    done = outcomes(log)
    assert [r["outcome"] for r in done] == ["blocked", "blocked"] and all(r["action"] == "block" for r in done)
    assert done[0]["error"]["type"] == "RuntimeError" and done[1]["error"] is None
    assert verify_log(log).ok


def test_the_release_that_no_longer_verifies_is_not_released(sd_pipe, tmp_path, monkeypatch, split):
    import guard.actions.ladder as ladder

    low, high, middle = split
    monkeypatch.setattr(ladder.LadderState, "still_verified", lambda self, result, prompts, per: list(prompts))
    log = tmp_path / "a.jsonl"
    with pytest.raises(MemorizationBlocked, match="did not pass verification again"):
        call(Guard(sd_pipe, two_rules(middle), audit_path=log), [high, low])
    assert [r["outcome"] for r in outcomes(log)] == ["blocked", "blocked"]
    assert verify_log(log).ok


def test_an_ordinary_generation_failure_is_the_pipeline_own_and_is_recorded(sd_pipe, tmp_path, monkeypatch):
    log = tmp_path / "a.jsonl"
    fail_jobs(monkeypatch, lambda job: True)
    with pytest.raises(RuntimeError, match="injected generation failure"):
        call(Guard(sd_pipe, policy(), audit_path=log), CAT)
    assert_audited(log, outcome="failed", error_type="RuntimeError", action="allow")


def test_a_record_the_log_refuses_after_a_partial_write_fails_closed(sd_pipe, tmp_path, monkeypatch):
    """The logger can refuse a record (schema, signing) after others of the request were written: no prompt of the
    request may then be acted on."""
    from guard.audit import AuditLogger

    original = AuditLogger.log_decision
    seen = []

    def second_refused(self, decision, **fields):
        seen.append(decision.prompt_index)
        if len(seen) == 2:
            raise ValueError("injected record refusal")
        return original(self, decision, **fields)

    monkeypatch.setattr(AuditLogger, "log_decision", second_refused)
    log = tmp_path / "a.jsonl"
    with pytest.warns(UserWarning, match="not audited"), pytest.raises(MemorizationBlocked,
                                                                         match="audit log not writable"):
        call(Guard(sd_pipe, policy(), audit_path=log), [CAT, DOG])
    assert [r["outcome"] for r in outcomes(log)] == ["blocked", "blocked"]
