"""Provenance records: which policy and calibration were in force for each decision, and who started them."""

from __future__ import annotations

import getpass
import json
import os

import pytest

from guard import Guard, Scorer, calibrate
from guard.audit import audit_context, verify_log
from guard.calibration import CalibrationError

PROMPTS = ["a photo of a cat", "red car on a street", "a dog in the garden", "old man with a hat",
           "blue sky over the sea", "green tree in a forest"]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def relative_policy():
    return {"name": "rel", "version": 4, "rules": [{"name": "top", "when": {"score": {"above_fpr": 0.2}},
                                                    "action": "block"}]}


def test_policy_loaded_names_the_rules_in_force_and_who_started_them(sd_pipe, tmp_path):
    log = tmp_path / "a.jsonl"
    with audit_context(key_id="ops-key"):
        guarded = Guard(sd_pipe, relative_policy() | {"calibration": "off", "rules": []}, audit_path=log,
                        source="cli")
    loaded = records(log)[0]
    assert loaded["event"] == "policy_loaded" and loaded["source"] == "cli"
    assert loaded["policy"] == {"name": "rel", "version": "4", "hash": guarded.policy.content_hash}
    assert loaded["policy_path"] is None and loaded["signing_key_id"] is None  # a mapping, not a file; unsigned
    assert loaded["actor"]["user"] == getpass.getuser() and loaded["actor"]["pid"] == os.getpid()
    assert loaded["actor"]["key_id"] == "ops-key" and loaded["context"]["key_id"] == "ops-key"


def test_calibration_loaded_and_switched(sd_pipe, tmp_path):
    first = calibrate(Scorer(sd_pipe), PROMPTS).save(tmp_path / "first.json")
    second = calibrate(Scorer(sd_pipe), PROMPTS[:4]).save(tmp_path / "second.json")
    log = tmp_path / "a.jsonl"
    guarded = Guard(sd_pipe, relative_policy(), audit_path=log, calibration=first)
    guarded.check(PROMPTS[0])
    guarded.check(PROMPTS[1])  # loaded once: no second record
    loaded = [r for r in records(log) if r["event"] == "calibration_loaded"]
    assert len(loaded) == 1
    first_id = guarded.calibration.id
    assert loaded[0]["calibration"] == first_id and loaded[0]["calibration_path"] == str(first)
    assert loaded[0]["origin"] == "file" and loaded[0]["previous"] is None
    guarded.core.use_calibration(second)
    decision = guarded.check(PROMPTS[2])
    switched = [r for r in records(log) if r["event"] == "calibration_loaded"][-1]
    assert switched["previous"] == first_id and switched["calibration"] == decision.calibration_id != first_id
    events = [r["event"] for r in records(log) if r["event"] != "calibration"]  # the drift monitor's own records
    assert events == ["policy_loaded", "calibration_loaded", "decision", "decision", "calibration_loaded", "decision"]
    assert verify_log(log)


def test_a_calibration_that_does_not_fit_is_refused_and_not_recorded(sd_pipe, tmp_path):
    fitting = calibrate(Scorer(sd_pipe), PROMPTS).save(tmp_path / "fit.json")
    other_seed = calibrate(Scorer(sd_pipe, seed=7), PROMPTS).save(tmp_path / "seed7.json")
    log = tmp_path / "a.jsonl"
    guarded = Guard(sd_pipe, relative_policy(), audit_path=log, calibration=fitting)
    kept = guarded.check(PROMPTS[0]).calibration_id
    with pytest.raises(CalibrationError):
        guarded.core.use_calibration(other_seed)
    assert guarded.check(PROMPTS[1]).calibration_id == kept
    assert sum(r["event"] == "calibration_loaded" for r in records(log)) == 1


def test_the_record_module_names_every_record_kind():
    """``guard/audit/record.py``'s docstring and docs/architecture.md are where a reader learns the kinds: they
    must list every kind a log can hold (0.2 listed 6 of 9)."""
    from pathlib import Path

    import guard.audit.record as record

    architecture = (Path(__file__).resolve().parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    for kind in record.RECORD_MODELS:
        assert f"``{kind}``" in record.__doc__, kind
        assert f"`{kind}`" in architecture, kind
