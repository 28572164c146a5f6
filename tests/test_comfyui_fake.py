"""The ComfyUI node pack against fakes of ComfyUI v0.3.64 (tests/comfy_fakes): scores equal memguard's own
for the same denoiser, text embeddings, seed and timesteps, for every family the node accepts (SD 1.x here;
SDXL, SD3 and FLUX in the second half, on twins from tests/comfy_twins.py), and each policy action behaves as
specified."""

from __future__ import annotations

import asyncio
import hashlib
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
        import comfy.fake_networks
        import comfy.model_base
        import comfy.model_management
        import comfy.model_patcher
        import comfy.model_sampling
        import comfy.sd
        import comfy.supported_models
        import comfy_execution.utils
        from comfy_api.latest import ComfyExtension, io

        yield {
            "pack": module,
            "io": io,
            "ComfyExtension": ComfyExtension,
            "model_base": comfy.model_base,
            "patcher": comfy.model_patcher,
            "sd": comfy.sd,
            "configs": comfy.supported_models,
            "networks": comfy.fake_networks,
            "sampling": comfy.model_sampling,
            "management": comfy.model_management,
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
    config = comfy["configs"].SD15({"context_dim": 32, "in_channels": 4})
    base = comfy["model_base"].BaseModel(config, comfy["networks"].UNetModel(pipe.unet))
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


def block_message(out) -> str | None:
    """The error a guarding node's block ends the queue item with (None when it did not block): its first output is
    ComfyUI's silent ``ExecutionBlocker``, the others are values, and the node expands into a ``MemguardBlocked``
    node that waits for the report output and raises the message."""
    from comfy_execution.graph_utils import ExecutionBlocker

    if out.expand is None:
        assert not isinstance(out.args[0], ExecutionBlocker)
        return None
    assert out.block_execution is None  # a V3 block_execution would block the report too
    assert isinstance(out.args[0], ExecutionBlocker) and out.args[0].message is None
    assert isinstance(out.args[2], str) and "blocked" in out.args[2]  # the report still reaches its viewers
    ((node_id, node),) = out.expand.items()
    assert node["class_type"] == "MemguardBlocked" and node["inputs"]["report"][1] == 2
    assert node_id.startswith(f"{node['inputs']['report'][0]}.")
    return node["inputs"]["message"]


def reference_score(pipe, seed: int = 51, samples: int = 1):
    from guard.scoring import Scorer

    return Scorer(pipe, seed=seed, samples=samples).score([PROMPT])[0]


def test_pack_is_v3_only(comfy):
    assert not hasattr(comfy["pack"], "NODE_CLASS_MAPPINGS"), "ComfyUI would ignore comfy_entrypoint"
    found = nodes(comfy)
    assert set(found) == {"MemguardMemorizationGuard", "MemguardGuardedKSampler", "MemguardMemorizationScore",
                          "MemguardBlocked"}
    schema = found["MemguardMemorizationGuard"].GET_SCHEMA()
    assert [o.io_type for o in schema.outputs] == ["CONDITIONING", "FLOAT", "STRING", "STRING"]
    assert comfy["io"].Hidden.unique_id in schema.hidden
    policy_input = next(i for i in schema.inputs if i.id == "policy")
    assert {"balanced", "strict", "monitor"} <= set(policy_input.options)


def test_guard_core_does_not_import_comfyui():
    pattern = re.compile(r"^\s*(from|import)\s+(comfy\w*|integrations)\b", re.MULTILINE)
    offenders = [str(p) for p in (ROOT / "guard").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_adapter_eps_and_timesteps_match_diffusers(comfy, objects, pipe):
    from memguard_comfyui_pack.memguard_comfy.adapter import ComfyUIDiscreteAdapter, comfy_adapter

    adapter = comfy_adapter(objects["model"], objects["clip"], latent_size=LATENT)
    assert type(adapter) is ComfyUIDiscreteAdapter and adapter.family == "sd1"
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
    assert torch.allclose(sigma, expected.expand_as(sigma), rtol=1e-5), "apply_model must receive sigma, not t"
    assert objects["model"].model.calls[-1]["inputs"] == []  # SD 1.x: c_crossattn only, no adm


@pytest.mark.parametrize(("seed", "samples"), [(51, 1), (7, 2)])
def test_score_node_equals_guard_score(comfy, objects, pipe, tmp_path, seed, samples):
    policy = write_policy(tmp_path, "observe", [{"when": {"score": {"gte": 1e9}}, "action": "warn"}])
    out = run_node(
        comfy,
        nodes(comfy)["MemguardMemorizationScore"],
        **inputs(objects, tmp_path, policy, seed=seed, samples=samples),
    )
    expected = reference_score(pipe, seed=seed, samples=samples)
    score, norm, cos, report, _ = out.args
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
    assert block_message(out) is None
    positive, score, report, _ = out.args
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
    assert "memguard blocked" in (block_message(out) or "")
    assert out.result is not None and len(out.args) == 4  # ComfyUI v0.3.64 drops a block without results
    record = decision_record(tmp_path)
    assert (record["action"], record["outcome"]) == ("block", "blocked")
    assert record["context"]["comfyui"] == {"prompt_id": "p-9", "node_id": "12", "unconditional": "empty",
                                            "family": "sd1"}


def test_rewrite_returns_mitigated_conditioning(comfy, objects, pipe, tmp_path):
    from guard.scoring import Scorer, TextConditioning

    expected = reference_score(pipe).score
    target = expected - 1e-3
    policy = _action_policy(
        tmp_path,
        "rewrite",
        expected,
        rewrite={"target": {"score": target}, "max_steps": 30, "lr": 0.05, "fallback": "block", "verify": None},
    )
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationGuard"], **inputs(objects, tmp_path, policy))
    assert block_message(out) is None, out.args[2]
    positive, _, report, _ = out.args
    assert not torch.equal(positive[0][0], objects["positive"][0][0])
    assert "rewritten by prompt_embedding, unverified" in report
    rescored = Scorer(pipe).score_conditioning(TextConditioning(positive[0][0]))[0].score
    assert rescored <= target + 1e-5
    record = decision_record(tmp_path)
    assert (record["action"], record["outcome"]) == ("rewrite", "generated")  # "rewritten" means verified
    mitigation = record["extras"]["mitigation"]
    assert mitigation["released"] == "prompt_embedding" and mitigation["verified"] is False
    assert mitigation["rungs"][0]["mitigations"][0]["met"] is True


def test_a_verified_rewrite_falls_back_in_a_conditioning_node(comfy, objects, pipe, tmp_path):
    """The node does not run the sampler, so it cannot verify: a rule that asks for verification takes its fallback."""
    expected = reference_score(pipe).score
    policy = _action_policy(tmp_path, "rewrite", expected, rewrite={"target": {"score": expected - 1e-3}})
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationGuard"], **inputs(objects, tmp_path, policy))
    assert "cannot generate" in (block_message(out) or "")
    assert decision_record(tmp_path)["outcome"] == "blocked"


def test_rewrite_missing_target_takes_fallback(comfy, objects, pipe, tmp_path):
    expected = reference_score(pipe).score
    policy = _action_policy(
        tmp_path,
        "rewrite",
        expected,
        rewrite={"target": {"score": expected - 1e6}, "max_steps": 1, "fallback": "block", "verify": None},
    )
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationGuard"], **inputs(objects, tmp_path, policy))
    assert "no rung passed" in (block_message(out) or "")


def test_unscorable_model_fails_closed(comfy, objects, tmp_path):
    policy = write_policy(tmp_path, "closed", [{"when": {"score": {"gte": 0.0}}, "action": "warn"}])
    bad = inputs(objects, tmp_path, policy, clip=None)  # no CLIP and the empty prompt asked for
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationGuard"], **bad)
    assert "on_error" in (block_message(out) or "")
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
        assert (block_message(out) is not None) == blocked
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


# ---------------------------------------------------------------------------------------------- SDXL, SD3, FLUX
#
# Twins (tests/comfy_twins.py) of each family in the fakes' ComfyUI model classes: the node's score must equal the
# diffusers adapter's on the same weights and embeddings to 1e-5, with ComfyUI's conventions (SDXL's adm built by
# encode_adm, flow sigmas and timestep labels, FLUX packing and guidance) in between.

OTHER = "a red car on the street"
FAMILIES = ["sdxl", "sd3", "flux", "flux-schnell"]
#: The family's own text-encode node and how it holds one prompt text (for workflow_texts).
TEXT_NODES = {
    "sdxl": ("CLIPTextEncodeSDXL", lambda t: {"text_g": t, "text_l": t, "width": 1024, "height": 1024}),
    "sd3": ("CLIPTextEncodeSD3", lambda t: {"clip_g": t, "clip_l": t, "t5xxl": t, "empty_padding": "none"}),
    "flux": ("CLIPTextEncodeFlux", lambda t: {"clip_l": t, "t5xxl": t, "guidance": 3.5}),
    "flux-schnell": ("CLIPTextEncode", lambda t: {"text": t}),
}


_BUILT: dict[tuple[int, str], dict] = {}


def build_family(comfy, name: str) -> dict:
    """A twin pipeline, the same weights as a fake ComfyUI MODEL of the family, its CLIP, and reference scores
    (built once per family for this module's fakes)."""
    key = (id(comfy["configs"]), name)
    if key not in _BUILT:
        _BUILT[key] = _build_family(comfy, name)
    return _BUILT[key]


def _build_family(comfy, name: str) -> dict:
    from comfy_twins import flux_twin, sd3_twin, sdxl_twin

    from guard.scoring import Scorer

    configs, bases, nets = comfy["configs"], comfy["model_base"], comfy["networks"]
    if name == "sdxl":
        pipe = sdxl_twin(seed=5)
        config = configs.SDXL({"in_channels": 4, "context_dim": 64, "adm_in_channels": 6 * 256 + 32})
        base = bases.SDXL(config, nets.UNetModel(pipe.unet))
    elif name == "sd3":
        pipe = sd3_twin(seed=6)
        base = bases.SD3(configs.SD3({"in_channels": 16, "depth": 2}), nets.MMDiT(pipe.transformer))
    else:
        guidance = name == "flux"
        pipe = flux_twin(seed=7, guidance_embeds=guidance)
        config = (configs.Flux if guidance else configs.FluxSchnell)(
            {"image_model": "flux", "in_channels": 16, "out_channels": 16, "guidance_embed": guidance})
        model_type = bases.ModelType.FLUX if guidance else bases.ModelType.FLOW
        base = bases.Flux(config, nets.Flux(pipe.transformer), model_type=model_type)
    model = unpatched = comfy["patcher"].ModelPatcher(base)
    if name == "flux":  # a ModelSamplingFlux patch for a 512 x 768 generation (mu of 1536 tokens), as workflows set
        model = model.clone()
        sampling = bases.model_sampling(base.model_config, bases.ModelType.FLUX)
        sampling.set_parameters(shift=0.5 + 0.65 * (1536 - 256) / 3840)
        model.add_object_patch("model_sampling", sampling)
    clip = comfy["sd"].CLIP(pipe)
    reference = Scorer(pipe).score([PROMPT, OTHER])
    return {"name": name, "pipe": pipe, "model": model, "unpatched": unpatched, "clip": clip, "reference": reference}


@pytest.fixture(scope="module", params=FAMILIES)
def family(comfy, request):
    return build_family(comfy, request.param)


def entry(family: dict, text: str, **options) -> list:
    """One conditioning entry as the family's text-encode node makes it (embeddings and pooled output)."""
    clip = family["clip"]
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [cond, {"pooled_output": pooled, **options}]


def family_inputs(family: dict, tmp_path: Path, policy_path: str, **overrides) -> dict:
    values = {
        "model": family["model"], "clip": family["clip"], "positive": [entry(family, PROMPT)],
        "negative": [entry(family, "")], "policy": "monitor", "policy_path": policy_path,
        "unconditional": "empty prompt (reference)", "seed": 51, "samples": 1, "latent_size": 0,
        "audit_path": str(tmp_path / "audit.jsonl"),
    }
    values.update(overrides)
    return values


def family_workflow(family: dict, node_id: str, *texts: str) -> dict:
    """An API-format workflow feeding ``node_id``'s positive from the family's text-encode nodes (combined;
    FLUX's through a FluxGuidance node, as FLUX workflows do)."""
    kind, inputs_of = TEXT_NODES[family["name"]]
    graph = {f"t{i}": {"class_type": kind, "inputs": {**inputs_of(t), "clip": ["c", 0]}} for i, t in enumerate(texts)}
    link = ["t0", 0]
    for i in range(1, len(texts)):
        graph[f"k{i}"] = {"class_type": "ConditioningCombine",
                          "inputs": {"conditioning_1": link, "conditioning_2": [f"t{i}", 0]}}
        link = [f"k{i}", 0]
    if family["name"] == "flux":
        graph["g"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": link, "guidance": 2.5}}
        link = ["g", 0]
    graph[node_id] = {"class_type": "MemguardMemorizationGuard", "inputs": {"positive": link}}
    return graph


OBSERVE = [{"when": {"score": {"gte": 1e9}}, "action": "warn"}]


def test_family_adapter_is_recognised_by_model_class(comfy, family):
    from memguard_comfyui_pack.memguard_comfy import adapter as pack

    made = pack.comfy_adapter(family["model"], family["clip"])
    expected = {"sdxl": pack.ComfyUISDXLAdapter, "sd3": pack.ComfyUISD3Adapter, "flux": pack.ComfyUIFluxAdapter,
                "flux-schnell": pack.ComfyUIFluxAdapter}[family["name"]]
    assert type(made) is expected and made.latent_shape[1:] == (128, 128)  # native 1024 px unless told otherwise
    reference = family["reference"][0]
    made = pack.comfy_adapter(family["model"], family["clip"], latent_size=LATENT)
    assert made.latent_shape == (4 if family["name"] == "sdxl" else 16, LATENT, LATENT)
    assert made.default_profile == reference.profile
    t_hi, t_lo = made.scoring_timesteps(50)
    assert abs(t_hi - reference.t_hi) <= 1e-4 * max(1.0, abs(reference.t_hi))
    assert abs(t_lo - reference.t_lo) <= 1e-4 * max(1.0, abs(reference.t_lo))


def test_family_score_node_equals_diffusers(comfy, family, tmp_path):
    """The node's score is the diffusers adapter's on the twin, to 1e-5; FLUX ignores the workflow's guidance
    (the score is defined at 3.5); the record says which family, sizes and guidance were used."""
    positive = [entry(family, PROMPT, guidance=7.0)] if family["name"].startswith("flux") else None
    overrides = {"latent_size": LATENT, **({"positive": positive} if positive else {})}
    policy = write_policy(tmp_path, "observe", OBSERVE, audit={"prompt": "hash"})
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationScore"], graph=family_workflow(family, "7", PROMPT),
                   **family_inputs(family, tmp_path, policy, **overrides))
    score, norm, cos, report, _ = out.args
    expected = family["reference"][0]
    assert abs(score - expected.score) < 1e-5 and abs(norm - expected.norm) < 1e-5 and abs(cos - expected.cos) < 1e-5
    record = decision_record(tmp_path)
    assert record["prompt"] == hashlib.sha256(PROMPT.encode()).hexdigest()
    assert abs(record["score"] - expected.score) < 1e-5 and record["profile"] == expected.profile
    context = record["context"]["comfyui"]
    assert context["family"] == family["name"].split("-")[0]
    if family["name"] == "sdxl":
        assert context["size"] == {"width": 64, "height": 64, "crop_w": 0, "crop_h": 0, "target_width": 64,
                                   "target_height": 64, "source": "native"}
        assert "SDXL size conditioning: native (64x64" in report
    if family["name"].startswith("flux"):
        assert context["guidance"] == (3.5 if family["name"] == "flux" else None)
        assert ("FLUX scored with guidance 3.5 and the native size's mu" if family["name"] == "flux"
                else "FLUX scored with no guidance input and shift 1 ") in report
        assert family["model"].model.calls[-1]["inputs"] == (["guidance", "y"] if family["name"] == "flux" else ["y"])


def test_family_every_entry_scored_with_prompt_texts(comfy, family, tmp_path):
    """Two entries combined: both scored (each equal to diffusers), each record with its text from the workflow."""
    positive = [entry(family, PROMPT), entry(family, OTHER)]
    policy = write_policy(tmp_path, "plain", OBSERVE, audit={"prompt": "plain"})
    run_node(comfy, nodes(comfy)["MemguardMemorizationScore"], graph=family_workflow(family, "7", PROMPT, OTHER),
             **family_inputs(family, tmp_path, policy, positive=positive, latent_size=LATENT))
    records = [r for r in audit_records(tmp_path) if r["event"] == "decision"]
    assert [r["prompt"] for r in records] == [PROMPT, OTHER]
    for record, expected in zip(records, family["reference"]):
        assert abs(record["score"] - expected.score) < 1e-5


@pytest.mark.parametrize("action", ["warn", "block"])
def test_family_warn_and_block(comfy, family, tmp_path, action):
    expected = family["reference"][0].score
    policy = _action_policy(tmp_path, action, expected)
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationGuard"],
                   **family_inputs(family, tmp_path, policy, latent_size=LATENT))
    record = decision_record(tmp_path)
    if action == "block":
        assert block_message(out) is not None and (record["action"], record["outcome"]) == ("block", "blocked")
    else:
        assert block_message(out) is None and (record["action"], record["outcome"]) == ("warn", "generated")
        assert torch.equal(out.args[0][0][0], family_inputs(family, tmp_path, policy)["positive"][0][0])


def test_family_rewrite_returns_mitigated_conditioning(comfy, family, tmp_path):
    """The rewritten embeddings and pooled output go downstream, at the entry's own token length, and score
    at most the target on the diffusers twin."""
    from guard.scoring import Scorer, TextConditioning

    expected = family["reference"][0].score
    target = expected - 1e-3
    rewrite = {"target": {"score": target}, "max_steps": 20, "lr": 0.05, "fallback": "block", "verify": None}
    policy = _action_policy(tmp_path, "rewrite", expected, rewrite=rewrite)
    original = entry(family, PROMPT)
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationGuard"],
                   **family_inputs(family, tmp_path, policy, latent_size=LATENT, positive=[original]))
    assert block_message(out) is None, out.args[2]
    (rewritten,) = out.args[0]
    assert rewritten[0].shape == original[0].shape and not torch.equal(rewritten[0], original[0])
    pooled = rewritten[1]["pooled_output"]
    assert pooled.shape == original[1]["pooled_output"].shape
    rescored = Scorer(family["pipe"]).score_conditioning(TextConditioning(rewritten[0], pooled))[0].score
    assert rescored <= target + 1e-5
    assert decision_record(tmp_path)["extras"]["mitigation"]["released"] == "prompt_embedding"


def test_sdxl_size_conditioning_from_the_entries(comfy, tmp_path):
    """CLIPTextEncodeSDXL's sizes (in the entry's options) are the score's time ids, ComfyUI's order (height,
    width, crop_h, crop_w, target height, width) = diffusers' (original size, crop top-left, target size); entries
    that disagree are scored at the native size and the report says so."""
    from guard.scoring import Scorer
    from guard.scoring.adapters import StableDiffusionXLAdapter

    sdxl = build_family(comfy, "sdxl")
    pipe = sdxl["pipe"]
    sizes = {"width": 128, "height": 96, "crop_w": 8, "crop_h": 4, "target_width": 112, "target_height": 80}
    reference = StableDiffusionXLAdapter(pipe)
    reference._time_ids = pipe._get_add_time_ids((96, 128), (4, 8), (80, 112), dtype=torch.float32,
                                                 text_encoder_projection_dim=32)
    expected = Scorer(reference).score([PROMPT])[0]
    assert abs(expected.score - sdxl["reference"][0].score) > 1e-3  # the sizes matter to this twin
    policy = write_policy(tmp_path, "observe", OBSERVE)
    node = nodes(comfy)["MemguardMemorizationScore"]
    out = run_node(comfy, node, **family_inputs(sdxl, tmp_path, policy, latent_size=LATENT,
                                                positive=[entry(sdxl, PROMPT, **sizes)]))
    assert abs(out.args[0] - expected.score) < 1e-5
    assert "from the workflow: 128x96, crop 8,4, target 112x80" in out.args[3]
    assert decision_record(tmp_path)["context"]["comfyui"]["size"] == {**sizes, "source": "workflow"}

    partial = {"width": 128, "height": 96}  # target defaults to the size, crop to 0, as encode_adm does
    reference._time_ids = pipe._get_add_time_ids((96, 128), (0, 0), (96, 128), dtype=torch.float32,
                                                 text_encoder_projection_dim=32)
    out = run_node(comfy, node, **family_inputs(sdxl, tmp_path, policy, latent_size=LATENT,
                                                positive=[entry(sdxl, PROMPT, **partial)]))
    assert abs(out.args[0] - Scorer(reference).score([PROMPT])[0].score) < 1e-5

    mixed = [entry(sdxl, PROMPT, **sizes), entry(sdxl, OTHER)]
    out = run_node(comfy, node, **family_inputs(sdxl, tmp_path, policy, latent_size=LATENT, positive=mixed))
    assert "the entries carry different sizes; all scored at the native" in out.args[3]
    records = [r for r in audit_records(tmp_path) if r["event"] == "decision"][-2:]
    for record, native in zip(records, sdxl["reference"]):
        assert abs(record["score"] - native.score) < 1e-5


def test_sdxl_unconditional_is_zeros_and_pooled_is_required(comfy, tmp_path):
    """u = zero token and pooled embeddings (diffusers' force_zeros_for_empty_prompt); an entry without pooled
    output is an audited on_error decision, not a crash."""
    from memguard_comfyui_pack.memguard_comfy.adapter import comfy_adapter

    sdxl = build_family(comfy, "sdxl")
    uncond = comfy_adapter(sdxl["model"], sdxl["clip"]).unconditional()
    assert uncond.pooled is not None and not uncond.embeds.any() and not uncond.pooled.any()
    policy = write_policy(tmp_path, "closed", OBSERVE)
    bare = [[entry(sdxl, PROMPT)[0], {}]]
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationGuard"],
                   **family_inputs(sdxl, tmp_path, policy, latent_size=LATENT, positive=bare))
    assert block_message(out) is not None  # the policy's on_error is block
    record = decision_record(tmp_path)
    assert record["event"] == "error" and "pooled_output" in record["reason"]


def test_flow_entries_of_different_token_lengths(comfy, tmp_path):
    """SD3 entries of different token lengths are not repeated to a common length (joint attention would see
    the repeats): each is scored at its own length, equal to diffusers on the same embeddings."""
    from guard.scoring import Scorer, TextConditioning

    sd3 = build_family(comfy, "sd3")
    full = entry(sd3, PROMPT)
    short = [full[0][:, :40].clone(), dict(full[1])]
    policy = write_policy(tmp_path, "observe", OBSERVE)
    run_node(comfy, nodes(comfy)["MemguardMemorizationScore"],
             **family_inputs(sd3, tmp_path, policy, latent_size=LATENT, positive=[full, short]))
    records = [r for r in audit_records(tmp_path) if r["event"] == "decision"]
    scorer = Scorer(sd3["pipe"])
    for record, row in zip(records, (full, short)):
        expected = scorer.score_conditioning(TextConditioning(row[0], row[1]["pooled_output"]))[0].score
        assert abs(record["score"] - expected) < 1e-5
    assert abs(records[0]["score"] - records[1]["score"]) > 1e-4


def test_flux_mu_is_the_native_sizes_not_the_workflows(comfy):
    """FLUX dev's mu is FluxPipeline's at the native size (1.15 at 1024 px; the twin's at its 64 px), whatever
    ModelSamplingFlux patch the workflow applies for its generation resolution: the score must not drift with it."""
    from comfy_twins import flux_native_shift
    from memguard_comfyui_pack.memguard_comfy.adapter import comfy_adapter

    flux = build_family(comfy, "flux")
    assert flux["model"].get_model_object("model_sampling").shift != pytest.approx(flux_native_shift(flux["pipe"]))
    patched = comfy_adapter(flux["model"], flux["clip"], latent_size=LATENT)
    plain = comfy_adapter(flux["unpatched"], flux["clip"], latent_size=LATENT)
    assert patched.shift == pytest.approx(flux_native_shift(flux["pipe"])) and patched.dynamic_shift
    assert plain.scoring_timesteps(50) == patched.scoring_timesteps(50)
    assert comfy_adapter(flux["model"], flux["clip"]).shift == pytest.approx(1.15)


@pytest.mark.parametrize("kind", ["chroma", "edm", "inpaint", "sd3-flux-sampling"])
def test_unsupported_models_are_refused_clearly(comfy, tmp_path, kind):
    from memguard_comfyui_pack.memguard_comfy.adapter import comfy_adapter

    from guard.scoring import UnsupportedPipelineError

    configs, bases, nets = comfy["configs"], comfy["model_base"], comfy["networks"]
    sdxl = build_family(comfy, "sdxl") if kind in ("edm", "inpaint") else None
    if kind == "sd3-flux-sampling":
        sd3 = build_family(comfy, "sd3")
        base = bases.SD3(configs.SD3({"in_channels": 16}), nets.MMDiT(sd3["pipe"].transformer), bases.ModelType.FLUX)
        clip, message = sd3["clip"], "resolution-dependent sampling"
    elif kind == "chroma":
        flux = build_family(comfy, "flux-schnell")
        base = bases.Chroma(configs.Flux({"in_channels": 16}), nets.Flux(flux["pipe"].transformer))
        clip, message = flux["clip"], "not a family memguard scores"
    elif kind == "edm":
        base = bases.SDXL(configs.SDXL({"in_channels": 4}), nets.UNetModel(sdxl["pipe"].unet), bases.ModelType.EDM)
        clip, message = sdxl["clip"], "EDM sampling"
    else:
        base = bases.SDXL(configs.SDXL({"in_channels": 9}), nets.UNetModel(sdxl["pipe"].unet))
        clip, message = sdxl["clip"], "inpainting"
    model = comfy["patcher"].ModelPatcher(base)
    with pytest.raises(UnsupportedPipelineError, match=message):
        comfy_adapter(model, clip)
    policy = write_policy(tmp_path, "closed", OBSERVE)
    positive = [[clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)[0], {}]]
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationGuard"],
                   **inputs({"model": model, "clip": clip, "positive": positive, "negative": positive}, tmp_path,
                            policy))
    assert block_message(out) is not None and message in decision_record(tmp_path)["reason"]


def test_sdxl_cores_are_kept_per_size(comfy, tmp_path):
    """Alternating size conditionings reuse their cores (and unconditional caches) instead of rebuilding them."""
    from memguard_comfyui_pack.memguard_comfy import nodes as pack_nodes

    sdxl = build_family(comfy, "sdxl")
    policy = write_policy(tmp_path, "observe", OBSERVE)
    node = nodes(comfy)["MemguardMemorizationScore"]
    cores = []
    for sizes in ({}, {"width": 128, "height": 128}, {}):
        run_node(comfy, node, **family_inputs(sdxl, tmp_path, policy, latent_size=LATENT,
                                              positive=[entry(sdxl, PROMPT, **sizes)]))
        cores.append(list(pack_nodes._CORES[sdxl["model"]].values())[-1])
    assert cores[0] is cores[2] and cores[0] is not cores[1]
    assert cores[1].scorer.adapter.size.width == 128 and cores[0].scorer.adapter.size.width == 64


def test_flow_rewrite_of_padded_rows_keeps_each_entry_length(comfy, tmp_path):
    """Rows padded to a common length for batching are rewritten at their own length (the padding is masked out,
    so it gets no gradient) and go downstream trimmed back to it."""
    from guard.scoring import Scorer, TextConditioning

    sd3 = build_family(comfy, "sd3")
    full = entry(sd3, PROMPT)
    short = [full[0][:, :40].clone(), dict(full[1])]
    scorer = Scorer(sd3["pipe"])
    scores = [scorer.score_conditioning(TextConditioning(e[0], e[1]["pooled_output"]))[0].score for e in (full, short)]
    target = min(scores) - 1e-3
    rule = {"when": {"score": {"gte": min(scores) - 1.0}}, "action": "rewrite",
            "rewrite": {"target": {"score": target}, "max_steps": 20, "lr": 0.05, "fallback": "block",
                        "verify": None}}
    policy = write_policy(tmp_path, "rw", [rule])
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationGuard"],
                   **family_inputs(sd3, tmp_path, policy, latent_size=LATENT, positive=[full, short]))
    assert block_message(out) is None, out.args[2]
    for rewritten, original in zip(out.args[0], (full, short), strict=True):
        assert rewritten[0].shape == original[0].shape and not torch.equal(rewritten[0], original[0])
        cond = TextConditioning(rewritten[0], rewritten[1]["pooled_output"])
        assert scorer.score_conditioning(cond)[0].score <= target + 1e-5


def test_sd2_v_prediction_scored_in_eps_space(comfy, tmp_path):
    """SD 2.x style (V_PREDICTION sampling): the node's eps-space score equals the diffusers adapter's."""
    from guard.scoring import Scorer
    from guard.testing import tiny_sd_pipeline

    pipe = tiny_sd_pipeline("v_prediction", seed=4, sample_size=LATENT)
    config = comfy["configs"].SD20({"context_dim": 32, "in_channels": 4})
    base = comfy["model_base"].BaseModel(config, comfy["networks"].UNetModel(pipe.unet),
                                         comfy["model_base"].ModelType.V_PREDICTION)
    clip = comfy["sd"].CLIP(pipe)
    model = comfy["patcher"].ModelPatcher(base)
    positive = [[clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)[0], {}]]
    policy = write_policy(tmp_path, "observe", OBSERVE)
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationScore"],
                   **inputs({"model": model, "clip": clip, "positive": positive, "negative": positive}, tmp_path,
                            policy))
    expected = Scorer(pipe).score([PROMPT])[0]
    assert expected.profile == "sd2" and abs(out.args[0] - expected.score) < 1e-5
    assert decision_record(tmp_path)["profile"] == "sd2"


def test_sdxl_v_prediction(comfy, tmp_path):
    """SDXL with V_PREDICTION sampling (v-pred SDXL fine-tunes): eps-space score equal to the diffusers adapter's
    for the same UNet with a v-prediction scheduler."""
    from comfy_twins import sdxl_twin

    from guard.scoring import Scorer
    from guard.testing import _ddim_scheduler

    pipe = sdxl_twin(seed=8)
    pipe.scheduler = _ddim_scheduler("v_prediction")
    configs, bases = comfy["configs"], comfy["model_base"]
    base = bases.SDXL(configs.SDXL({"in_channels": 4, "adm_in_channels": 6 * 256 + 32}),
                      comfy["networks"].UNetModel(pipe.unet), bases.ModelType.V_PREDICTION)
    sdxl = {"name": "sdxl", "model": comfy["patcher"].ModelPatcher(base), "clip": comfy["sd"].CLIP(pipe)}
    policy = write_policy(tmp_path, "observe", OBSERVE)
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationScore"],
                   **family_inputs(sdxl, tmp_path, policy, latent_size=LATENT))
    assert abs(out.args[0] - Scorer(pipe).score([PROMPT])[0].score) < 1e-5


# ---------------------------------------------------------------- explanations and adaptive sampling


def test_explanation_output_names_the_words_driving_the_score(comfy, objects, pipe, tmp_path):
    from guard.scoring import Scorer, explain_prompt

    policy = write_policy(tmp_path, "observe", [{"when": {"score": {"gte": 1e9}}, "action": "warn"}])
    node = nodes(comfy)["MemguardMemorizationScore"]
    out = run_node(comfy, node, graph=workflow("7", PROMPT), **inputs(objects, tmp_path, policy, explain="always"))
    explanation = out.args[4]
    expected = explain_prompt(Scorer(pipe), PROMPT)
    assert explanation.startswith("[0] allow: words driving the score (occlusion")
    assert f"{expected.top(1)[0].word!r} {expected.top(1)[0].weight:+.3g}" in explanation
    record = decision_record(tmp_path)
    assert len(record["explanation"]["words"]) == 5 and "word" not in record["explanation"]["words"][0]
    unknown = run_node(comfy, node, **inputs(objects, tmp_path, policy, explain="always"))  # no workflow: no text
    assert unknown.args[4] == "[0] no explanation: the prompt text is not known here"
    silent = run_node(comfy, node, graph=workflow("7", PROMPT), **inputs(objects, tmp_path, policy))
    assert silent.args[4] == ""  # the policy's explain: off


def test_adaptive_policy_through_the_node(comfy, objects, pipe, tmp_path):
    from memguard_comfyui_pack.memguard_comfy.adapter import comfy_adapter

    from guard import calibrate
    from guard.scoring import AdaptiveScorer, Scorer

    adapter = comfy_adapter(objects["model"], objects["clip"], latent_size=LATENT)
    captions = [f"a {c} {o}" for c in ("red", "blue", "green", "old") for o in ("cat", "dog", "house", "tree")]
    profile = calibrate(AdaptiveScorer(adapter, max_samples=4), captions, source="c", progress=False)
    profile.save(tmp_path / "adaptive.json")
    rule = {"when": {"score": {"gte": 1e9}}, "action": "warn"}  # far above every score: one draw decides
    policy = write_policy(tmp_path, "adaptive", [rule], calibration=str(tmp_path / "adaptive.json"),
                          scoring={"samples": "adaptive"})
    out = run_node(comfy, nodes(comfy)["MemguardMemorizationScore"], **inputs(objects, tmp_path, policy, samples=0))
    assert abs(out.args[0] - reference_score(pipe).score) < 1e-5  # one draw: the n=1 score
    assert "1 of 4 draws" in out.args[3]
    record = decision_record(tmp_path)
    assert record["samples"] == 1 and record["rule"] == "default"
    fixed = run_node(comfy, nodes(comfy)["MemguardMemorizationScore"], **inputs(objects, tmp_path, policy, samples=4))
    assert abs(fixed.args[0] - Scorer(pipe, samples=4).score([PROMPT])[0].score) < 1e-5  # the node's override


# ---------------------------------------------------------------------------------------------- guarded KSampler

SAMPLER_STEPS = 6


def sampler_inputs(objects, tmp_path: Path, policy_path: str, batch: int = 1, **overrides) -> dict:
    values = {
        "model": objects["model"], "clip": objects["clip"], "positive": objects["positive"],
        "negative": objects["negative"], "latent_image": {"samples": torch.zeros(batch, 4, LATENT, LATENT)},
        "seed": 11, "steps": SAMPLER_STEPS, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal",
        "denoise": 1.0, "policy": "monitor", "policy_path": policy_path, "unconditional": "empty prompt (reference)",
        "detection_seed": 51, "samples": 1, "latent_size": LATENT, "audit_path": str(tmp_path / "audit.jsonl"),
    }
    values.update(overrides)
    return values


def ksampler(objects, batch: int = 1, seed: int = 11, cfg_function=None, positive=None) -> torch.Tensor:
    """What ComfyUI's own KSampler node returns for the same inputs (``nodes.common_ksampler``'s steps)."""
    import comfy.sample

    model = objects["model"]
    if cfg_function is not None:
        model = model.clone()
        model.set_model_sampler_cfg_function(cfg_function)
    latent_image = comfy.sample.fix_empty_latent_channels(model, torch.zeros(batch, 4, LATENT, LATENT))
    noise = comfy.sample.prepare_noise(latent_image, seed, None)
    return comfy.sample.sample(model, noise, SAMPLER_STEPS, 7.5, "euler", "normal", positive or objects["positive"],
                               objects["negative"], latent_image, denoise=1.0, seed=seed)


def sampler_calls(comfy) -> list[dict]:
    import comfy.sample

    return comfy.sample.calls


def test_guarded_sampler_schema_has_ksampler_inputs(comfy):
    schema = nodes(comfy)["MemguardGuardedKSampler"].GET_SCHEMA()
    ids = [i.id for i in schema.inputs]
    assert ids[:11] == ["model", "clip", "positive", "negative", "latent_image", "seed", "steps", "cfg",
                        "sampler_name", "scheduler", "denoise"]
    assert {"policy", "policy_path", "detection_seed", "latent_size", "audit_path"} <= set(ids)
    assert [o.io_type for o in schema.outputs] == ["LATENT", "FLOAT", "STRING", "STRING"]
    assert schema.enable_expand and nodes(comfy)["MemguardMemorizationGuard"].GET_SCHEMA().enable_expand


def test_guarding_nodes_run_on_every_queue_item(comfy):
    """ComfyUI re-runs a node whose fingerprint differs from the last run's; NaN never equals itself."""
    for node_id in ("MemguardMemorizationGuard", "MemguardGuardedKSampler", "MemguardBlocked"):
        value = nodes(comfy)[node_id].fingerprint_inputs(seed=1)
        assert value != value, node_id


def test_guarded_sampler_allows_exactly_as_ksampler(comfy, objects, pipe, tmp_path, monkeypatch):
    """An allowed prompt is sampled as KSampler samples it (bit-identical, two images of one seed), after its
    decision record is on disk; the outcome record follows."""
    import comfy.sample as comfy_sample

    expected = ksampler(objects, batch=2)
    policy = write_policy(tmp_path, "observe", OBSERVE)
    seen: list[list[str]] = []
    sample = comfy_sample.sample

    def recording(*args, **kwargs):
        seen.append([r["event"] for r in audit_records(tmp_path)])
        return sample(*args, **kwargs)

    monkeypatch.setattr(comfy_sample, "sample", recording)
    out = run_node(comfy, nodes(comfy)["MemguardGuardedKSampler"], graph=workflow("7", PROMPT),
                   **sampler_inputs(objects, tmp_path, policy, batch=2))
    assert block_message(out) is None
    latent, score, report, _ = out.args
    assert torch.equal(latent["samples"], expected)
    assert abs(score - reference_score(pipe).score) < 1e-5 and "outcome: generated" in report
    assert seen == [["policy_loaded", "decision"]]  # one sampler call, after the decision record
    record = decision_record(tmp_path)
    assert (record["action"], record["outcome"]) == ("allow", "generated")
    assert record["prompt"] == hashlib.sha256(PROMPT.encode()).hexdigest()
    assert record["context"]["comfyui"]["prompt_id"] == "prompt-1"


def test_guarded_sampler_block_samples_nothing_and_raises_the_reason(comfy, objects, pipe, tmp_path):
    expected = reference_score(pipe).score
    policy = _action_policy(tmp_path, "block", expected, message="memorized")
    before = len(sampler_calls(comfy))
    out = run_node(comfy, nodes(comfy)["MemguardGuardedKSampler"], node_id="31",
                   **sampler_inputs(objects, tmp_path, policy))
    message = block_message(out)
    assert message is not None and "memorized" in message and len(sampler_calls(comfy)) == before
    assert out.expand["31.memguard_blocked"]["inputs"]["report"] == ["31", 2]
    record = decision_record(tmp_path)
    assert (record["action"], record["outcome"]) == ("block", "blocked")
    assert record["request_id"] in message
    blocked = nodes(comfy)["MemguardBlocked"]
    with pytest.raises(comfy["pack"].memguard_comfy.nodes.GuardBlocked, match="memorized"):
        blocked.execute(message=message, report=out.args[2])


def _schedule_reference(objects, until: float, scale: float):
    """An independent CFG hook for ``ksampler``: ``scale`` while the step's position among the sigmas is below
    ``until``, the call's cfg after."""
    def cfg(args):
        sigmas = args["model_options"]["transformer_options"]["sample_sigmas"]
        position = int((sigmas[:-1] - args["sigma"][0]).abs().argmin())
        s = scale if position / (len(sigmas) - 1) < until else args["cond_scale"]
        return args["uncond"] + (args["cond"] - args["uncond"]) * s

    return cfg


def test_guarded_sampler_rewrites_by_guidance_schedule_and_verifies(comfy, objects, pipe, tmp_path):
    """The guidance rung runs through ComfyUI's CFG hook: the released image is KSampler's with opposite guidance
    for the first half of the steps; the probes are sampled first (2 images, probe_steps), the rung once, and the
    verified generation itself is released."""
    expected = reference_score(pipe).score
    rewrite = {"ladder": ["guidance_schedule"], "guidance": [{"until": 0.5, "scale": -2.0}],
               "target": {"score": expected - 1.0}, "verify": {"max_similarity": 1.0, "probes": 2, "probe_steps": 4},
               "fallback": "block"}
    policy = _action_policy(tmp_path, "rewrite", expected, rewrite=rewrite)
    before = len(sampler_calls(comfy))
    out = run_node(comfy, nodes(comfy)["MemguardGuardedKSampler"], **sampler_inputs(objects, tmp_path, policy))
    assert block_message(out) is None, out.args[2]
    latent, _, report, _ = out.args
    assert torch.equal(latent["samples"], ksampler(objects, cfg_function=_schedule_reference(objects, 0.5, -2.0)))
    assert not torch.equal(latent["samples"], ksampler(objects))
    calls = sampler_calls(comfy)[before:]
    assert [(c["images"], c["steps"], c["cfg_function"]) for c in calls[:2]] == [(2, 4, False),
                                                                                  (1, SAMPLER_STEPS, True)]
    assert len(calls) == 4  # + the reference computations of this test, nothing else
    record = decision_record(tmp_path)
    assert (record["action"], record["outcome"]) == ("rewrite", "rewritten")
    mitigation = record["extras"]["mitigation"]
    assert mitigation["released"] == "guidance_schedule" and mitigation["verified"] is True
    assert "rewritten by guidance_schedule, verified" in report


def test_guarded_sampler_token_rung_samples_the_edited_prompt(comfy, objects, pipe, tmp_path):
    """The token rung in ComfyUI: the prompt's text (found in the graph) without the word that carries its score,
    encoded by the graph's CLIP, sampled by ComfyUI: the released latent is KSampler's for the edited prompt."""
    from guard.actions.trigger_words import delete_spans
    from guard.scoring import Scorer, prompt_words

    prompt = "a photo of a cat on a red beach"
    clip = objects["clip"]
    encoded, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
    score = Scorer(pipe).score([prompt])[0].score
    rewrite = {"ladder": ["token"], "target": {"score": score - 1e-4}, "max_words": 1,
               "verify": {"max_similarity": 1.0, "probes": 1, "probe_steps": 3}, "fallback": "block"}
    policy = _action_policy(tmp_path, "rewrite", score, rewrite=rewrite)
    out = run_node(comfy, nodes(comfy)["MemguardGuardedKSampler"], graph=workflow("7", prompt),
                   **sampler_inputs(objects, tmp_path, policy, positive=[[encoded, {"pooled_output": pooled}]]))
    assert block_message(out) is None, out.args[2]
    record = decision_record(tmp_path)
    assert (record["action"], record["outcome"]) == ("rewrite", "rewritten")
    (token,) = record["extras"]["mitigation"]["rungs"]
    assert token["rung"] == "token" and token["ran"] and "words" not in token["edits"]  # hashed prompts
    (index,) = token["edits"]["word_indices"]
    edited = delete_spans(prompt, [prompt_words(prompt)[index]])
    edited_cond, edited_pooled = clip.encode_from_tokens(clip.tokenize(edited), return_pooled=True)
    expected = ksampler(objects, positive=[[edited_cond, {"pooled_output": edited_pooled}]])
    assert torch.allclose(out.args[0]["samples"], expected, atol=1e-5)
    assert not torch.allclose(out.args[0]["samples"], ksampler(objects, positive=[[encoded, {}]]), atol=1e-3)


def test_guarded_sampler_unverified_rewrite_takes_the_fallback(comfy, objects, pipe, tmp_path):
    """No rung gets below the similarity threshold: the rule's fallback (block) ends the item with the reason."""
    expected = reference_score(pipe).score
    rewrite = {"ladder": ["guidance_schedule", "prompt_embedding"], "target": {"score": expected - 1e-3},
               "max_steps": 3, "verify": {"max_similarity": 0.0, "probes": 1, "probe_steps": 3}, "fallback": "block"}
    policy = _action_policy(tmp_path, "rewrite", expected, rewrite=rewrite)
    out = run_node(comfy, nodes(comfy)["MemguardGuardedKSampler"], **sampler_inputs(objects, tmp_path, policy))
    assert "no rung passed verification" in (block_message(out) or "")
    record = decision_record(tmp_path)  # the decision as written before acting, the outcome after
    assert (record["action"], record["outcome"]) == ("rewrite", "blocked")
    rungs = record["extras"]["mitigation"]["rungs"]
    assert [r["rung"] for r in rungs] == ["guidance_schedule", "prompt_embedding"]
    assert all(r["ran"] and r["verified"] is False and r["similarity"] for r in rungs)


def test_a_mixture_of_prompts_cannot_be_rewritten_but_is_sampled_as_mixed(comfy, objects, pipe, tmp_path):
    """Two entries (ConditioningCombine) are mixed into every image: no prompt can be rewritten alone, so the rule's
    fallback applies (here warn) and the release is KSampler's own mixture of both."""
    clip = objects["clip"]
    other = [clip.encode_from_tokens(clip.tokenize("a red car"), return_pooled=True)[0], {}]
    positive = [objects["positive"][0], other]
    rewrite = {"ladder": ["guidance_schedule"], "target": {"score": -10.0}, "fallback": "warn"}
    policy = write_policy(tmp_path, "mix", [{"when": {"score": {"gte": -1e9}}, "action": "rewrite",
                                             "rewrite": rewrite}])
    out = run_node(comfy, nodes(comfy)["MemguardGuardedKSampler"], graph=workflow("7", PROMPT, "a red car"),
                   **sampler_inputs(objects, tmp_path, policy, positive=positive))
    assert block_message(out) is None, out.args[2]
    assert torch.equal(out.args[0]["samples"], ksampler(objects, positive=positive))
    decisions = [r for r in audit_records(tmp_path) if r["event"] == "decision"]
    outcomes = [r for r in audit_records(tmp_path) if r["event"] == "outcome"]
    assert len(decisions) == 2 and [r["outcome"] for r in outcomes] == ["generated", "generated"]
    assert all("mixes into every image" in r["reason"] for r in outcomes)


def test_scheduled_cfg_applies_stages_per_image_row(comfy):
    from memguard_comfyui_pack.memguard_comfy.sampling import scheduled_cfg

    from guard.policy import GuidanceStage

    sigmas = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])
    cond, uncond = torch.full((3, 1), 2.0), torch.full((3, 1), 1.0)
    args = {"cond": cond, "uncond": uncond, "cond_scale": 7.0, "model_options":
            {"transformer_options": {"sample_sigmas": sigmas}}}
    cfg = scheduled_cfg({1: [GuidanceStage(until=0.5, scale=-2.0)]})
    early = cfg({**args, "sigma": torch.tensor([5.0] * 3)})  # step 1 of 4: fraction 0.25
    late = cfg({**args, "sigma": torch.tensor([2.0] * 3)})  # step 2 of 4: fraction 0.5, past the stage
    assert early.flatten().tolist() == [8.0, -1.0, 8.0] and late.flatten().tolist() == [8.0, 8.0, 8.0]
    seen = []

    def previous(a):
        seen.append(a["cond_scale"])
        return a["uncond"] * 0 + a["cond_scale"]

    chained = scheduled_cfg({0: [GuidanceStage(until=1.0, scale=3.0)]}, previous)({**args, "sigma": sigmas[:1]})
    assert chained.flatten().tolist() == [3.0, 7.0, 7.0] and sorted(seen) == [3.0, 7.0]


def test_generator_samples_a_rewritten_row_with_the_entry_options(comfy):
    """A rewritten FLUX row keeps its entry's options (FluxGuidance) with its own pooled output, one batch row per
    image; a calibration row (not the caller's) takes the call's first entry's options."""
    from memguard_comfyui_pack.memguard_comfy.sampling import ComfySampler, KSamplerSettings

    from guard.actions.generation import GenerationJob
    from guard.scoring import TextConditioning

    flux = build_family(comfy, "flux")
    positive = [entry(flux, PROMPT, guidance=2.5)]
    sampler = ComfySampler(flux["model"], positive, [entry(flux, "")], {"samples": torch.zeros(2, 4, 8, 8)},
                           KSamplerSettings(seed=3, steps=3, cfg=1.0, sampler_name="euler", scheduler="simple"),
                           entry_rows=[1], clip=flux["clip"], family="flux")
    assert sampler.latent_shape == (16, 8, 8) and sampler.images_per_prompt == 2
    assert "guidance-distilled" in sampler.guidance_unavailable
    row = TextConditioning(positive[0][0] + 1.0, positive[0][1]["pooled_output"] * 2)
    ((rows, (made,)),) = sampler._job_positive(GenerationJob(cond=row, images_per_prompt=2, prompts=[0]))
    assert rows == [0] and made[1]["guidance"] == 2.5 and made[0].shape[0] == 2
    assert torch.equal(made[1]["pooled_output"], (positive[0][1]["pooled_output"] * 2).repeat(2, 1))
    result = sampler(GenerationJob(cond=row, latents=torch.randn(2, 16, 8, 8), images_per_prompt=2, prompts=[0],
                                   kind="internal"))
    assert result.output is None and result.latents.shape == (2, 16, 8, 8)
    assert sampler._job_positive(GenerationJob(cond=row, images_per_prompt=1))[0][1][0][1]["guidance"] == 2.5


def test_block_mode_withhold_withholds_without_an_error(comfy, objects, pipe, tmp_path):
    """``block_mode: withhold``: the guarded output is blocked (nothing downstream runs) but the queue item is not
    failed; the report says the images were withheld, and the outcome record is ``withheld``."""
    expected = reference_score(pipe).score
    policy = write_policy(tmp_path, "withhold", [{"when": {"score": {"gte": expected - 1.0}}, "action": "block"}],
                          block_mode="withhold")
    for node_id, values in (("MemguardGuardedKSampler", sampler_inputs(objects, tmp_path, policy)),
                            ("MemguardMemorizationGuard", inputs(objects, tmp_path, policy))):
        out = run_node(comfy, nodes(comfy)[node_id], **values)
        from comfy_execution.graph_utils import ExecutionBlocker

        assert isinstance(out.args[0], ExecutionBlocker) and out.expand is None
        assert "withheld (block_mode: withhold)" in out.args[2]
        assert decision_record(tmp_path)["outcome"] == "withheld"
