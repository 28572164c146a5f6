"""The ComfyUI node pack against fakes of ComfyUI v0.3.64 (tests/comfy_fakes): scores equal memguard's own
for the same UNet, text embeddings, seed and timesteps, and each policy action behaves as specified."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
FAKES = Path(__file__).resolve().parent / "comfy_fakes"
PACK = ROOT / "integrations" / "comfyui"
PROMPT = "a photo of a cat"
LATENT = 8  # the fixture UNet's sample_size


@pytest.fixture(scope="module")
def comfy():
    """The fakes on sys.path and the pack loaded as ComfyUI loads a custom node folder; undone afterwards."""
    sys.path.insert(0, str(FAKES))
    before = set(sys.modules)
    try:
        spec = importlib.util.spec_from_file_location("memguard_comfyui_pack", PACK / "__init__.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        import comfy.model_base
        import comfy.model_patcher
        import comfy.sd
        import comfy_execution.utils
        from comfy_api.latest import ComfyExtension, io

        yield {
            "pack": module,
            "io": io,
            "ComfyExtension": ComfyExtension,
            "model_base": comfy.model_base,
            "patcher": comfy.model_patcher,
            "sd": comfy.sd,
            "context": comfy_execution.utils.CurrentNodeContext,
        }
    finally:
        sys.path.remove(str(FAKES))
        faked = ("comfy", "comfy_api", "comfy_execution", "memguard_comfyui_pack")
        for name in set(sys.modules) - before:
            if name.split(".")[0] in faked:  # only the fakes and the pack: torch's lazily imported parts stay
                del sys.modules[name]


@pytest.fixture(scope="module")
def pipe():
    from guard.testing import tiny_sd_pipeline

    return tiny_sd_pipeline("epsilon", seed=3, sample_size=LATENT)


@pytest.fixture(scope="module")
def objects(comfy, pipe):
    base = comfy["model_base"].BaseModel(pipe.unet, pipe.scheduler.alphas_cumprod)
    model = comfy["patcher"].ModelPatcher(base)
    clip = comfy["sd"].CLIP(pipe)
    tokens = clip.tokenize(PROMPT)
    positive = [[clip.encode_from_tokens(tokens, return_pooled=True)[0], {"pooled_output": None}]]
    negative = [[clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)[0], {"pooled_output": None}]]
    return {"model": model, "clip": clip, "positive": positive, "negative": negative}


def nodes(comfy) -> dict[str, type]:
    extension = asyncio.run(comfy["pack"].comfy_entrypoint())
    assert isinstance(extension, comfy["ComfyExtension"])
    return {node.GET_SCHEMA().node_id: node for node in asyncio.run(extension.get_node_list())}


def workflow(node_id: str, *texts: str) -> dict:
    """An API-format workflow where ``node_id``'s positive input comes from CLIPTextEncode nodes (combined)."""
    graph = {f"t{i}": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["c", 0]}}
             for i, text in enumerate(texts)}
    link = ["t0", 0]
    for i in range(1, len(texts)):
        graph[f"k{i}"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": link,
                                                                           "conditioning_2": [f"t{i}", 0]}}
        link = [f"k{i}", 0]
    graph[node_id] = {"class_type": "MemguardMemorizationGuard", "inputs": {"positive": link}}
    return graph


def run_node(comfy, node: type, *, prompt_id: str = "prompt-1", node_id: str = "7", graph: dict | None = None,
             **inputs):
    """As ComfyUI's executor does: a class clone carrying the hidden inputs, called inside the node context."""
    hidden = comfy["io"].Hidden
    clone = node.PREPARE_CLASS_CLONE({hidden.unique_id: node_id, hidden.prompt: graph})
    with comfy["context"](prompt_id, node_id):
        return clone.execute(**inputs)


def write_policy(tmp_path: Path, name: str, rules: list[dict], **extra) -> str:
    policy = {"name": name, "calibration": "off", "rules": rules, "default": "allow", "on_error": "block", **extra}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(policy))
    return str(path)


def inputs(objects, tmp_path: Path, policy_path: str, **overrides):
    values = {
        "model": objects["model"],
        "clip": objects["clip"],
        "positive": objects["positive"],
        "negative": objects["negative"],
        "policy": "monitor",
        "policy_path": policy_path,
        "unconditional": "empty prompt (reference)",
        "seed": 51,
        "samples": 1,
        "latent_size": LATENT,
        "audit_path": str(tmp_path / "audit.jsonl"),
    }
    values.update(overrides)
    return values


def audit_records(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


def decision_record(tmp_path: Path) -> dict:
    """The last decision record, with the outcome its outcome record (if any) gives."""
    records = audit_records(tmp_path)
    decided = [r for r in records if r["event"] in ("decision", "error")][-1]
    done = [r for r in records if r["event"] == "outcome" and r["decision_hash"] == decided["hash"]]
    return {**decided, "outcome": done[0]["outcome"] if done else decided["outcome"],
            "extras": done[0]["extras"] if done else decided["extras"]}


def reference_score(pipe, seed: int = 51, samples: int = 1):
    from guard.scoring import Scorer

    return Scorer(pipe, seed=seed, samples=samples).score([PROMPT])[0]


def test_pack_is_v3_only(comfy):
    assert not hasattr(comfy["pack"], "NODE_CLASS_MAPPINGS"), "ComfyUI would ignore comfy_entrypoint"
    found = nodes(comfy)
    assert set(found) == {"MemguardMemorizationGuard", "MemguardMemorizationScore"}
    schema = found["MemguardMemorizationGuard"].GET_SCHEMA()
    assert [o.io_type for o in schema.outputs] == ["CONDITIONING", "FLOAT", "STRING"]
    assert comfy["io"].Hidden.unique_id in schema.hidden
    policy_input = next(i for i in schema.inputs if i.id == "policy")
    assert {"balanced", "strict", "monitor"} <= set(policy_input.options)


def test_guard_core_does_not_import_comfyui():
    pattern = re.compile(r"^\s*(from|import)\s+(comfy\w*|integrations)\b", re.MULTILINE)
    offenders = [str(p) for p in (ROOT / "guard").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_adapter_eps_and_timesteps_match_diffusers(comfy, objects, pipe):
    from memguard_comfyui_pack.memguard_comfy.adapter import ComfyUIModelAdapter

    adapter = ComfyUIModelAdapter(objects["model"], objects["clip"], latent_size=LATENT)
    assert adapter.scoring_timesteps(50) == (981, 41)
    assert adapter.latent_shape == (4, LATENT, LATENT)
    cond = adapter.encode([PROMPT, "a red car"])
    x = torch.randn(2, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (981, 41):
            timesteps = torch.tensor([t, t])
            eps = adapter.predict(x, timesteps, cond)
            reference = pipe.unet(x, timesteps, encoder_hidden_states=cond.embeds).sample
            assert torch.allclose(eps, reference, atol=1e-5), (t, (eps - reference).abs().max())
    sigma = objects["model"].model.calls[-1]["sigma"]
    expected = ((1 - pipe.scheduler.alphas_cumprod[41]) / pipe.scheduler.alphas_cumprod[41]).sqrt()
    assert torch.allclose(sigma, expected.expand_as(sigma), rtol=1e-6), "apply_model must receive sigma, not t"


@pytest.mark.parametrize(("seed", "samples"), [(51, 1), (7, 2)])
def test_score_node_equals_guard_score(comfy, objects, pipe, tmp_path, seed, samples):
    policy = write_policy(tmp_path, "observe", [{"when": {"score": {"gte": 1e9}}, "action": "warn"}])
    out = run_node(
        comfy,
        nodes(comfy)["MemguardMemorizationScore"],
        **inputs(objects, tmp_path, policy, seed=seed, samples=samples),
    )
    expected = reference_score(pipe, seed=seed, samples=samples)
    score, norm, cos, report = out.args
    assert abs(score - expected.score) < 1e-5 and abs(norm - expected.norm) < 1e-5 and abs(cos - expected.cos) < 1e-5
    assert "allow" in report
    record = decision_record(tmp_path)
    assert record["outcome"] == "checked" and record["context"]["comfyui"]["prompt_id"] == "prompt-1"
    assert record["context"]["comfyui"]["node_id"] == "7" and abs(record["score"] - expected.score) < 1e-5
    assert record["source"] == "comfyui"


def test_negative_branch_as_unconditional(comfy, objects, pipe, tmp_path):
    policy = write_policy(tmp_path, "observe", [{"when": {"score": {"gte": 1e9}}, "action": "warn"}])
    node = nodes(comfy)["MemguardMemorizationScore"]
    same = run_node(comfy, node, **inputs(objects, tmp_path, policy, unconditional="negative conditioning"))
    assert abs(same.args[0] - reference_score(pipe).score) < 1e-5  # the negative here is the encoded ""
    other = [[objects["clip"].encode_from_tokens(objects["clip"].tokenize("a dog"), return_pooled=True)[0], {}]]
    changed = run_node(
        comfy, node, **inputs(objects, tmp_path, policy, unconditional="negative conditioning", negative=other)
    )
    assert abs(changed.args[0] - same.args[0]) > 1e-4
    assert decision_record(tmp_path)["context"]["comfyui"]["unconditional"] == "negative"


def _action_policy(tmp_path: Path, action: str, score: float, **rule) -> str:
    return write_policy(tmp_path, f"p-{action}", [{"when": {"score": {"gte": score - 1.0}}, "action": action, **rule}])


@pytest.mark.parametrize("action", ["allow", "warn"])
def test_allow_and_warn_pass_through(comfy, objects, pipe, tmp_path, action):
    expected = reference_score(pipe).score
    out = run_node(
        comfy,
        nodes(comfy)["MemguardMemorizationGuard"],
        **inputs(objects, tmp_path, _action_policy(tmp_path, action, expected)),
    )
    assert out.block_execution is None
    positive, score, report = out.args
    assert positive is not objects["positive"]  # a copy, never ComfyUI's cached object
    assert torch.equal(positive[0][0], objects["positive"][0][0])
    assert abs(score - expected) < 1e-5 and f"] {action}:" in report
    record = decision_record(tmp_path)
    assert (record["action"], record["outcome"]) == (action, "generated")


def test_block_stops_the_branch(comfy, objects, pipe, tmp_path):
    expected = reference_score(pipe).score
    policy = _action_policy(tmp_path, "block", expected, message="memorized")
    out = run_node(
        comfy,
        nodes(comfy)["MemguardMemorizationGuard"],
        prompt_id="p-9",
        node_id="12",
        **inputs(objects, tmp_path, policy),
    )
    assert out.block_execution is not None and "memguard blocked" in out.block_execution
    assert out.result is not None and len(out.args) == 3  # ComfyUI v0.3.64 drops a block without results
    record = decision_record(tmp_path)
    assert (record["action"], record["outcome"]) == ("block", "blocked")
    assert record["context"]["comfyui"] == {"prompt_id": "p-9", "node_id": "12", "unconditional": "empty"}


def test_rewrite_returns_mitigated_conditioning(comfy, objects, pipe, tmp_path):
    from guard.scoring import Scorer, TextConditioning

    expected = reference_score(pipe).score
    target = expected - 1e-3
    policy = _action_policy(
        tmp_path,
        "rewrite",
        expected,
        rewrite={"target": {"score": target}, "max_steps": 30, "lr": 0.05, "fallback": "block"},
    )
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationGuard"], **inputs(objects, tmp_path, policy))
    assert out.block_execution is None, out.args[2]
    positive, _, report = out.args
    assert not torch.equal(positive[0][0], objects["positive"][0][0]) and "rewritten in" in report
    rescored = Scorer(pipe).score_conditioning(TextConditioning(positive[0][0]))[0].score
    assert rescored <= target + 1e-5
    record = decision_record(tmp_path)
    assert (record["action"], record["outcome"]) == ("rewrite", "rewritten")
    assert record["extras"]["mitigation"]["met"] is True


def test_rewrite_missing_target_takes_fallback(comfy, objects, pipe, tmp_path):
    expected = reference_score(pipe).score
    policy = _action_policy(
        tmp_path,
        "rewrite",
        expected,
        rewrite={"target": {"score": expected - 1e6}, "max_steps": 1, "fallback": "block"},
    )
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationGuard"], **inputs(objects, tmp_path, policy))
    assert out.block_execution is not None and "not reached" in out.block_execution


def test_unscorable_model_fails_closed(comfy, objects, tmp_path):
    policy = write_policy(tmp_path, "closed", [{"when": {"score": {"gte": 0.0}}, "action": "warn"}])
    bad = inputs(objects, tmp_path, policy, clip=None)  # no CLIP and the empty prompt asked for
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationGuard"], **bad)
    assert out.block_execution is not None and "on_error" in out.block_execution
    record = decision_record(tmp_path)
    assert record["event"] == "error" and record["context"]["comfyui"]["prompt_id"] == "prompt-1"


def test_same_decision_score_and_record_through_every_front_end(comfy, objects, pipe, tmp_path):
    """One prompt through the diffusers Guard, the HTTP service and the ComfyUI node: one decision path."""
    from fastapi.testclient import TestClient

    from guard import Guard
    from guard.service import create_app

    expected = reference_score(pipe).score
    rules = [{"name": "high", "when": {"score": {"gte": expected - 1.0}}, "action": "warn"}]
    policy = write_policy(tmp_path, "shared", rules, audit={"prompt": "hash"})
    logs = {name: tmp_path / f"{name}.jsonl" for name in ("python", "service", "comfyui")}

    python_decision = Guard(pipe, policy, audit_path=logs["python"]).check(PROMPT)
    with TestClient(create_app(Guard(pipe, policy, audit_path=logs["service"], source="service"))) as client:
        service_body = client.post("/v1/check", json={"prompt": PROMPT}).json()
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationScore"], graph=workflow("7", PROMPT),
                   **inputs(objects, tmp_path, policy, audit_path=str(logs["comfyui"])))

    service_decision = service_body["decisions"][0]
    assert python_decision.action == service_decision["action"] == "warn"
    assert python_decision.rule == service_decision["rule"] == "high"
    assert abs(python_decision.score.score - service_decision["score"]["score"]) < 1e-6
    assert abs(out.args[0] - python_decision.score.score) < 1e-5
    (python_record,) = audit_records_at(logs["python"])
    (service_record,) = audit_records_at(logs["service"])
    (comfy_record,) = audit_records_at(logs["comfyui"])
    assert service_record["request_id"] == service_body["request_id"]
    assert {r["source"] for r in (python_record, service_record, comfy_record)} == {"python", "service", "comfyui"}
    same = ("event", "prompt", "prompt_mode", "prompt_index", "profile", "calibration", "rule", "action", "outcome",
            "thresholds", "policy", "error", "extras")
    for record in (service_record, comfy_record):
        assert set(record) == set(python_record)
        assert {k: record[k] for k in same} == {k: python_record[k] for k in same}
        for metric in ("norm", "cos", "score"):
            assert abs(record[metric] - python_record[metric]) < 1e-5


def test_every_conditioning_entry_is_scored_and_drop_blocked_drops_entries(comfy, objects, pipe, tmp_path):
    from guard.scoring import Scorer

    clip = objects["clip"]
    texts = [PROMPT, "a red car"]
    entries = [[clip.encode_from_tokens(clip.tokenize(t), return_pooled=True)[0], {"pooled_output": None}]
               for t in texts]
    scores = [s.score for s in Scorer(pipe).score(texts)]
    cut = (scores[0] + scores[1]) / 2
    high = 0 if scores[0] > scores[1] else 1
    rules = [{"name": "high", "when": {"score": {"gte": cut}}, "action": "block"}]
    for batch, blocked in (("drop_blocked", False), ("block_whole", True)):
        policy = write_policy(tmp_path, f"p-{batch}", rules, batch=batch, audit={"prompt": "plain"})
        out = run_node(comfy, nodes(comfy)["MemguardMemorizationGuard"], graph=workflow("7", *texts),
                       **inputs(objects, tmp_path, policy, positive=entries))
        assert (out.block_execution is not None) == blocked
        records = [r for r in audit_records(tmp_path) if r["event"] == "decision"][-2:]
        assert [r["prompt"] for r in records] == texts  # read from the workflow's text-encode nodes
        assert [r["action"] for r in records] == ["block" if i == high else "allow" for i in range(2)]
        if not blocked:
            (kept,) = out.args[0]
            assert torch.equal(kept[0], entries[1 - high][0])


def audit_records_at(path: Path) -> list[dict]:
    """The per-prompt records, without provenance events (policy_loaded, service_started)."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if r["event"] in ("decision", "error", "outcome")]
