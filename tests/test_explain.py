"""Explanations: per-word attribution of the score (occlusion and gradient), a known trigger found by both, and
explanations in decisions, audit records (words only when prompts are logged plain), the HTML report, the service
and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from guard import Guard, Scorer
from guard.audit.report import write_report
from guard.audit.review import summarize
from guard.scoring import explain_prompt, prompt_words
from guard.scoring.explain import token_spans, without_word

PROMPT = "portrait of a man with a golden hat, oil painting"
TRIGGER_PROMPTS = ["a golden cat on the beach", "golden mountain river at night",
                   "old house in the golden morning light"]


def with_trigger(pipe, word: str = "golden", strength: float = 6.0):
    """A known trigger: wherever ``word``'s token appears, the text encoder's output at that position gets a fixed
    large vector added, so the denoiser is steered by that one token (as by a memorized caption's trigger)."""
    token = pipe.tokenizer.convert_tokens_to_ids(word)
    direction = torch.randn(pipe.text_encoder.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        output[0].add_((ids == token).unsqueeze(-1) * strength * direction)
        return output

    return pipe.text_encoder.register_forward_hook(hook, with_kwargs=True)


@pytest.fixture(scope="module")
def trigger_pipe():
    from guard.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=4)
    with_trigger(pipe)
    return pipe


# ---------------------------------------------------------------- words


def test_words_are_letter_runs_and_deleting_one_closes_the_gap():
    prompt = "a red-haired man's hat, oil  painting!"
    assert [prompt[s:e] for s, e in prompt_words(prompt)] == ["a", "red-haired", "man's", "hat", "oil", "painting"]
    assert without_word(prompt, prompt_words(prompt)[3]) == "a red-haired man's , oil painting!"
    assert without_word("golden cat", (0, 6)) == "cat"


def test_token_positions_map_to_the_words_they_spell(sd_pipe, sdxl_pipe):
    for pipe in (sd_pipe, sdxl_pipe):
        scorer = Scorer(pipe)
        spans = token_spans(scorer.adapter, "a golden cat", 16)
        assert spans[0] is None and spans[1] == (0, 1) and spans[2] == (2, 8) and spans[3] == (9, 12)
        assert all(span is None for span in spans[4:])  # end of text and padding


# ---------------------------------------------------------------- what the weights are


def test_occlusion_weights_are_score_differences(sd_pipe):
    scorer = Scorer(sd_pipe, samples=2)
    explanation = explain_prompt(scorer, PROMPT, method="occlusion")
    base = scorer.score([PROMPT])[0].score
    assert explanation.score == pytest.approx(base, abs=1e-5) and explanation.samples == 2
    deleted = scorer.score([without_word(PROMPT, (w.start, w.end)) for w in explanation.words])
    for word, score in zip(explanation.words, deleted):
        assert word.weight == pytest.approx(base - score.score, abs=1e-5)
    assert [w.word for w in explanation.words] == [PROMPT[s:e] for s, e in prompt_words(PROMPT)]
    one = explain_prompt(scorer, PROMPT, samples=1)  # the first draw alone, as a 1-draw decision is scored
    assert one.score == pytest.approx(Scorer(sd_pipe, samples=1).score([PROMPT])[0].score, abs=1e-5)


def test_gradient_weights_are_first_order_score_changes(sd_pipe):
    """A word's gradient weight predicts how the score moves when its tokens' embeddings move towards c by eps."""
    scorer = Scorer(sd_pipe)
    explanation = explain_prompt(scorer, PROMPT, method="gradient")
    cond = scorer.encode([PROMPT])
    uncond = scorer.adapter.unconditional()
    spans = token_spans(scorer.adapter, PROMPT, cond.embeds.shape[1])
    with torch.no_grad():
        base = float(scorer.combine(*scorer.statistics(cond))[0])
    assert explanation.score == pytest.approx(base, abs=1e-5)
    eps = 1e-2
    for word in sorted(explanation.words, key=lambda w: -abs(w.weight))[:3]:
        mask = torch.tensor([s is not None and s[0] >= word.start and s[1] <= word.end for s in spans])
        moved = cond.clone()
        moved.embeds[0, mask] += eps * (cond.embeds[0, mask] - uncond.embeds[0, mask])
        with torch.no_grad():
            changed = float(scorer.combine(*scorer.statistics(moved))[0])
        assert (changed - base) / eps == pytest.approx(word.weight, rel=0.05, abs=2e-3)
    assert all(w.word is not None for w in explanation.words)


@pytest.mark.parametrize("method", ["occlusion", "gradient"])
def test_a_known_trigger_word_gets_the_highest_weight(trigger_pipe, method):
    scorer = Scorer(trigger_pipe)
    for prompt in TRIGGER_PROMPTS:
        explanation = explain_prompt(scorer, prompt, method=method)
        assert explanation.top(1)[0].word == "golden", explanation.describe(5)


def test_bad_requests_are_clear(sd_pipe):
    scorer = Scorer(sd_pipe)
    with pytest.raises(ValueError, match="unknown explanation method"):
        explain_prompt(scorer, PROMPT, method="shap")
    with pytest.raises(ValueError, match="non-empty prompt"):
        explain_prompt(scorer, "  ")
    with pytest.raises(ValueError, match="samples must be in 1..1"):
        explain_prompt(scorer, PROMPT, samples=3)


# ---------------------------------------------------------------- in decisions, records, reports, the service


def _policy(explain, prompt_mode="hash", threshold=None):
    return {"name": "explained", "calibration": "off", "explain": explain, "audit": {"prompt": prompt_mode},
            "rules": [{"name": "trigger", "when": {"score": {"gte": threshold}}, "action": "block"}]}


@pytest.fixture(scope="module")
def threshold(trigger_pipe):
    """Between the trigger prompts' scores and those of the same prompts without the trigger."""
    scorer = Scorer(trigger_pipe)
    with_it = min(r.score for r in scorer.score(TRIGGER_PROMPTS))
    without = max(r.score for r in scorer.score([p.replace("golden ", "") for p in TRIGGER_PROMPTS]))
    assert without < with_it
    return (with_it + without) / 2


def test_decisions_carry_explanations_when_the_policy_asks(trigger_pipe, threshold, tmp_path):
    plain = "a cat on the beach"
    prompts = [TRIGGER_PROMPTS[0], plain]
    log = tmp_path / "hash.jsonl"
    with Guard(trigger_pipe, _policy("on_block", threshold=threshold), audit_path=log) as guard:
        blocked, allowed = guard.check_many(prompts)
        assert guard.explain(TRIGGER_PROMPTS[0]).top(1)[0].word == "golden"
    assert blocked.action == "block" and allowed.action == "allow"
    assert allowed.explanation is None
    explanation = blocked.explanation
    assert explanation.top(1)[0].word == "golden" and explanation.samples == blocked.score.samples
    assert explanation.score == pytest.approx(blocked.score.score, abs=1e-5)
    serialized = json.dumps(blocked.to_dict())
    assert "golden" not in serialized and '"start": 2' in serialized  # spans and weights, never the words
    record = next(r for r in map(json.loads, log.read_text().splitlines()) if r.get("prompt_index") == 0
                  and r["event"] == "decision")
    assert "golden" not in json.dumps(record)
    top = max(record["explanation"]["words"], key=lambda w: w["weight"])
    assert (top["index"], top["start"], top["end"]) == (1, 2, 8)
    with Guard(trigger_pipe, _policy("always", "plain", threshold), audit_path=tmp_path / "plain.jsonl") as guard:
        both = guard.check_many(prompts)
    assert all(d.explanation is not None for d in both)
    records = [r for r in map(json.loads, (tmp_path / "plain.jsonl").read_text().splitlines())
               if r["event"] == "decision"]
    assert [w["word"] for w in records[0]["explanation"]["words"]] == ["a", "golden", "cat", "on", "the", "beach"]


def test_an_explanation_that_cannot_be_made_is_a_warning_not_another_verdict(
    trigger_pipe, threshold, tmp_path, monkeypatch
):
    policy = _policy({"when": "always", "method": "gradient"}, threshold=threshold)
    with Guard(trigger_pipe, policy, audit_path=tmp_path / "a.jsonl") as guard:
        # gradient attribution needs a fast tokenizer's offsets
        monkeypatch.setattr(type(trigger_pipe.tokenizer), "is_fast", property(lambda self: False))
        decision = guard.check(TRIGGER_PROMPTS[0])
    assert decision.action == "block" and decision.explanation is None
    expected = "no explanation: ValueError: gradient attribution needs a fast tokenizer"
    assert any(expected in warning for warning in decision.warnings)


def test_the_html_report_highlights_words_only_for_plain_prompts(trigger_pipe, threshold, tmp_path):
    for mode in ("plain", "hash"):
        log = tmp_path / f"{mode}.jsonl"
        with Guard(trigger_pipe, _policy("on_block", mode, threshold), audit_path=log) as guard:
            guard.check_many(TRIGGER_PROMPTS[:2])
        html = write_report(summarize(log), None, tmp_path / f"{mode}.html").read_text()
        if mode == "plain":
            assert html.count("<mark") >= 8 and ">golden</mark>" in html and "words driving the score" in html
        else:
            assert "<mark" not in html and "golden" not in html


def test_the_service_returns_explanations(trigger_pipe, threshold, tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from guard.service import create_app

    guard = Guard(trigger_pipe, _policy("on_block", threshold=threshold), audit_path=tmp_path / "s.jsonl")
    with TestClient(create_app(guard)) as client:
        body = client.post("/v1/check", json={"prompts": [TRIGGER_PROMPTS[0], "a cat on the beach"]}).json()
    blocked, allowed = body["decisions"]
    assert allowed["explanation"] is None
    words = blocked["explanation"]["words"]
    top = max(words, key=lambda w: w["weight"])
    assert TRIGGER_PROMPTS[0][top["start"] : top["end"]] == "golden" and "word" not in top


def test_cli_explains_a_prompt(sd_pipe, tmp_path):
    from guard.cli import main

    model = tmp_path / "model"
    sd_pipe.save_pretrained(model)
    runner = CliRunner()
    result = runner.invoke(main, ["explain", "--model", str(model), PROMPT, "--top", "3",
                                  "--png", str(tmp_path / "x.png")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("score ") and "occlusion" in lines[0] and len(lines) >= 4
    expected = explain_prompt(Scorer(sd_pipe), PROMPT)
    assert [line.split()[1] for line in lines[1:4]] == [w.word for w in expected.top(3)]
    from PIL import Image

    assert Image.open(tmp_path / "x.png").size[0] == 900
    as_json = runner.invoke(main, ["explain", "--model", str(model), PROMPT, "--json", "--method", "gradient"])
    data = json.loads(as_json.output)
    assert data["method"] == "gradient" and data["words"][0]["word"] == "portrait"
