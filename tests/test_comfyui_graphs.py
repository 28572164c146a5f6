"""Whole graphs in a real ComfyUI (``COMFYUI_PATH``; skipped without one), as a user runs them.

The pack is loaded by ComfyUI's own start-up loader from a ``custom_nodes`` folder (``nodes.init_extra_nodes``),
graphs are validated as ``POST /prompt`` validates them and executed by ComfyUI's ``PromptExecutor`` (one for all
queue items, so ComfyUI's caches persist between them), and each queue item's result is filed by
``PromptQueue.task_done``, which is what ``GET /history`` returns. The model is memguard's memorizer (an SD 1.x
layout that memorizes 48 captions) built in ComfyUI's own classes (``comfy_twins.memorizer_in_comfyui``), loaded by
a loader node of the tests' own, with a calibration made inside ComfyUI (its scores through the node's scorer, its
verification values through the guarded sampler's generator) named in copies of the shipped balanced and strict
policies. What is checked:

- an allowed prompt's image is pixel-identical to the same graph with ComfyUI's KSampler instead of the guard;
- every queue item that samples writes its decision record (before sampling) and outcome record, also when it is
  queued again with only the seed changed, or unchanged (ComfyUI's cache would have skipped it);
- a blocked item ends in an error state whose message is the decision's reason, in ``/history`` and in the events
  an API client receives; the report still reaches a PreviewAny, and nothing is sampled or saved;
- under strict a memorized prompt is released only as a verified image that is not a copy of its training image
  (the unguarded graph's image of the same prompt and seed is one); under balanced it is a visible block.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(
    not COMFYUI_PATH or not (Path(COMFYUI_PATH) / "comfy_api" / "latest").is_dir(),
    reason="set COMFYUI_PATH to a ComfyUI checkout (v0.3.64 checked) to run whole graphs in real ComfyUI",
)

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "integrations" / "comfyui"
MEMORIZED = "the famous red bicycle of the beach poster"  # 200 copies of one image in the memorizer's training set
ORDINARY = "a tiny crimson castle on a snowy field, watercolor"  # an unseen caption of the same vocabulary
#: Calibration prompts (the memorizer's own unseen captions, disjoint from the evaluation ones) and how many of them
#: the verification values are measured on: enough for the shipped policies' thresholds, small enough for CI.
CALIBRATION_PROMPTS, VERIFICATION_PROMPTS = 200, 16
#: Above this cosine to a training latent an image is a copy: unseen captions' images reach their nearest training
#: latent at 0.462 on average in ComfyUI (euler, 20 steps, cfg 7.5; 60 captions), and mean + 2.5 std is 0.562 (the
#: README's "copy" measure); the memorized captions' unguarded images reach 0.79 (200 copies, all 12 above it).
COPY_LEVEL = 0.56


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("comfy-graphs")


@pytest.fixture(scope="module")
def comfy(scratch):
    """Real ComfyUI, the pack loaded by ComfyUI's own loader, the tests' loader node, outputs under scratch."""
    sys.path.insert(0, str(PACK))  # for ``memguard_comfy`` in the calibration helper (ComfyUI loads its own copy)
    import comfy_twins as twins

    comfy = twins.import_comfyui(COMFYUI_PATH)
    failed = twins.load_pack_like_comfyui(comfy, str(PACK), str(scratch))
    assert "comfyui-memguard" not in " ".join(failed)
    import folder_paths

    folder_paths.set_output_directory(str(scratch / "output"))
    comfy["nodes"].NODE_CLASS_MAPPINGS["MemguardTestLoader"] = twins.TestModelLoader
    return comfy


@pytest.fixture(scope="module")
def memorizer(comfy, scratch):
    import comfy_twins as twins

    built = twins.memorizer_in_comfyui()
    twins.TestModelLoader.MODELS["memorizer"] = (built["model"], built["clip"], built["vae"])
    return built


@pytest.fixture(scope="module")
def policies(memorizer, scratch) -> dict[str, str]:
    """The shipped balanced and strict policies, each naming the memorizer's ComfyUI calibration (the only change)."""
    import comfy_twins as twins

    prompts = [line for line in (ROOT / "benchmarks/memorizer/prompts/calib.txt").read_text().splitlines() if line]
    profile = twins.memorizer_calibration(memorizer, prompts[:CALIBRATION_PROMPTS], VERIFICATION_PROMPTS,
                                          str(scratch / "calibration.json"), str(scratch / "calibration-audit.jsonl"))
    out = {}
    for name in ("balanced", "strict"):
        policy = yaml.safe_load((ROOT / "policies" / f"{name}.yaml").read_text())
        policy["calibration"] = profile
        path = scratch / f"{name}.yaml"
        path.write_text(yaml.safe_dump(policy))
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def runner(comfy):
    import comfy_twins as twins

    return twins.GraphRunner(comfy)


@pytest.fixture(scope="module")
def training_latent():
    """The memorized caption's training latent (the memorizer's data is a pure function of its seed)."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "memorizer"))
    import data

    built = data.build(0)
    return built.train_latents[built.mem_latent_index[built.mem_captions.index(MEMORIZED)]]


def graph(text: str, *, seed: int = 7, guard: str | None = None, policy: str = "", audit: str = "",
          prefix: str = "img", batch: int = 1) -> dict:
    """loader -> CLIPTextEncode x2 -> (Memorization Guard ->) KSampler, or the Memorization-Guarded KSampler ->
    VAEDecode -> SaveImage, a SaveLatent, and a PreviewAny on the guard's report."""
    import comfy_twins as twins

    px = twins.MEMORIZER_IMAGE_PX
    call = {"seed": seed, "denoise": 1.0, **twins.MEMORIZER_CALL}
    nodes = {
        "1": {"class_type": "MemguardTestLoader", "inputs": {"name": "memorizer"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": px, "height": px, "batch_size": batch}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": f"latents/{prefix}"}},
    }
    settings = {"policy": "balanced", "policy_path": policy, "unconditional": "empty prompt (reference)",
                "samples": 0, "explain": "policy", "latent_size": 16, "audit_path": audit}
    ksampler = {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], **call}
    if guard == "sampler":
        nodes["5"] = {"class_type": "MemguardGuardedKSampler",
                      "inputs": {**ksampler, "clip": ["1", 1], "detection_seed": -1, **settings}}
        nodes["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 2]}}
    elif guard == "node":
        nodes["10"] = {"class_type": "MemguardMemorizationGuard",
                       "inputs": {"model": ["1", 0], "clip": ["1", 1], "positive": ["2", 0], "negative": ["3", 0],
                                  "seed": -1, **settings}}
        nodes["5"] = {"class_type": "KSampler", "inputs": {**ksampler, "positive": ["10", 0]}}
        nodes["9"] = {"class_type": "PreviewAny", "inputs": {"source": ["10", 2]}}
    else:
        nodes["5"] = {"class_type": "KSampler", "inputs": ksampler}
    return nodes


def records(path: Path, prompt_id: str | None = None) -> list[dict]:
    if not path.exists():
        return []
    out = [json.loads(line) for line in path.read_text().splitlines()]
    if prompt_id is None:
        return out
    return [r for r in out if ((r.get("context") or {}).get("comfyui") or {}).get("prompt_id") == prompt_id]


def audited(path: Path, prompt_id: str) -> tuple[dict, dict]:
    """The queue item's decision and outcome records (exactly one each), the decision first in the chain."""
    mine = records(path, prompt_id)
    decisions = [r for r in mine if r["event"] == "decision"]
    outcomes = [r for r in mine if r["event"] == "outcome"]
    assert len(decisions) == 1 and len(outcomes) == 1, [r["event"] for r in mine]
    decision, outcome = decisions[0], outcomes[0]
    assert decision["seq"] < outcome["seq"] and outcome["decision_hash"] == decision["hash"]
    return decision, outcome


def image(scratch: Path, history: dict, node: str = "7") -> torch.Tensor:
    import numpy as np
    from PIL import Image

    saved = history["outputs"][node]["images"]
    return torch.stack([torch.from_numpy(np.asarray(Image.open(scratch / "output" / s["subfolder"] / s["filename"])))
                        for s in saved])


def latent(scratch: Path, history: dict, prefix: str) -> torch.Tensor:
    import safetensors.torch

    (path,) = sorted((scratch / "output" / "latents").glob(f"{prefix}_*.latent"))
    return safetensors.torch.load_file(str(path))["latent_tensor"]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).abs())


def error_of(history: dict) -> dict:
    (error,) = [data for event, data in history["status"]["messages"] if event == "execution_error"]
    return error


def test_pack_is_loaded_by_comfyuis_own_loader(comfy):
    nodes = comfy["nodes"]
    for node_id, name in (("MemguardGuardedKSampler", "Memorization-Guarded KSampler"),
                          ("MemguardMemorizationGuard", "Memorization Guard"),
                          ("MemguardMemorizationScore", "Memorization Score"), ("MemguardBlocked", None)):
        assert node_id in nodes.NODE_CLASS_MAPPINGS
        if name:
            assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == name
    assert any(path.endswith("comfyui-memguard") for path in nodes.LOADED_MODULE_DIRS.values())


def test_the_memorizer_in_comfyui_is_the_diffusers_model(memorizer):
    """ComfyUI's network with the memorizer's weights computes its function: the ComfyUI adapter's scores equal
    the diffusers pipeline's (same prompt embeddings, detection noise and steps)."""
    from memguard_comfy.adapter import comfy_adapter

    from guard.scoring import Scorer

    prompts = [MEMORIZED, ORDINARY]
    reference = Scorer(memorizer["pipe"]).score(prompts)
    comfy = Scorer(comfy_adapter(memorizer["model"], memorizer["clip"], latent_size=16)).score(prompts)
    for expected, got in zip(reference, comfy, strict=True):
        assert abs(expected.score - got.score) < 1e-5 and abs(expected.norm - got.norm) < 1e-5
    assert reference[0].score > reference[1].score + 0.5  # the memorized caption stands out


@pytest.mark.parametrize("policy", ["balanced", "strict"])
def test_allowed_prompt_is_pixel_identical_and_audited(runner, memorizer, policies, scratch, policy):
    audit = scratch / f"allowed-{policy}.jsonl"
    plain = runner.run(graph(ORDINARY, prefix=f"plain-{policy}", batch=2), f"plain-{policy}")
    guarded = runner.run(graph(ORDINARY, guard="sampler", policy=policies[policy], audit=str(audit),
                               prefix=f"guarded-{policy}", batch=2), f"guarded-{policy}")
    assert plain["status"]["status_str"] == guarded["status"]["status_str"] == "success"
    assert torch.equal(image(scratch, guarded), image(scratch, plain))
    decision, outcome = audited(audit, f"guarded-{policy}")
    assert decision["action"] in ("allow", "warn") and outcome["outcome"] == "generated"
    assert decision["source"] == "comfyui" and decision["context"]["comfyui"]["node_id"] == "5"
    (report,) = guarded["outputs"]["9"]["text"]
    assert f"[0] {decision['action']}: score {decision['score']:.4f}" in report
    assert "detection latent 16x16 (the node's latent_size)" in report


def test_every_queue_item_that_samples_is_audited(runner, memorizer, policies, scratch):
    """Re-queued with only the KSampler seed changed, and re-queued unchanged: ComfyUI caches nodes whose inputs did
    not change, but the guarding nodes run and write their records for every queue item; the unchanged re-queue
    gives the same image again. The same holds for the Memorization Guard node in front of ComfyUI's KSampler."""
    audit = scratch / "requeue.jsonl"
    for guard in ("sampler", "node"):
        items = {f"{guard}-a": 7, f"{guard}-b": 8, f"{guard}-c": 7}
        results = {item: runner.run(graph(ORDINARY, seed=seed, guard=guard, policy=policies["strict"],
                                          audit=str(audit), prefix=item), item) for item, seed in items.items()}
        for item, history in results.items():
            assert history["status"]["status_str"] == "success", item
            assert audited(audit, item)[1]["outcome"] == "generated"
        a, b, c = (image(scratch, results[item]) for item in items)
        assert torch.equal(a, c) and not torch.equal(a, b)


def test_a_block_is_an_error_with_the_reason_in_history(runner, memorizer, policies, scratch):
    """balanced blocks the memorized prompt: the queue item ends in an error state whose message is the decision's
    reason (in /history and in the execution_error event an API client receives), the report reaches the
    PreviewAny, nothing is sampled or saved; re-queued with a new seed it is judged, audited and blocked again."""
    audit = scratch / "blocked.jsonl"
    for item, seed in (("blocked-a", 7), ("blocked-b", 9)):
        runner.server.events.clear()
        history = runner.run(graph(MEMORIZED, seed=seed, guard="sampler", policy=policies["balanced"],
                                   audit=str(audit), prefix=item), item)
        decision, outcome = audited(audit, item)
        assert (decision["action"], outcome["outcome"]) == ("block", "blocked")
        assert history["status"]["status_str"] == "error" and history["status"]["completed"] is False
        error = error_of(history)
        assert error["node_id"] == "5" and error["node_type"] == "MemguardGuardedKSampler"
        assert decision["reason"] in error["exception_message"] and decision["request_id"] in error["exception_message"]
        assert ("execution_error", error) in [(e, {k: d.get(k) for k in error}) for e, d in runner.server.events]
        (report,) = history["outputs"]["9"]["text"]
        assert "[0] block:" in report and "this queue item ends in an error" in report
        assert "7" not in history["outputs"] and not list((scratch / "output").glob(f"{item}_*.png"))


def test_the_guard_node_blocks_visibly_and_says_what_it_cannot_do(runner, memorizer, policies, scratch):
    """The Memorization Guard node (for graphs with other samplers): a block ends the item in an error with the
    reason, ComfyUI's KSampler never runs; its report says it can only allow or block."""
    audit = scratch / "guard-node.jsonl"
    history = runner.run(graph(MEMORIZED, guard="node", policy=policies["balanced"], audit=str(audit),
                               prefix="node-blocked"), "node-blocked")
    decision, outcome = audited(audit, "node-blocked")
    assert outcome["outcome"] == "blocked" and history["status"]["status_str"] == "error"
    error = error_of(history)
    assert error["node_id"] == "10" and decision["reason"] in error["exception_message"]
    assert "5" not in error["executed"]  # ComfyUI's KSampler never ran
    (report,) = history["outputs"]["9"]["text"]
    assert "can only allow or block" in report and "Memorization-Guarded KSampler" in report


def test_strict_releases_a_memorized_prompt_only_as_a_verified_non_copy(runner, memorizer, policies, scratch,
                                                                      training_latent):
    """The unguarded graph reproduces the training image (cosine above ``COPY_LEVEL``); under strict the guarded
    sampler rewrites by the ladder, verifies against the probes, and releases a verified image that is no copy.
    (From some seeds no rung passes: then the rule's fallback blocks, visibly, as in the balanced test.)"""
    unguarded = runner.run(graph(MEMORIZED, seed=37, prefix="copy"), "copy")
    assert unguarded["status"]["status_str"] == "success"
    assert cosine(latent(scratch, unguarded, "copy"), training_latent) > COPY_LEVEL
    audit = scratch / "strict.jsonl"
    history = runner.run(graph(MEMORIZED, seed=37, guard="sampler", policy=policies["strict"], audit=str(audit),
                               prefix="rewritten"), "rewritten")
    assert history["status"]["status_str"] == "success"
    decision, outcome = audited(audit, "rewritten")
    assert (decision["action"], outcome["outcome"]) == ("rewrite", "rewritten")
    mitigation = outcome["extras"]["mitigation"]
    assert mitigation["verified"] is True and mitigation["released"] in ("guidance_schedule", "token",
                                                                         "prompt_embedding", "initial_noise",
                                                                         "combined")
    released = latent(scratch, history, "rewritten")
    assert cosine(released, training_latent) < COPY_LEVEL
    passed = [r for r in mitigation["rungs"] if r["rung"] == mitigation["released"]][-1]
    assert max(passed["similarity"]) <= mitigation["threshold"]
    (report,) = history["outputs"]["9"]["text"]
    assert f"rewritten by {mitigation['released']}, verified" in report
