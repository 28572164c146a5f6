"""The ``token`` rung: the prompt without the words that carry its score, generated and verified like every rung.

On the zoo's ``v-hard`` (a v-prediction memorizer whose images no guidance schedule, embedding step or noise
moves) it is what frees memorized prompts; ``benchmarks/mitigation.py`` measures that no released image is a
copy. Here: what a user and an auditor rely on (released only verified, the record names the deleted words by
index and never by text unless prompts are logged plain, its cost is counted, a deeper edit follows a failed one,
and a call without prompt text skips the rung and goes on).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from guard import Guard, MemorizationBlocked
from guard.actions.trigger_words import word_indices
from guard.policy import load_policy
from guard.scoring import prompt_words

ROOT = Path(__file__).resolve().parents[1]
VHARD = ROOT / "benchmarks" / "memorizer" / "models" / "v-hard"
STEPS = 20


@pytest.fixture(scope="module")
def vhard():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(VHARD)
    pipe.set_progress_bar_config(disable=True)
    memorized = (ROOT / "benchmarks" / "memorizer" / "prompts" / "vhard" / "mem.txt").read_text().splitlines()
    return pipe, memorized


def _token_policy(*, prompt_mode: str = "hash", ladder=("token",), verify=None, max_words: int = 3) -> dict:
    policy = load_policy("strict").model_dump(mode="json")
    rule = next(r for r in policy["rules"] if r["action"] == "rewrite")
    rule["rewrite"]["ladder"] = list(ladder)
    rule["rewrite"]["max_words"] = max_words
    if verify is not None:
        rule["rewrite"]["verify"] = verify
    policy["audit"]["prompt"] = prompt_mode
    policy["name"] = "token-test"
    return policy


def _run(guard, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = guard(num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(0),
                        **kwargs)
            return out.memguard
        except MemorizationBlocked as blocked:
            return blocked.report


def _outcome(log: Path) -> dict:
    (record,) = [json.loads(line) for line in log.read_text().splitlines() if '"event":"outcome"' in
                 line.replace(" ", "")]
    return record


@pytest.mark.parametrize("prompt_mode", ["hash", "plain"])
def test_strict_frees_a_vhard_prompt_by_deleting_its_trigger_words(vhard, tmp_path, prompt_mode):
    pipe, memorized = vhard
    prompt = memorized[0]
    log = tmp_path / "audit.jsonl"
    guard = Guard(pipe, _token_policy(prompt_mode=prompt_mode, ladder=("guidance_schedule", "token")),
                  calibration=VHARD / "calibration.json", audit_path=log)
    report = _run(guard, prompt=prompt)
    guard.close()
    (decision,) = report.decisions
    assert decision.action == "rewrite", decision.reason
    ladder = report.mitigations[0]
    assert ladder.verified and ladder.released == "token", ladder.describe()
    token = ladder.rungs[-1]
    assert max(token.similarity) <= ladder.threshold
    words = token.edits["words"]
    assert words and all(w in prompt for w in words)
    spans = prompt_words(prompt)
    assert [prompt[a:b] for a, b in (spans[i] for i in token.edits["word_indices"])] == sorted(
        words, key=lambda w: prompt.index(w))
    assert token.edits["score"] <= token.edits["target"] or len(words) == 3
    assert token.generations > 1  # its generation and the scoring passes that chose the words
    record = _outcome(log)
    assert record["outcome"] == "rewritten"
    edits = record["extras"]["mitigation"]["rungs"][-1]["edits"]
    assert edits["word_indices"] == token.edits["word_indices"]
    if prompt_mode == "plain":
        assert edits["words"] == words
    else:
        assert "words" not in edits
        assert not any(w in log.read_text() for w in words)  # no deleted word reaches the log


def test_a_failed_edit_is_followed_by_a_deeper_one_then_the_fallback(vhard, tmp_path):
    pipe, memorized = vhard
    log = tmp_path / "audit.jsonl"
    never = {"max_similarity": -1.0, "probes": 1, "probe_steps": 4}  # no image can pass: every edit is tried
    guard = Guard(pipe, _token_policy(verify=never, max_words=2), calibration=VHARD / "calibration.json",
                  audit_path=log)
    report = _run(guard, prompt=memorized[1])
    guard.close()
    (decision,) = report.decisions
    assert decision.action == "block" and "fallback: block" in decision.reason
    ran = [r for r in report.mitigations[0].rungs if r.ran]
    assert [r.rung for r in ran] == ["token", "token"]
    first, second = (set(r.edits["word_indices"]) for r in ran)
    assert len(first) == 1 and len(second) == 2 and first < second


def test_without_prompt_text_the_rung_is_skipped_and_the_ladder_goes_on(vhard, tmp_path):
    pipe, memorized = vhard
    embeds, _ = pipe.encode_prompt(memorized[0], "cpu", 1, True)
    guard = Guard(pipe, _token_policy(ladder=("token", "guidance_schedule")), calibration=VHARD / "calibration.json",
                  audit_path=tmp_path / "audit.jsonl")
    report = _run(guard, prompt_embeds=embeds)
    guard.close()
    (decision,) = report.decisions
    assert decision.action in ("rewrite", "block")
    token, schedule = report.mitigations[0].rungs[:2]
    assert not token.ran and "text" in token.note
    assert schedule.rung == "guidance_schedule" and schedule.ran


def test_word_indices_name_the_deleted_words_in_the_original_prompt():
    prompt = "a red fox, a red hat and a blue sky"
    spans = prompt_words(prompt)
    assert word_indices(prompt, ["red", "red"], spans) == [1, 4]
    assert word_indices(prompt, ["blue sky"], spans) == [8, 9]
    assert word_indices(prompt, ["green"], spans) == []


def test_initial_noise_is_skipped_when_the_model_draws_one_image_whatever_the_noise(vhard, tmp_path):
    pipe, memorized = vhard
    guard = Guard(pipe, _token_policy(ladder=("initial_noise", "token")), calibration=VHARD / "calibration.json",
                  audit_path=tmp_path / "audit.jsonl")
    report = _run(guard, prompt=memorized[2])
    guard.close()
    ladder = report.mitigations[0]
    assert ladder.probe_agreement >= 0.9  # v-hard's probes of a memorized prompt from two noises: one image
    noise = ladder.rungs[0]
    assert noise.rung == "initial_noise" and not noise.ran and "agree" in noise.note
    assert ladder.rungs[1].rung == "token" and ladder.rungs[1].ran


def test_strict_releases_vhard_prompts_only_as_images_that_are_not_copies(vhard, tmp_path):
    """The outcome, not the proxy: against v-hard's own training latents (rebuilt by the memorizer's data code),
    the unguarded model copies each of these memorized captions, and what the shipped strict policy releases for
    them is no closer to the training image than unseen captions' images come to any training image. At 50 steps,
    as the benchmark runs: strict's budget is in generations of the call, so shorter calls leave the ladder less
    (at 20 steps the 25-step probes alone cost 2.5 generations)."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from memorizers import cosine_rows, data_for, nearest

    pipe, _ = vhard
    data = data_for(VHARD)
    unseen = data.nmem_captions[:24]
    images = pipe(unseen, num_inference_steps=50, output_type="latent",
                  generator=[torch.Generator().manual_seed(1000 + i) for i in range(len(unseen))]).images
    near = nearest(images, data.train_latents)
    level = float(near.mean() + 2.5 * near.std())  # the benchmark's copy level
    guard = Guard(pipe, "strict", calibration=VHARD / "calibration.json", audit_path=tmp_path / "audit.jsonl")
    for i in (1, 2):  # the two of the first three that need a deeper edit or a second word
        caption, truth = data.mem_captions[i], data.train_latents[data.mem_latent_index[i]][None]
        plain = pipe(caption, num_inference_steps=50, output_type="latent",
                     generator=torch.Generator().manual_seed(i)).images
        assert float(cosine_rows(plain, truth)[0]) > level  # unguarded: a copy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = guard(prompt=caption, num_inference_steps=50, output_type="latent",
                        generator=torch.Generator().manual_seed(i))
        assert out.memguard.mitigations[0].verified
        assert abs(float(cosine_rows(out.images, truth)[0])) < level, (caption, level)
    guard.close()
