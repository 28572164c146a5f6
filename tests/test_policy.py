import math
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from guard.calibration import (
    CalibrationError,
    CalibrationMismatch,
    CalibrationMissing,
    CalibrationProfile,
    cached_calibration_path,
)
from guard.data import generic_captions
from guard.policy import (
    PolicyError,
    decide,
    decide_on_error,
    load_policy,
    match_lists,
    normalize_prompt,
    shipped_policies,
)
from guard.scoring.result import MemorizationScore

ROOT = Path(__file__).resolve().parents[1]


def make_score(score: float, norm: float = 1.0, cos: float = 0.1, **kw) -> MemorizationScore:
    fields = dict(g_norm=1.0, g_cos=2.0, profile="sd1", t_hi=981, t_lo=41, samples=1, seed=51)
    fields.update(kw)
    return MemorizationScore(prompt="p", norm=norm, cos=cos, score=score, prediction_space="eps", **fields)


def make_calibration(n: int = 1000, **kw) -> CalibrationProfile:
    args = dict(
        fingerprint="abc123",
        model_class="StableDiffusionPipeline",
        profile="sd1",
        g_norm=1.0,
        g_cos=2.0,
        seed=51,
        samples=1,
        steps=50,
        prediction_space="eps",
        source="test",
    )
    args.update(kw)
    return CalibrationProfile.from_scores([i / 100 for i in range(n)], **args)


@pytest.mark.parametrize("name", ["strict", "balanced", "monitor"])
def test_shipped_policy_loads_by_name_and_path(name):
    by_name = load_policy(name)
    by_path = load_policy(ROOT / "policies" / f"{name}.yaml")
    assert by_name.name == name
    assert by_name.content_hash == by_path.content_hash
    assert by_name.calibration == "auto"
    assert by_name.uses_relative_thresholds
    assert load_policy(by_name) is by_name


def test_monitor_never_blocks():
    policy = load_policy("monitor")
    assert policy.on_error != "block" and policy.default != "block"
    assert {r.action for r in policy.rules} <= {"warn", "allow"}


def test_shipped_names_listed():
    assert {"strict", "balanced", "monitor"} <= set(shipped_policies())


BASE = "name: t\n"
MALFORMED = [
    (
        "rules:\n  - {when: {score: {gte: 1}}, action: allow}\n  - {when: {score: {gte: 2}}, action: warn}\n"
        "  - {when: {score: {gte: abc}}, action: block}\n",
        "rules[2].when.score.gte: input should be a valid number",
    ),
    ("rules:\n  - {when: {score: {gte: 1}}, action: explode}\n", "rules[0].action: input should be"),
    (
        "rules:\n  - {when: {scroe: {gte: 1}}, action: block}\n",
        "rules[0].when.scroe: unknown field; did you mean 'score'",
    ),
    ("rules:\n  - {when: {}, action: block}\n", "rules[0].when: give at least one condition"),
    ("rules:\n  - {when: {score: {gte: 1, gt: 2}}, action: block}\n", "rules[0].when.score: gte and gt are both"),
    (
        "rules:\n  - {when: {score: {above_fpr: 1.5}}, action: block}\n",
        "rules[0].when.score.above_fpr: input should be less",
    ),
    ("rules:\n  - {when: {score: {gte: .inf}}, action: block}\n", "rules[0].when.score.gte: input should be a finite"),
    ("rules:\n  - {when: {score: {gte: 5, lte: 3}}, action: block}\n", "rules[0].when.score: no value satisfies"),
    (
        "rules:\n  - {when: {score: {gte: 5}}, action: block, rewrite: {max_steps: 3}}\n",
        "rules[0]: rewrite settings are only allowed with action: rewrite",
    ),
    (
        "rules:\n  - {when: {score: {gte: 5}}, action: rewrite, rewrite: {method: magic}}\n",
        "rules[0].rewrite.method: input should be",
    ),
    (
        "rules:\n  - {when: {score: {gte: 5}}, action: rewrite, rewrite: {target: {}}}\n",
        "rules[0].rewrite.target: give exactly one of score, above_fpr",
    ),
    ("rules:\n  - {when: {norm: {gte: 5}}, action: rewrite}\n", "rules[0]: rewrite.target is required"),
    ("on_error: rewrite\n", "on_error: input should be"),
    ("audit: {prompt: shout}\n", "audit.prompt: input should be 'hash', 'redact' or 'plain'"),
    ("audti: {}\n", "audti: unknown field; did you mean 'audit'"),
    ("profile: {g_norm: 1.0}\n", "profile.g_cos: field required"),
    ("profile: 'sd 1!'\n", "profile: not a profile name"),
    ("lists: {always_block: [A cat], always_allow: ['a cat.']}\n", "lists: prompts in both"),
    ("scoring: {samples: 0}\n", "scoring.samples: input should be greater than or equal to 1"),
]


@pytest.mark.parametrize("body,expected", MALFORMED)
def test_malformed_policy_names_file_field_and_reason(tmp_path, body, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(BASE + body)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert f"bad.yaml: {expected}" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_name_field(tmp_path):
    path = tmp_path / "noname.yaml"
    path.write_text("rules: []\n")
    with pytest.raises(PolicyError, match="noname.yaml: name: field required"):
        load_policy(path)


def test_yaml_errors_and_top_level(tmp_path):
    bad = tmp_path / "syntax.yaml"
    bad.write_text("name: x\nrules: [\n  {when: \n")
    with pytest.raises(PolicyError, match=r"syntax.yaml: invalid YAML: line \d+"):
        load_policy(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(PolicyError, match="list.yaml: the top level must be a mapping"):
        load_policy(listy)
    with pytest.raises(PolicyError, match="shipped: balanced, monitor, strict"):
        load_policy("no-such-policy")
    with pytest.raises(PolicyError, match="file not found"):
        load_policy(tmp_path / "missing.yaml")
    with pytest.raises(PolicyError, match="<policy mapping>: name: field required"):
        load_policy({})


def test_yaml_is_safe_loaded(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(PolicyError, match="invalid YAML"):
        load_policy(path)


def test_content_hash_depends_on_content_only():
    a = load_policy({"name": "x", "rules": [{"when": {"score": {"gte": 1}}, "action": "block"}]})
    b = load_policy({"name": "x", "rules": [{"action": "block", "when": {"score": {"gte": 1.0}}}]})
    c = load_policy({"name": "x", "rules": [{"when": {"score": {"gte": 2}}, "action": "block"}]})
    assert a.content_hash == b.content_hash != c.content_hash
    assert len(a.content_hash) == 64


def test_policy_is_frozen():
    policy = load_policy("strict")
    with pytest.raises(ValidationError):
        policy.default = "block"


ORDERED = {
    "name": "ordered",
    "rules": [
        {"name": "high", "when": {"score": {"gte": 10}}, "action": "block"},
        {"when": {"score": {"gte": 5}, "cos": {"gt": 0.5}}, "action": "rewrite"},
        {"name": "mid", "when": {"score": {"gte": 5}}, "action": "warn"},
    ],
}


def test_first_matching_rule_wins():
    policy = load_policy(ORDERED)
    assert decide(policy, make_score(12, cos=0.9), "p").rule == "high"
    rewrite = decide(policy, make_score(6, cos=0.9), "p")
    assert (rewrite.action, rewrite.rule, rewrite.rewrite_target) == ("rewrite", "rules[1]", 5.0)
    assert rewrite.rewrite is not None and rewrite.rewrite.max_steps == 10
    warn = decide(policy, make_score(6, cos=0.1), "p")
    assert (warn.action, warn.rule) == ("warn", "mid")
    assert [(t.metric, t.op, t.value) for t in warn.thresholds] == [("score", ">=", 5.0)]
    low = decide(policy, make_score(1), "p", prompt_index=3)
    assert (low.action, low.rule, low.prompt_index) == ("allow", "default", 3)


def test_lists_decide_before_scores():
    policy = load_policy({**ORDERED, "lists": {"always_block": ["Mona  Lisa!"], "always_allow": ["a safe prompt"]}})
    blocked = decide(policy, make_score(0), "  mona lisa ", prompt_index=1)
    assert (blocked.action, blocked.rule) == ("block", "lists.always_block")
    allowed = decide(policy, make_score(99), "A safe prompt.")
    assert (allowed.action, allowed.rule) == ("allow", "lists.always_allow")
    assert match_lists(policy, "something else") is None
    exact = load_policy({"name": "e", "lists": {"always_block": ["Mona Lisa"], "match": "exact"}})
    assert match_lists(exact, "mona lisa") is None
    assert match_lists(exact, "Mona Lisa").action == "block"
    assert normalize_prompt("  Hello,   WORLD!! ") == "hello, world"


def test_relative_thresholds_use_calibration():
    balanced, strict = load_policy("balanced"), load_policy("strict")
    cal = make_calibration()
    assert cal.threshold_at_fpr(0.001) == 9.98 and cal.threshold_at_fpr(0.005) == 9.94
    block = decide(balanced, make_score(9.985), "p", cal)
    assert (block.action, block.calibration_id) == ("block", cal.id)
    assert block.thresholds[0].value == 9.98 and block.thresholds[0].above_fpr == 0.001
    assert decide(balanced, make_score(9.98), "p", cal).action == "rewrite"
    assert cal.threshold_at_fpr(0.02) == 9.79
    rewrite = decide(strict, make_score(9.99), "p", cal)  # strict rewrites (verified) instead of blocking
    assert rewrite.action == "rewrite" and rewrite.rewrite_target == cal.threshold_at_fpr(0.5)
    assert rewrite.rewrite.rungs == ("guidance_schedule", "token", "prompt_embedding", "initial_noise", "combined")
    assert decide(strict, make_score(9.79), "p", cal).action == "warn"
    assert decide(strict, make_score(1.0), "p", cal).action == "allow"


def test_calibration_quantile_rule():
    cal = make_calibration(n=10)
    assert cal.threshold_at_fpr(0.05) == max(cal.scores)
    assert cal.threshold_at_fpr(0.1) == 0.08
    assert cal.fpr_of(0.08) == pytest.approx(0.1)
    assert cal.fpr_of(100) == 0.0 and cal.fpr_of(-1) == 1.0
    for fpr in (0.01, 0.1, 0.3, 0.5, 0.99):
        t = cal.threshold_at_fpr(fpr)
        assert cal.fpr_of(t) <= fpr
    with pytest.raises(ValueError):
        cal.threshold_at_fpr(0)
    low = decide(load_policy("balanced"), make_score(0.01), "p", cal)
    assert any("resolution" in w for w in low.warnings)


def test_missing_calibration_says_how_to_calibrate():
    with pytest.raises(CalibrationMissing) as info:
        decide(load_policy("strict"), make_score(1), "p", None)
    message = str(info.value)
    assert "memguard calibrate --model DIR --out PROFILE" in message and "calibration: auto" in message


def test_calibration_must_match_score_settings():
    with pytest.raises(CalibrationMismatch, match="g_cos"):
        decide(load_policy("strict"), make_score(1, g_cos=0.1), "p", make_calibration())


def test_absolute_policy_needs_no_calibration():
    assert decide(load_policy(ORDERED), make_score(11), "p", None).action == "block"


def test_errors_follow_on_error():
    strict = load_policy("strict")
    nan = decide(strict, make_score(math.nan), "p", make_calibration())
    assert (nan.action, nan.rule) == ("block", "on_error") and "non-finite" in nan.error
    unscored = decide(strict, None, "p")
    assert unscored.action == "block" and unscored.error
    monitor = decide_on_error(load_policy("monitor"), 2, "scorer exploded")
    assert (monitor.action, monitor.prompt_index, monitor.error) == ("warn", 2, "scorer exploded")
    assert "scorer exploded" in monitor.reason


def test_calibration_save_load_and_cache(tmp_path, monkeypatch):
    cal = make_calibration(n=20, norms=list(range(20)), coses=[0.0] * 20)
    path = cal.save(tmp_path / "cal.json")
    again = CalibrationProfile.load(path)
    assert again == cal and again.id == cal.id and again.created.endswith("Z")
    assert again.threshold_at_fpr(0.1, "norm") == 17
    path.write_text(path.read_text().replace('"seed": 51', '"seed": 52'))
    with pytest.raises(CalibrationError, match="does not match its id"):
        CalibrationProfile.load(path)
    with pytest.raises(CalibrationError, match="not found"):
        CalibrationProfile.load(tmp_path / "nope.json")
    with pytest.raises(CalibrationError):
        CalibrationProfile.from_scores([], **{k: v for k, v in _cal_args().items()})
    monkeypatch.setenv("MEMGUARD_CACHE_DIR", str(tmp_path / "cache"))
    key = dict(profile="sd1", g_norm=1.0, g_cos=2.0, seed=51, samples=1, steps=50, prediction_space="eps")
    first = cached_calibration_path("fp/1", source="a", **key)
    assert first.parent == tmp_path / "cache" / "calibration"
    assert first != cached_calibration_path("fp/1", source="b", **key)
    assert first == cached_calibration_path("fp/1", source="a", **key)


def _cal_args():
    return dict(
        fingerprint="f",
        model_class="C",
        profile="sd1",
        g_norm=1.0,
        g_cos=2.0,
        seed=51,
        samples=1,
        steps=50,
        prediction_space="eps",
        source="s",
    )


def test_policy_calibration_path_is_relative_to_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "p.yaml"
    path.write_text("name: p\ncalibration: cal/model.json\n")
    assert load_policy(path).calibration_path == tmp_path / "sub" / "cal" / "model.json"
    assert load_policy("strict").calibration_path is None


def test_generic_captions():
    captions = generic_captions()
    assert len(captions) >= 600 and len(set(captions)) == len(captions)
    assert all(c == c.strip() and c for c in captions)


def test_wheel_contains_shipped_policies(tmp_path):
    out = tmp_path / "whl"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    wheel = next(out.glob("memguard-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("strict", "balanced", "monitor"):
        assert f"guard/_shipped_policies/{name}.yaml" in names
    assert "guard/data/generic_captions.txt" in names
    shipped_model = {
        p.relative_to(ROOT).as_posix() for p in (ROOT / "guard" / "assets" / "memorizer").rglob("*") if p.is_file()
    }
    assert shipped_model and shipped_model <= names, sorted(shipped_model - names)  # the demo's model and calibration
    source_packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "guard").rglob("__init__.py")}
    missing = {p for p in source_packages if f"{p}/__init__.py" not in names}
    assert not missing, f"add these packages to [tool.setuptools] packages in pyproject.toml: {sorted(missing)}"

    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    code = (
        "from guard.policy import load_policy, shipped_policy_path; p = shipped_policy_path('strict'); "
        "assert 'site' in str(p) and '_shipped_policies' in str(p), p; print(load_policy('balanced').name)"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site)}, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "balanced"
