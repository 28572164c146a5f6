"""``memguard calibrate --from-audit`` on real logs of the shipped memorizer with memorized traffic mixed in.

Real audit logs, written by a real ``Guard`` scoring the traffic: 300 ordinary captions of calib.txt with
memorized captions (duplicated 16 times or more in training) at 2.5% and 10% of the traffic, logged under a
rule-less policy (nothing blocked), under ``balanced`` with the shipped calibration (it blocks what it catches)
and under ``balanced`` with ``calibration: auto`` (on this 151-word vocabulary it flags ordinary prompts too).
The default command must give thresholds with which ``strict`` and ``balanced`` stop as many held-out memorized
prompts as a profile made from the ordinary prompts alone (within 1), and say what it excluded. The mild
memorizer is the hard case: its memorized prompts start just above the ordinary tail.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from guard.assets import SHIPPED_MODEL, shipped_calibration_path
from guard.audit.from_audit import profile_from_audit
from guard.calibration import CalibrationProfile
from guard.cli import main
from guard.policy import decide, load_policy
from guard.prompts_io import read_prompts

PROMPTS = Path(__file__).resolve().parents[1] / "benchmarks" / "memorizer" / "prompts"
RULELESS = {"name": "log-only", "calibration": "off", "rules": [], "default": "allow", "audit": {"prompt": "hash"}}


def _memorized() -> list[str]:
    rows = [line.split("\t") for line in (PROMPTS / "mem_levels.tsv").read_text().splitlines()[1:] if line.strip()]
    return [row[0] for row in rows if int(row[1]) >= 16]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Logs of contaminated traffic, the clean profile, and scores of held-out memorized prompts."""
    from diffusers import StableDiffusionPipeline

    from guard import Guard, calibrate
    from guard.scoring import Scorer

    root = tmp_path_factory.mktemp("from-audit-shipped")
    pipe = StableDiffusionPipeline.from_pretrained(SHIPPED_MODEL)
    pipe.set_progress_bar_config(disable=True)
    ordinary = read_prompts(PROMPTS / "calib.txt")[:300]
    memorized = _memorized()
    logged, held_out = memorized[0::2], memorized[1::2]
    logs = {}
    for name, policy, calibration, share in (("ruleless-10", RULELESS, None, 0.10),
                                             ("balanced-10", "balanced", shipped_calibration_path(), 0.10),
                                             ("balanced-2.5", "balanced", shipped_calibration_path(), 0.025),
                                             ("auto-2.5", "balanced", None, 0.025)):
        count = round(share * len(ordinary) / (1 - share))
        traffic = ordinary + [logged[i % len(logged)] for i in range(count)]
        random.Random(name).shuffle(traffic)
        logs[name] = root / f"{name}.jsonl"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the automatic calibration's fit warnings: tested in test_drift
            guard = Guard(pipe, policy, audit_path=logs[name], calibration=calibration)
            for start in range(0, len(traffic), 64):
                guard.check_many(traffic[start:start + 64])
            guard.close()
    scorer = Scorer(pipe)  # the family's weights (sd1), those of the shipped calibration and of every log here
    clean = calibrate(scorer, ordinary, source="ordinary", progress=False)
    return root, logs, clean, scorer.score(held_out)


def _stopped(policy: str, scores, profile) -> int:
    rules = load_policy(policy)
    return sum(decide(rules, s, "p", profile).action in ("block", "rewrite") for s in scores)


def _default(root: Path, log: Path) -> tuple[CalibrationProfile, str]:
    out = root / (log.stem + "-profile.json")
    result = CliRunner().invoke(main, ["calibrate", "--from-audit", str(log), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return CalibrationProfile.load(out), result.output


@pytest.mark.parametrize("name", ["ruleless-10", "balanced-10", "balanced-2.5", "auto-2.5"])
def test_default_from_audit_stops_as_many_memorized_prompts_as_a_clean_profile(shipped, name):
    root, logs, clean, held_out = shipped
    profile, output = _default(root, logs[name])
    for policy in ("strict", "balanced"):
        assert _stopped(policy, held_out, profile) >= _stopped(policy, held_out, clean) - 1, (policy, output)
    assert _stopped("strict", held_out, clean) >= len(held_out) - 1  # the clean profile does stop them
    # it says what it excluded and how many memorized records may be left above each threshold
    assert "as likely memorized" in output and "fences on the log's records" in output
    assert output.count("may be memorized (estimated from the spread of the excluded records)") == 3


def test_without_exclusion_the_memorized_tenth_raises_the_thresholds(shipped):
    """What the default guards against (the test above fails with no fence): the 2% threshold among them."""
    root, logs, clean, held_out = shipped
    unfenced = profile_from_audit(logs["ruleless-10"], fence=None).profile
    assert unfenced.threshold_at_fpr(0.02) > clean.threshold_at_fpr(0.02) + 0.3
    assert _stopped("strict", held_out, unfenced) < _stopped("strict", held_out, clean) - 3


def test_blocked_memorized_traffic_is_excluded_whether_or_not_it_was_blocked(shipped):
    root, logs, clean, held_out = shipped
    ruleless = profile_from_audit(logs["ruleless-10"])
    balanced = profile_from_audit(logs["balanced-10"])
    memorized_records = round(0.10 * 300 / 0.9)
    for made in (ruleless, balanced):
        assert sum(made.excluded.values()) >= memorized_records - 3
        assert made.profile.threshold_at_fpr(0.02) <= clean.threshold_at_fpr(0.02) + 0.05
    assert balanced.fence == pytest.approx(ruleless.fence)  # the decisions do not move the default


def test_decisions_exclude_only_where_the_logging_calibration_fits(shipped):
    root, logs, clean, held_out = shipped
    trusted = profile_from_audit(logs["balanced-2.5"], exclude_actions=["block"])
    (check,) = trusted.decisions
    assert check.consistent and check.promised is not None
    wrong = profile_from_audit(logs["auto-2.5"], exclude_actions=["block"])
    (check,) = wrong.decisions
    assert not check.consistent and check.within_body > 5  # auto calibration blocked ordinary prompts
    assert not any(reason.startswith("with action") for reason in wrong.excluded)
    assert any("NOT excluded by decision" in line for line in wrong.lines())
    assert wrong.profile.threshold_at_fpr(0.02) == profile_from_audit(logs["auto-2.5"]).profile.threshold_at_fpr(0.02)
