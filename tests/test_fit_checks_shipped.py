"""The fit check of the running guard on the shipped memorizer: quiet where the thresholds hold, loud where not.

The shipped calibration was made from calib.txt; the model's own held-out captions (nmem.txt) differ from them a
little in the body (medians 1.961 vs 2.018; a KS test on the first 200 gives p < 0.001), but every threshold of
the balanced policy holds its promise on them. The automatic calibration (generic captions, most of whose words
the model's 151-word vocabulary does not know) puts the thresholds inside the traffic's tail: the block rule
(above_fpr 0.001) is crossed by several percent of the same captions.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from guard.assets import SHIPPED_MODEL, shipped_calibration_path
from guard.calibration import CalibrationProfile
from guard.calibration.checks import distribution_fit
from guard.prompts_io import read_prompts

PROMPTS = Path(__file__).resolve().parents[1] / "benchmarks" / "memorizer" / "prompts"


@pytest.fixture(scope="module")
def shipped_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _serve(pipe, calibration, log: Path) -> tuple[list[str], list[dict], object]:
    """The balanced policy judges the held-out captions (and 6 memorized prompts); warnings and audit records."""
    from guard import Guard

    traffic = read_prompts(PROMPTS / "nmem.txt")
    memorized = read_prompts(PROMPTS / "mem.txt")[-6:]  # duplicated 200 times in training
    traffic = traffic[:100] + memorized[:3] + traffic[100:200] + memorized[3:] + traffic[200:]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard = Guard(pipe, "balanced", calibration=calibration, audit_path=log)
        for start in range(0, len(traffic), 50):
            guard.check_many(traffic[start:start + 50])
        guard.close()
    messages = [str(w.message) for w in caught if "memguard" in str(w.message)]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return messages, records, guard


def test_no_warning_on_the_shipped_models_own_held_out_captions(shipped_pipe, tmp_path):
    messages, records, guard = _serve(shipped_pipe, shipped_calibration_path(), tmp_path / "own.jsonl")
    assert not [m for m in messages if "calibration" in m], messages
    assert guard.core.monitor.problems == {}
    assert not [r for r in records if r["event"] == "calibration_mismatch"]
    # the old check (two-sample KS, p < 0.001) fired here: the body differs, the thresholds do not care
    first = [r["score"] for r in records if r["event"] == "decision"][:200]
    profile = CalibrationProfile.load(shipped_calibration_path())
    assert distribution_fit(first, profile.scores).p_value < 0.001


def test_warning_on_the_hidden_vocabulary_case(shipped_pipe, tmp_path):
    messages, records, guard = _serve(shipped_pipe, None, tmp_path / "auto.jsonl")  # calibration: auto
    assert guard.core.calibration.source.startswith("generic")
    assert set(guard.core.monitor.problems) == {"caption_fit", "score_distribution"}
    fit = next(m for m in messages if "cross the policy's thresholds" in m)
    assert "block-memorized" in fit and "too many" in fit and "memguard calibrate" in fit
    (record,) = [r for r in records if r["event"] == "calibration_mismatch" and r["check"] == "score_distribution"]
    block = next(t for t in record["details"]["thresholds"] if t["rule"] == "block-memorized")
    assert block["verdict"] == "too many" and block["observed_low"] > block["promised_high"]
    assert block["crossed"] / block["n"] > 0.03  # promised about 0.2%
    assert record["details"]["n"] == 200 and record["details"]["counted"] < 200  # the memorized ones left out
