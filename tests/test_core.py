"""The judging core and the public API around it: write-ahead records, calibration checks, the call contract."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import guard
from guard import (
    CalibrationMismatch,
    Guard,
    GuardedOutput,
    MemguardError,
    Scorer,
    calibrate,
    verify_log,
)
from guard.audit.review import summarize

CAT, DOG = "a red cat on the beach", "a small dog in the garden"
CAPTIONS = [f"a {c} {o}" for c in ("red", "blue", "green", "old", "young") for o in ("cat", "dog", "house", "tree")]


def policy(**overrides):
    base = {"name": "test", "version": 1, "calibration": "off", "rules": [], "default": "allow"}
    base.update(overrides)
    return base


def relative_policy(**overrides):
    return policy(rules=[{"name": "top", "when": {"score": {"above_fpr": 0.1}}, "action": "block"}], on_error="warn",
                  **overrides)


def records(path):
    """The per-prompt records (decisions and outcomes), without provenance events such as policy_loaded."""
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] in ("decision", "error", "outcome")]


# ---------------------------------------------------------------- write-ahead audit


KILLED_MID_GENERATION = textwrap.dedent("""
    import os, signal, sys
    import torch
    from guard import Guard
    from guard.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline()
    guard = Guard(pipe, {"name": "p", "calibration": "off", "audit": {"fsync": True}}, audit_path=sys.argv[1])

    def die(pipe, step, timestep, tensors):
        if step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return tensors

    guard(prompt="a red cat on the beach", num_inference_steps=50, callback_on_step_end=die, output_type="latent")
""")


def test_a_process_killed_mid_generation_leaves_its_decision_on_disk(tmp_path):
    log = tmp_path / "audit.jsonl"
    run = subprocess.run([sys.executable, "-c", KILLED_MID_GENERATION, str(log)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    (decision,) = records(log)
    assert decision["event"] == "decision" and decision["action"] == "allow" and decision["outcome"] == "pending"
    assert verify_log(log).ok
    summary = summarize(log).to_dict()
    assert summary["without_outcome"]["count"] == 1
    assert summary["without_outcome"]["recent"][0]["request_id"] == decision["request_id"]


def test_decision_record_is_written_before_the_pipeline_runs(sd_pipe, tmp_path):
    log = tmp_path / "audit.jsonl"
    seen = []

    def look(pipe, step, timestep, tensors):
        if step == 0:
            seen.extend(records(log))
        return tensors

    out = Guard(sd_pipe, policy(), audit_path=log)(prompt=CAT, num_inference_steps=2, callback_on_step_end=look)
    assert [r["event"] for r in seen] == ["decision"] and seen[0]["outcome"] == "pending"
    decision, outcome = records(log)
    assert outcome["event"] == "outcome" and outcome["outcome"] == "generated"
    assert outcome["decision_hash"] == decision["hash"] and outcome["latency_generation_ms"] > 0
    assert out.memguard.outcomes == {0: "generated"}


def test_a_failing_generation_is_audited_as_failed(sd_pipe, tmp_path):
    log = tmp_path / "audit.jsonl"

    def explode(pipe, step, timestep, tensors):
        raise RuntimeError("out of memory (simulated)")

    with pytest.raises(RuntimeError, match="simulated"):
        Guard(sd_pipe, policy(), audit_path=log)(prompt=CAT, num_inference_steps=2, callback_on_step_end=explode)
    decision, outcome = records(log)
    assert outcome["outcome"] == "failed" and "simulated" in outcome["error"]["message"]


def test_unwritable_outcome_keeps_the_image(sd_pipe, tmp_path):
    log = tmp_path / "audit.jsonl"
    guarded = Guard(sd_pipe, policy(), audit_path=log)

    def lose_the_log(pipe, step, timestep, tensors):
        if step == 0:
            log.unlink()
            log.mkdir()  # the path is now a directory: appending the outcome fails
        return tensors

    with pytest.warns(UserWarning, match="outcome not audited"):
        out = guarded(prompt=CAT, num_inference_steps=2, output_type="np", callback_on_step_end=lose_the_log)
    assert out.images.shape[0] == 1 and out.memguard.audit_error.startswith("outcome not audited")


# ---------------------------------------------------------------- calibration that does not fit is an error


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("fingerprint", {"model": "sd2_pipe"}),
        ("steps", {"inference_steps": 25}),
        ("seed", {"seed": 7}),
        ("samples", {"samples": 2}),
        ("prediction_space", {"model": "sd2_pipe", "prediction_space": "native"}),
    ],
)
def test_a_calibration_measured_differently_is_a_clear_error(request, sd_pipe, sd2_pipe, tmp_path, name, settings):
    settings = dict(settings)
    measured_on = request.getfixturevalue(settings.pop("model", "sd_pipe"))
    profile = calibrate(Scorer(measured_on, **settings), CAPTIONS)
    path = profile.save(tmp_path / "profile.json")
    target = sd2_pipe if name == "prediction_space" else sd_pipe
    decision = Guard(target, relative_policy(), audit_path=tmp_path / "a.jsonl", calibration=path).check(CAT)
    assert decision.rule == "on_error" and decision.action == "warn"
    assert f"{name}: scores" in decision.reason and str(path) in decision.reason
    with pytest.raises(CalibrationMismatch, match=name):
        _ = Guard(target, relative_policy(), audit_path=tmp_path / "a.jsonl", calibration=path).calibration


def test_a_fitting_calibration_is_accepted(sd_pipe, tmp_path):
    path = calibrate(Scorer(sd_pipe), CAPTIONS).save(tmp_path / "profile.json")
    decision = Guard(sd_pipe, relative_policy(), audit_path=tmp_path / "a.jsonl", calibration=path).check(CAT)
    assert decision.rule in ("top", "default") and decision.calibration_id is not None


def test_unwritable_calibration_cache_warns_once_and_keeps_the_profile(sd_pipe, tmp_path, monkeypatch):
    import guard.calibration.making as making

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MEMGUARD_CACHE_DIR", str(blocker / "cache"))
    calls = []
    monkeypatch.setattr(making, "generic_captions", lambda: calls.append(1) or CAPTIONS)
    guarded = Guard(sd_pipe, relative_policy(calibration="auto"), audit_path=tmp_path / "a.jsonl")
    with pytest.warns(RuntimeWarning, match="could not cache the automatic calibration"):
        first = guarded.check(CAT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        second = guarded.check_many([CAT, DOG])
    assert len(calls) == 1
    assert first.calibration_id == second[0].calibration_id is not None


def test_auto_calibration_logs_progress_events(sd_pipe, tmp_path, monkeypatch, caplog):
    import guard.calibration.making as making

    monkeypatch.setattr(making, "generic_captions", lambda: CAPTIONS)
    with caplog.at_level(logging.INFO, logger="memguard"):
        Guard(sd_pipe, relative_policy(calibration="auto"), audit_path=tmp_path / "a.jsonl").check(CAT)
    events = [r.getMessage() for r in caplog.records if r.name == "memguard"]
    assert any("calibration_started" in e and f"prompts={len(CAPTIONS)}" in e for e in events)
    assert any("calibration_finished" in e for e in events)


# ---------------------------------------------------------------- the pipeline's own argument contract


def test_what_the_pipeline_refuses_is_refused_before_scoring(sd_pipe, tmp_path):
    log = tmp_path / "audit.jsonl"
    guarded = Guard(sd_pipe, policy(), audit_path=log)
    embeds, _ = sd_pipe.encode_prompt([CAT], "cpu", 1, False)
    with pytest.raises(ValueError, match="Cannot forward both `prompt`"):
        guarded(prompt=CAT, prompt_embeds=embeds, num_inference_steps=2)
    with pytest.raises(TypeError, match="unexpected keyword argument 'bogus'"):
        guarded(prompt=CAT, num_inference_steps=2, bogus=1)
    with pytest.raises(ValueError, match="num_images_per_prompt must be a positive integer"):
        guarded(prompt=CAT, num_inference_steps=2, num_images_per_prompt=0)
    with pytest.raises(ValueError, match="`height` and `width` have to be divisible by 8"):
        guarded(prompt=CAT, num_inference_steps=2, height=20)
    assert records(log) == []  # nothing decided: the log holds only the guard's policy_loaded record


def _diffusers_messages(run) -> list[str]:
    captured: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append(record.getMessage())

    handler = Keep()
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # the CLI tests quiet diffusers for the whole process
    try:
        run()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return captured


@pytest.mark.parametrize("mode", ["hash", "plain"])
def test_truncated_prompt_text_stays_out_of_logs_unless_plain(sd_pipe, tmp_path, mode):
    long_prompt = "a red cat on the beach " * 3 + "golden moon over the quiet lake"
    guarded = Guard(sd_pipe, policy(audit={"prompt": mode}), audit_path=tmp_path / "a.jsonl")
    messages = _diffusers_messages(lambda: guarded(prompt=long_prompt, num_inference_steps=2, output_type="latent"))
    quoted = [m for m in messages if "golden moon" in m]
    if mode == "plain":
        assert quoted, messages  # the library does print it: the redaction below is what stops it
    else:
        assert not quoted and any("redacted" in m for m in messages)


# ---------------------------------------------------------------- API hygiene


def test_every_memguard_exception_has_one_base_and_keeps_its_old_ones():
    from guard.audit import AuditRecordError, AuditWriteError
    from guard.engines import ScanError
    from guard.loading import ModelLoadError
    from guard.prompts_io import PromptFileError

    expected = {
        guard.PolicyError: ValueError, guard.CalibrationError: ValueError, guard.CalibrationMissing: ValueError,
        guard.CalibrationMismatch: ValueError, guard.ScoringError: RuntimeError,
        guard.UnsupportedPipelineError: TypeError, guard.NonFiniteScoreError: ValueError,
        guard.MemorizationBlocked: Exception, AuditWriteError: OSError, AuditRecordError: ValueError,
        ScanError: ValueError, ModelLoadError: RuntimeError, PromptFileError: ValueError,
    }
    for error, old_base in expected.items():
        assert issubclass(error, MemguardError) and issubclass(error, old_base), error


def test_guard_is_a_context_manager_and_closes_its_log(sd_pipe, tmp_path):
    with Guard(sd_pipe, policy(), audit_path=tmp_path / "a.jsonl") as guarded:
        guarded.check(CAT)
        sink = guarded.audit.sink
        assert sink._fd is not None
    assert sink._fd is None
    guarded.check(DOG)  # usable again: the log reopens (a policy_loaded record says so) and the chain continues
    assert verify_log(tmp_path / "a.jsonl").n_records == 4
    events = [json.loads(line)["event"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert events == ["policy_loaded", "decision", "policy_loaded", "decision"]


def test_call_returns_a_typed_result(sd_pipe, tmp_path):
    out = Guard(sd_pipe, policy(), audit_path=tmp_path / "a.jsonl")(
        prompt=CAT, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    assert isinstance(out, GuardedOutput) and out.images is out.output.images
    assert out.memguard.decisions[0].action == "allow" and not out.withheld
    raw = Guard(sd_pipe, policy(), audit_path=tmp_path / "b.jsonl")(
        prompt=CAT, num_inference_steps=2, output_type="np", return_dict=False)
    assert isinstance(raw, tuple) and raw[-1].decisions[0].action == "allow"


def test_one_version_source():
    from importlib.metadata import version

    assert guard.__version__ == version("memguard")


def test_profile_calibration_takes_the_weights_the_calibration_was_made_with(sd_pipe, tmp_path):
    """``profile: calibration``: one file carries a model's score weights (e.g. fitted by ``calibrate --mem``)
    and the thresholds measured with them; without a file, the family's weights (what auto calibration uses)."""
    path = calibrate(Scorer(sd_pipe, profile={"name": "fitted", "g_norm": 1.0, "g_cos": -0.5}), CAPTIONS).save(
        tmp_path / "fitted.json")
    rules = [{"name": "top", "when": {"score": {"above_fpr": 0.1}}, "action": "warn"}]
    for given in ({"calibration": str(path)}, {}):  # in the policy, or passed to the Guard
        settings = policy(profile="calibration", rules=rules, **given)
        with Guard(sd_pipe, settings, audit_path=tmp_path / "a.jsonl", calibration=None if given else path) as g:
            decision = g.check(CAT)
        assert (g.scorer.profile.g_norm, g.scorer.profile.g_cos) == (1.0, -0.5)
        assert decision.score.score == pytest.approx(decision.score.norm - 0.5 * decision.score.cos, abs=1e-6)
        assert decision.error is None and decision.thresholds  # the calibration fits the guard's measurement
    with pytest.raises(CalibrationMismatch):  # the same file under the family's weights does not fit
        _ = Guard(sd_pipe, policy(rules=rules), audit_path=tmp_path / "b.jsonl", calibration=path).core.calibration
    with Guard(sd_pipe, policy(profile="calibration"), audit_path=tmp_path / "c.jsonl") as family:
        assert (family.scorer.profile.g_norm, family.scorer.profile.g_cos) == (1.0, 2.0)  # sd1


def test_the_guard_says_which_calibration_is_in_force_and_why(sd_pipe, tmp_path):
    from guard import Scorer, calibrate

    profile = calibrate(Scorer(sd_pipe), ["a dog", "a cat", "old man", "blue sky"], progress=False)
    path = profile.save(tmp_path / "p.json")
    relative = {"name": "r", "calibration": "off", "rules": [{"when": {"score": {"above_fpr": 0.5}}, "action": "warn"}]}
    none = Guard(sd_pipe, relative, audit_path=tmp_path / "a.jsonl")
    none.check("a dog")
    assert none.core.calibrations.describe() == "no calibration (calibration: off)"
    given = Guard(sd_pipe, relative, calibration=path, audit_path=tmp_path / "b.jsonl")
    given.check("a dog")
    assert given.core.calibrations.describe() == f"calibration {profile.id}, from {path} (4 prompts)"
