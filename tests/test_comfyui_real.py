"""The ComfyUI node pack inside a real ComfyUI checkout (``COMFYUI_PATH``); skipped without one.

The pack is loaded by ComfyUI's own ``nodes.load_custom_node`` (V3 ``comfy_entrypoint``) and run by its
executor's ``_async_map_node_over_list`` / ``get_output_from_returns`` under ``torch.inference_mode``, as a queued
prompt is. The MODEL is a real ``ModelPatcher`` around a real ``BaseModel`` (ComfyUI's ldm UNet, built from an
explicit SD1-style ``unet_config``) carrying the weights of memguard's fixture diffusers UNet, renamed with
``comfy.utils.unet_to_diffusers``. ComfyUI's checkpoint loader only recognises full-size architectures, so the
CLIP is a stand-in with ComfyUI's ``tokenize``/``encode_from_tokens`` interface over the fixture's text encoder.
"""

from __future__ import annotations

import asyncio
import hashlib
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
    reason="set COMFYUI_PATH to a ComfyUI checkout (v0.3.64 checked) to run the node pack inside real ComfyUI",
)

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT / "integrations" / "comfyui"
PROMPT = "a photo of a cat"
LATENT = 8
UNET_CONFIG = {
    "image_size": LATENT,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 32,
    "num_res_blocks": [1, 1],
    "channel_mult": [1, 2],
    "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1],
    "transformer_depth_middle": 1,
    "context_dim": 32,
    "num_heads": 8,
    "num_head_channels": -1,
    "use_linear_in_transformer": False,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
    "disable_self_attentions": None,
}


class StandInCLIP:
    """ComfyUI's CLIP interface over the fixture pipeline's own tokenizer and text encoder."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.cond_stage_model = pipe.text_encoder

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        return {"l": text}

    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False, return_dict: bool = False):
        cond, _ = self.pipe.encode_prompt([tokens["l"]], torch.device("cpu"), 1, False)
        return (cond, None) if return_pooled else cond


@pytest.fixture(scope="module")
def comfy():
    """Real ComfyUI imported on the CPU, with the pack loaded by ComfyUI's custom node loader."""
    sys.path.insert(0, COMFYUI_PATH)
    argv = sys.argv
    sys.argv = ["main.py", "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management
        import comfy.model_patcher
        import comfy.supported_models
        import comfy.utils
        import execution
        import nodes
        from comfy_api.latest import io
    finally:
        sys.argv = argv
    assert asyncio.run(nodes.load_custom_node(str(PACK), set(), module_parent="custom_nodes"))
    return {"nodes": nodes, "execution": execution, "io": io, "comfy": comfy}


@pytest.fixture(scope="module")
def pipe():
    from guard.testing import tiny_sd_pipeline

    return tiny_sd_pipeline("epsilon", seed=3, sample_size=LATENT)


@pytest.fixture(scope="module")
def objects(comfy, pipe):
    c = comfy["comfy"]
    config = c.supported_models.SD15(dict(UNET_CONFIG))
    mapping = c.utils.unet_to_diffusers(config.unet_config)
    weights = pipe.unet.state_dict()
    renamed = {ldm: weights[diffusers] for diffusers, ldm in mapping.items() if diffusers in weights}
    with torch.inference_mode():  # as ComfyUI's loaders run: the weights are inference tensors
        base = config.get_model({}, "", torch.device("cpu"))
        result = base.diffusion_model.load_state_dict(renamed, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    cpu = torch.device("cpu")
    model = c.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    clip = StandInCLIP(pipe)
    with torch.no_grad():
        positive = [[clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)[0], {}]]
        negative = [[clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)[0], {}]]
    return {"model": model, "clip": clip, "positive": positive, "negative": negative}


def execute(comfy, node_id: str, inputs: dict, unique_id: str = "5", prompt_id: str = "real-prompt-1",
            workflow: dict | None = None):
    """One node call through ComfyUI's executor functions; returns its outputs (one list per output).

    ``workflow`` is the queued API-format prompt (ComfyUI's hidden PROMPT input)."""
    execution, io = comfy["execution"], comfy["io"]
    node = comfy["nodes"].NODE_CLASS_MAPPINGS[node_id]
    data = {key: [value] for key, value in inputs.items()}

    async def run():
        hidden = {io.Hidden.unique_id: unique_id, io.Hidden.prompt: workflow}
        return await execution._async_map_node_over_list(
            prompt_id, unique_id, node, data, node.FUNCTION, hidden_inputs=hidden
        )

    with torch.inference_mode():
        results = asyncio.run(run())
    output, _, _ = execution.get_output_from_returns(results, node)
    return output


def policy_file(tmp_path: Path, rule: dict) -> str:
    path = tmp_path / "policy.yaml"
    policy = {"name": "real", "calibration": "off", "rules": [rule], "default": "allow", "on_error": "block"}
    path.write_text(yaml.safe_dump(policy))
    return str(path)


def node_inputs(objects, tmp_path: Path, policy_path: str) -> dict:
    return {
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


def last_record(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])


def reference(pipe) -> float:
    from guard.scoring import Scorer

    return Scorer(pipe).score([PROMPT])[0].score


def test_registered_through_comfy_entrypoint(comfy):
    mappings = comfy["nodes"].NODE_CLASS_MAPPINGS
    assert "MemguardMemorizationGuard" in mappings and "MemguardMemorizationScore" in mappings
    assert comfy["nodes"].NODE_DISPLAY_NAME_MAPPINGS["MemguardMemorizationGuard"] == "Memorization Guard"


def test_score_in_real_comfyui_equals_guard(comfy, objects, pipe, tmp_path):
    policy = policy_file(tmp_path, {"when": {"score": {"gte": 1e9}}, "action": "warn"})
    output = execute(comfy, "MemguardMemorizationScore", node_inputs(objects, tmp_path, policy))
    assert abs(output[0][0] - reference(pipe)) < 1e-4
    record = last_record(tmp_path)
    assert record["event"] == "decision" and record["outcome"] == "checked" and record["source"] == "comfyui"
    assert record["context"]["comfyui"]["prompt_id"] == "real-prompt-1"
    assert record["context"]["comfyui"]["node_id"] == "5"


def test_prompt_text_is_read_from_the_workflow(comfy, objects, pipe, tmp_path):
    policy = policy_file(tmp_path, {"when": {"score": {"gte": 1e9}}, "action": "warn"})
    workflow = {"3": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["4", 1]}},
                "5": {"class_type": "MemguardMemorizationScore", "inputs": {"positive": ["3", 0]}}}
    execute(comfy, "MemguardMemorizationScore", node_inputs(objects, tmp_path, policy), workflow=workflow)
    record = last_record(tmp_path)
    assert record["prompt"] == hashlib.sha256(PROMPT.encode()).hexdigest()


def test_block_gives_execution_blocker(comfy, objects, pipe, tmp_path):
    from comfy_execution.graph_utils import ExecutionBlocker

    policy = policy_file(tmp_path, {"when": {"score": {"gte": reference(pipe) - 1.0}}, "action": "block"})
    output = execute(comfy, "MemguardMemorizationGuard", node_inputs(objects, tmp_path, policy))
    blockers = [value[0] for value in output]
    assert len(blockers) == 3 and all(isinstance(b, ExecutionBlocker) for b in blockers)
    assert "memguard blocked" in blockers[0].message
    assert last_record(tmp_path)["event"] == "outcome" and last_record(tmp_path)["outcome"] == "blocked"


def test_rewrite_through_inference_mode_weights(comfy, objects, pipe, tmp_path):
    score = reference(pipe)
    rule = {
        "when": {"score": {"gte": score - 1.0}},
        "action": "rewrite",
        "rewrite": {"target": {"score": score - 1e-3}, "max_steps": 30, "fallback": "block"},
    }
    output = execute(comfy, "MemguardMemorizationGuard", node_inputs(objects, tmp_path, policy_file(tmp_path, rule)))
    record = last_record(tmp_path)
    assert record["event"] == "outcome" and record["outcome"] == "rewritten", record["reason"]
    assert not torch.equal(output[0][0][0][0], objects["positive"][0][0])
    assert all(p.is_inference() for p in objects["model"].model.diffusion_model.parameters())  # restored
