"""``memguard calibrate`` on a tiny saved pipeline: profile, resume, determinism, policy, fitted weights."""

import json
import random

import pytest
from click.testing import CliRunner

from guard.calibration import CalibrationProfile
from guard.cli import main
from guard.policy import load_policy
from guard.testing import DEFAULT_WORDS


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from guard.testing import tiny_sd_pipeline

    root = tmp_path_factory.mktemp("calibrate")
    tiny_sd_pipeline("epsilon").save_pretrained(root / "model")
    rng = random.Random(0)
    words = list(DEFAULT_WORDS)
    (root / "nmem.txt").write_text("\n".join(" ".join(rng.choices(words, k=5)) for _ in range(20)) + "\n")
    (root / "mem.txt").write_text("\n".join(" ".join(rng.choices(words[:8], k=8)) for _ in range(10)) + "\n")
    return root


def _run(files, out, *extra, expect=0):
    args = ["calibrate", "--model", str(files / "model"), "--nmem", str(files / "nmem.txt"), "--out", str(out),
            "--batch-size", "4", "--device", "cpu", "--no-progress", *extra]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == expect, result.output
    return result


@pytest.fixture(scope="module")
def full(files):
    """One uninterrupted run, also writing a policy."""
    out, policy_path = files / "full" / "cal.json", files / "policies" / "mine.yaml"
    result = _run(files, out, "--policy-out", str(policy_path), "--fprs", "0.05,0.1,0.3")
    return out, policy_path, result.output


def test_profile_is_written_and_consistent(files, full):
    out, _, output = full
    profile = CalibrationProfile.load(out)
    assert profile.n_prompts == 20 and profile.profile == "sd1" and (profile.g_norm, profile.g_cos) == (1.0, 2.0)
    assert profile.norms is not None and profile.coses is not None
    for fpr in (0.05, 0.1, 0.3):
        threshold = profile.threshold_at_fpr(fpr)
        assert sum(s > threshold for s in profile.scores) / 20 <= fpr
        assert f"threshold at FPR {fpr:g}: {threshold:.6g}" in output
    assert not out.with_name("cal.json.partial.jsonl").exists()


def test_resume_after_interruption_is_identical(files, full, tmp_path, monkeypatch):
    from guard.scoring import Scorer

    uninterrupted = CalibrationProfile.load(full[0])

    original, calls = Scorer.score, []

    def interrupted(self, prompts, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, prompts, **kwargs)

    monkeypatch.setattr(Scorer, "score", interrupted)
    out = tmp_path / "resumed.json"
    _run(files, out, expect=1)
    partial = tmp_path / "resumed.json.partial.jsonl"
    lines = partial.read_text().splitlines()
    assert len(lines) == 1 + 2 * 4 and not out.exists()
    with partial.open("a") as handle:
        handle.write('{"set": "nmem", "index": 8, "pro')  # torn write at the moment of the interruption

    calls.clear()
    monkeypatch.setattr(Scorer, "score", lambda self, p, **k: (calls.append(len(p)), original(self, p, **k))[1])
    _run(files, out)
    assert sum(calls) == 20 - 8
    resumed = CalibrationProfile.load(out)
    assert resumed.id == uninterrupted.id
    assert resumed.scores == uninterrupted.scores and resumed.norms == uninterrupted.norms


def test_changed_settings_do_not_reuse_partial_scores(files, tmp_path):
    out = tmp_path / "cal.json"
    partial = tmp_path / "cal.json.partial.jsonl"
    partial.write_text(json.dumps({"settings": {"seed": 0}}) + "\n"
                       + json.dumps({"set": "nmem", "index": 0, "prompt": "x", "norm": 9e9, "cos": 0}) + "\n")
    _run(files, out)
    assert max(CalibrationProfile.load(out).scores) < 1e9


def test_policy_out_loads_with_absolute_thresholds(full):
    out, policy_path, _ = full
    policy = load_policy(policy_path)
    profile = CalibrationProfile.load(out)
    assert [r.action for r in policy.rules] == ["block", "rewrite", "warn"]
    assert not policy.uses_relative_thresholds
    assert policy.calibration_path.resolve() == out.resolve()
    for rule, fpr in zip(policy.rules, (0.05, 0.1, 0.3)):
        bound = rule.when.score.gte
        flagged = sum(s >= bound for s in profile.scores) / len(profile.scores)
        assert flagged == sum(s > profile.threshold_at_fpr(fpr) for s in profile.scores) / len(profile.scores)
        assert flagged <= fpr


def test_mem_reports_reference_and_fitted_weights_and_plots(files, tmp_path):
    out, plot = tmp_path / "cal.json", tmp_path / "roc.png"
    result = _run(files, out, "--mem", str(files / "mem.txt"), "--plot", str(plot), "--folds", "3")
    rows = [line.split() for line in result.output.splitlines() if line.startswith(("reference ", "fitted "))]
    assert {(r[0], r[3]) for r in rows} == {("reference", "all"), ("reference", "3-fold"),
                                           ("fitted", "all"), ("fitted", "3-fold")}
    assert "AUROC" in result.output and "TPR@1%" in result.output and "TPR@3%" in result.output
    report = json.loads((tmp_path / "cal.json.weights.json").read_text())
    assert report["reference"] == [1.0, 2.0] and len(report["fitted"]) == 2
    assert report["chosen"] in ("reference", "fitted")
    profile = CalibrationProfile.load(out)
    used = report["fitted"] if report["chosen"] == "fitted" else report["reference"]
    assert [profile.g_norm, profile.g_cos] == used
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_are_one_line(files, tmp_path):
    missing_model = CliRunner().invoke(main, ["calibrate", "--model", str(tmp_path / "nope"), "--out",
                                              str(tmp_path / "c.json"), "--nmem", str(files / "nmem.txt")])
    assert missing_model.exit_code == 1
    assert missing_model.output.strip().count("\n") == 0 and "cannot load model" in missing_model.output
    missing_prompts = CliRunner().invoke(main, ["calibrate", "--model", str(files / "model"), "--out",
                                                str(tmp_path / "c.json"), "--nmem", str(tmp_path / "none.txt")])
    assert missing_prompts.exit_code == 1 and missing_prompts.output.strip().count("\n") == 0
    assert "prompt file not found" in missing_prompts.output
    bad_fprs = CliRunner().invoke(main, ["calibrate", "--model", str(files / "model"), "--out",
                                         str(tmp_path / "c.json"), "--fprs", "2"])
    assert bad_fprs.exit_code == 2 and "--fprs" in bad_fprs.output


def test_help_is_complete():
    text = CliRunner().invoke(main, ["calibrate", "--help"]).output
    for option in ("--model", "--nmem", "--mem", "--out", "--samples", "--seed", "--batch-size", "--device",
                   "--profile", "--plot", "--policy-out", "--fprs", "--weights"):
        assert option in text
