"""The shipped memorizing model: it loads through diffusers' normal path, the demo runs, its calibration fits."""

import json

import pytest
from click.testing import CliRunner

from guard.assets import SHIPPED_MODEL, shipped_calibration_path
from guard.calibration import CalibrationProfile
from guard.cli import main
from guard.scoring import Scorer


@pytest.fixture(scope="module")
def shipped_pipe():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def demo_prompts():
    return json.loads((SHIPPED_MODEL / "demo_prompts.json").read_text())


def test_shipped_model_loads_and_uses_the_reference_timesteps(shipped_pipe):
    scorer = Scorer(shipped_pipe)
    assert (scorer.t_hi, scorer.t_lo) == (981, 41)
    assert scorer.profile.name == "sd1" and scorer.adapter.latent_shape == (4, 16, 16)


def test_shipped_calibration_belongs_to_the_shipped_model(shipped_pipe):
    profile = CalibrationProfile.load(shipped_calibration_path())
    scorer = Scorer(shipped_pipe)
    assert profile.model_fingerprint == scorer.adapter.fingerprint()
    assert (profile.g_norm, profile.g_cos, profile.seed, profile.samples) == (1.0, 2.0, 51, 1)
    assert profile.n_prompts >= 500


def test_most_duplicated_captions_score_above_unseen_ones(shipped_pipe):
    prompts = demo_prompts()
    scorer = Scorer(shipped_pipe)
    memorized = [r.score for r in scorer.score(prompts["memorized"][:2])]  # the 200-copy captions
    profile = CalibrationProfile.load(shipped_calibration_path())
    assert min(memorized) > profile.threshold_at_fpr(0.05)


def test_demo_runs_and_audits(tmp_path):
    log = tmp_path / "demo.jsonl"
    result = CliRunner().invoke(main, ["demo", "--audit", str(log)])
    assert result.exit_code == 0, result.output
    assert "trained 200x" in result.output and "unseen" in result.output
    assert "intact" in result.output
    prompts = demo_prompts()
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events.count("decision") == len(prompts["memorized"]) + len(prompts["unseen"])
    assert "calibration" in events  # the calibration taken into use is recorded
