"""The ComfyUI node pack inside a real ComfyUI checkout (``COMFYUI_PATH``); skipped without one.

The pack is loaded by ComfyUI's own ``nodes.load_custom_node`` (V3 ``comfy_entrypoint``) and run by its
executor's ``_async_map_node_over_list`` / ``get_output_from_returns`` under ``torch.inference_mode``, as a queued
prompt is. Each MODEL is a real ``ModelPatcher`` around a real ``BaseModel`` of the family, built in ComfyUI's own
classes with the weights of a diffusers twin (tests/comfy_twins.py), loaded under inference mode as ComfyUI's
loaders load them:

- SD 1.x: ``supported_models.SD15`` (ldm UNet), weights renamed with ``comfy.utils.unet_to_diffusers``;
- SDXL: ``supported_models.SDXL`` (``model_base.SDXL``, ldm UNet with ``adm``), renamed the same way;
- SD3: ``comfy.model_detection.convert_diffusers_mmdit`` + ``detect_unet_config`` + ``model_config_from_unet_config``
  (which picks ``supported_models.SD3``: ``model_base.SD3``, MMDiT, ``ModelSamplingDiscreteFlow`` shift 3);
- FLUX.1 dev / schnell: ``convert_diffusers_mmdit`` into ``supported_models.Flux`` / ``FluxSchnell``
  (``model_base.Flux``); dev patched by ComfyUI's own ``ModelSamplingFlux`` node for a 512 x 768 generation, which
  the score (at the native size's mu) must not follow.

ComfyUI's checkpoint loader only recognises full-size architectures, so the CLIP is a stand-in with ComfyUI's
``tokenize``/``encode_from_tokens``/``encode_from_tokens_scheduled`` interface over the twin's text encoders;
the conditioning is made by ComfyUI's own text-encode nodes on it (``CLIPTextEncodeSDXL`` with its sizes,
``CLIPTextEncodeSD3``, ``CLIPTextEncodeFlux`` + ``FluxGuidance``).
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
from comfy_twins import StandInCLIP

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


def execute(comfy, node_id: str | type, inputs: dict, unique_id: str = "5", prompt_id: str = "real-prompt-1",
            workflow: dict | None = None):
    """One node call through ComfyUI's executor functions; returns its outputs (one list per output).

    ``node_id`` is a registered node id or a node class (ComfyUI's own nodes); ``workflow`` is the queued
    API-format prompt (ComfyUI's hidden PROMPT input)."""
    execution, io = comfy["execution"], comfy["io"]
    node_class = comfy["nodes"].NODE_CLASS_MAPPINGS[node_id] if isinstance(node_id, str) else node_id
    node = node_class()  # the executor's ``obj = class_def()``, V1 and V3 nodes alike
    data = {key: [value] for key, value in inputs.items()}

    async def run():
        hidden = {io.Hidden.unique_id: unique_id, io.Hidden.prompt: workflow}
        return await execution._async_map_node_over_list(
            prompt_id, unique_id, node, data, node_class.FUNCTION, hidden_inputs=hidden
        )

    with torch.inference_mode():
        results = asyncio.run(run())
    output, _, expanded = execution.get_output_from_returns(results, node)
    if not expanded:
        return Outputs(output)
    ((graph, values),) = output  # a node expansion: the values its outputs resolve to, and the nodes it adds
    return Outputs([[value] for value in values], expand=graph)


class Outputs(list):
    """A node call's outputs (one list per output) and the graph it expanded into, if any."""

    def __init__(self, values: list, expand: dict | None = None) -> None:
        super().__init__(values)
        self.expand = expand


def blocked_by_guard(output: Outputs) -> str:
    """The reason a guarding node's block raises (through the ``MemguardBlocked`` node it expands into): only the
    guarded output is ComfyUI's silent ``ExecutionBlocker``; the score and report are values."""
    from comfy_execution.graph_utils import ExecutionBlocker

    assert isinstance(output[0][0], ExecutionBlocker) and output[0][0].message is None
    assert not any(isinstance(value[0], ExecutionBlocker) for value in output[1:])
    assert isinstance(output[2][0], str) and output.expand is not None
    ((_, node),) = output.expand.items()
    assert node["class_type"] == "MemguardBlocked" and node["inputs"]["report"][1] == 2
    return node["inputs"]["message"]


def policy_file(tmp_path: Path, rule: dict, **settings) -> str:
    path = tmp_path / "policy.yaml"
    policy = {"name": "real", "calibration": "off", "rules": [rule], "default": "allow", "on_error": "block",
              **settings}
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
    assert abs(output[0][0] - reference(pipe)) < 1e-5
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


def test_block_blocks_the_conditioning_and_raises_after_the_report(comfy, objects, pipe, tmp_path):
    policy = policy_file(tmp_path, {"when": {"score": {"gte": reference(pipe) - 1.0}}, "action": "block"})
    output = execute(comfy, "MemguardMemorizationGuard", node_inputs(objects, tmp_path, policy))
    assert "memguard blocked" in blocked_by_guard(output) and "[0] block:" in output[2][0]
    assert last_record(tmp_path)["event"] == "outcome" and last_record(tmp_path)["outcome"] == "blocked"


def test_rewrite_through_inference_mode_weights(comfy, objects, pipe, tmp_path):
    score = reference(pipe)
    rule = {
        "when": {"score": {"gte": score - 1.0}},
        "action": "rewrite",
        "rewrite": {"target": {"score": score - 1e-3}, "max_steps": 30, "fallback": "block", "verify": None},
    }
    output = execute(comfy, "MemguardMemorizationGuard", node_inputs(objects, tmp_path, policy_file(tmp_path, rule)))
    record = last_record(tmp_path)
    assert record["event"] == "outcome" and record["outcome"] == "generated", record["reason"]  # unverified
    assert record["extras"]["mitigation"]["released"] == "prompt_embedding", record["reason"]
    assert not torch.equal(output[0][0][0][0], objects["positive"][0][0])
    assert all(p.is_inference() for p in objects["model"].model.diffusion_model.parameters())  # restored


# ---------------------------------------------------------------------------------------------- SDXL, SD3, FLUX

OTHER = "a red car on the street"
FAMILIES = ["sdxl", "sd3", "flux", "flux-schnell"]


def build_real_family(comfy, name: str) -> dict:
    """A diffusers twin and a ComfyUI model of the family in ComfyUI's own classes with the same weights."""
    import comfy_twins as twins
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux

    from guard.scoring import Scorer

    c = comfy["comfy"]
    import comfy.model_detection as detection

    cpu = torch.device("cpu")
    if name == "sdxl":
        pipe = twins.sdxl_twin(seed=5)
        config = c.supported_models.SDXL(dict(twins.SDXL_UNET_CONFIG))
        mapping = c.utils.unet_to_diffusers(config.unet_config)
        weights = pipe.unet.state_dict()
        state = {ldm: weights[diffusers] for diffusers, ldm in mapping.items() if diffusers in weights}
        assert len(state) == len(weights)
    elif name == "sd3":
        pipe = twins.sd3_twin(seed=6)
        # a copy: convert_diffusers_mmdit overwrites its input tensors in place (NOTES.md)
        state = detection.convert_diffusers_mmdit({k: v.clone() for k, v in pipe.transformer.state_dict().items()}, "")
        unet_config = detection.detect_unet_config(state, "")
        config = detection.model_config_from_unet_config(unet_config, state)
        assert type(config).__name__ == "SD3"
    else:
        guidance = name == "flux"
        pipe = twins.flux_twin(seed=7, guidance_embeds=guidance)
        state = detection.convert_diffusers_mmdit({k: v.clone() for k, v in pipe.transformer.state_dict().items()}, "")
        config_class = c.supported_models.Flux if guidance else c.supported_models.FluxSchnell
        config = config_class(twins.flux_unet_config(guidance))
    with torch.inference_mode():  # as ComfyUI's loaders run: the weights are inference tensors
        base = config.get_model({}, "", cpu)
        result = base.diffusion_model.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    model = c.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    if name == "flux":  # as FLUX workflows do: ComfyUI's own node sets the shift for the generation resolution,
        # which the score (at the native size's mu) does not follow
        (model,) = ModelSamplingFlux().patch(model, max_shift=1.15, base_shift=0.5, width=512, height=768)
        assert abs(model.get_model_object("model_sampling").shift - twins.flux_native_shift(pipe)) > 0.1
    reference = Scorer(pipe).score([PROMPT, OTHER])
    return {"name": name, "pipe": pipe, "model": model, "clip": StandInCLIP(pipe), "reference": reference}


_REAL: dict[str, dict] = {}


def _family(comfy, name: str) -> dict:
    if name not in _REAL:
        _REAL[name] = build_real_family(comfy, name)
    return _REAL[name]


@pytest.fixture(scope="module", params=FAMILIES)
def family(comfy, request):
    return _family(comfy, request.param)


def encode_node(comfy, family: dict, text: str, **sizes) -> tuple[list, dict]:
    """The positive conditioning made by the family's own ComfyUI text-encode node (run by the executor), and
    that node in API format."""
    from comfy_extras.nodes_clip_sdxl import CLIPTextEncodeSDXL
    from comfy_extras.nodes_flux import CLIPTextEncodeFlux
    from comfy_extras.nodes_sd3 import CLIPTextEncodeSD3

    clip, name = family["clip"], family["name"]
    if name == "sdxl":
        side = 64  # the twin's native size unless the test asks for others
        values = {"width": side, "height": side, "crop_w": 0, "crop_h": 0, "target_width": side,
                  "target_height": side, **sizes, "text_g": text, "text_l": text}
        node = CLIPTextEncodeSDXL
    elif name == "sd3":
        values, node = {"clip_l": text, "clip_g": text, "t5xxl": text, "empty_padding": "none"}, CLIPTextEncodeSD3
    elif name == "flux":
        values, node = {"clip_l": text, "t5xxl": text, "guidance": 3.5}, CLIPTextEncodeFlux
    else:
        values, node = {"text": text}, comfy["nodes"].CLIPTextEncode
    (conditioning,) = execute(comfy, node, {"clip": clip, **values}, unique_id="t")
    return conditioning[0], {"class_type": node.__name__, "inputs": {**values, "clip": ["c", 0]}}


def family_node_inputs(family: dict, tmp_path: Path, policy_path: str, positive: list) -> dict:
    return {
        "model": family["model"], "clip": family["clip"], "positive": positive, "negative": positive,
        "policy": "monitor", "policy_path": policy_path, "unconditional": "empty prompt (reference)", "seed": 51,
        "samples": 1, "latent_size": 8, "audit_path": str(tmp_path / "audit.jsonl"),
    }


def test_family_score_in_real_comfyui_equals_diffusers(comfy, family, tmp_path):
    """Per family: ComfyUI's own model classes and conditioning nodes, the real executor, and the score equals the
    diffusers adapter's on the twin to 1e-5; the prompt hash comes from the workflow's text-encode node. FLUX's
    conditioning carries FluxGuidance 7.0, which the score (defined at guidance 3.5) does not use."""
    from comfy_extras.nodes_flux import FluxGuidance

    positive, text_node = encode_node(comfy, family, PROMPT)
    graph = {"3": text_node, "5": {"class_type": "MemguardMemorizationScore", "inputs": {"positive": ["3", 0]}}}
    if family["name"] == "flux":
        (positive,) = execute(comfy, FluxGuidance, {"conditioning": positive, "guidance": 7.0}, unique_id="g")[0]
        assert positive[0][1]["guidance"] == 7.0
        graph["4"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": 7.0}}
        graph["5"]["inputs"]["positive"] = ["4", 0]
    policy = policy_file(tmp_path, {"when": {"score": {"gte": 1e9}}, "action": "warn"})
    output = execute(comfy, "MemguardMemorizationScore", family_node_inputs(family, tmp_path, policy, positive),
                     workflow=graph)
    expected = family["reference"][0]
    assert abs(output[0][0] - expected.score) < 1e-5
    assert abs(output[1][0] - expected.norm) < 1e-5 and abs(output[2][0] - expected.cos) < 1e-5
    record = last_record(tmp_path)
    assert record["prompt"] == hashlib.sha256(PROMPT.encode()).hexdigest()
    assert record["context"]["comfyui"]["family"] == family["name"].split("-")[0]


def test_family_every_entry_scored_in_real_comfyui(comfy, family, tmp_path):
    """Two entries through ComfyUI's own ConditioningCombine: both scored, each equal to diffusers."""
    first, _ = encode_node(comfy, family, PROMPT)
    second, _ = encode_node(comfy, family, OTHER)
    (combined,) = execute(comfy, "ConditioningCombine", {"conditioning_1": first, "conditioning_2": second},
                          unique_id="k")
    policy = policy_file(tmp_path, {"when": {"score": {"gte": 1e9}}, "action": "warn"})
    execute(comfy, "MemguardMemorizationScore", family_node_inputs(family, tmp_path, policy, combined[0]))
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    for record, expected in zip([r for r in records if r["event"] == "decision"], family["reference"], strict=True):
        assert abs(record["score"] - expected.score) < 1e-5


def test_family_rewrite_through_inference_mode_weights(comfy, family, tmp_path):
    """The rewrite back-propagates through ComfyUI's own networks (weights and buffers made under inference mode);
    the rewritten embeddings and pooled output score at most the target on the diffusers twin."""
    from guard.scoring import Scorer, TextConditioning

    positive, _ = encode_node(comfy, family, PROMPT)
    score = family["reference"][0].score
    rule = {"when": {"score": {"gte": score - 1.0}}, "action": "rewrite",
            "rewrite": {"target": {"score": score - 1e-3}, "max_steps": 20, "fallback": "block", "verify": None}}
    output = execute(comfy, "MemguardMemorizationGuard",
                     family_node_inputs(family, tmp_path, policy_file(tmp_path, rule), positive))
    record = last_record(tmp_path)
    assert record["event"] == "outcome" and record["outcome"] == "generated", record["reason"]  # unverified
    assert record["extras"]["mitigation"]["released"] == "prompt_embedding", record["reason"]
    (rewritten,) = output[0][0]
    assert rewritten[0].shape == positive[0][0].shape and not torch.equal(rewritten[0], positive[0][0])
    cond = TextConditioning(rewritten[0], rewritten[1]["pooled_output"])
    assert Scorer(family["pipe"]).score_conditioning(cond)[0].score <= score - 1e-3 + 1e-5
    assert all(p.is_inference() for p in family["model"].model.diffusion_model.parameters())  # restored


def test_sdxl_sizes_from_real_clip_text_encode_sdxl(comfy, tmp_path):
    """The sizes CLIPTextEncodeSDXL puts into the conditioning are the score's: equal to diffusers' adapter with
    time_ids (original size, crop top-left, target size) of those values."""
    from guard.scoring import Scorer
    from guard.scoring.adapters import StableDiffusionXLAdapter

    sdxl = _family(comfy, "sdxl")
    sizes = {"width": 128, "height": 96, "crop_w": 8, "crop_h": 4, "target_width": 112, "target_height": 80}
    positive, _ = encode_node(comfy, sdxl, PROMPT, **sizes)
    assert {k: positive[0][1][k] for k in sizes} == sizes
    reference = StableDiffusionXLAdapter(sdxl["pipe"])
    reference._time_ids = sdxl["pipe"]._get_add_time_ids((96, 128), (4, 8), (80, 112), dtype=torch.float32,
                                                         text_encoder_projection_dim=32)
    expected = Scorer(reference).score([PROMPT])[0].score
    assert abs(expected - sdxl["reference"][0].score) > 1e-3
    policy = policy_file(tmp_path, {"when": {"score": {"gte": 1e9}}, "action": "warn"})
    output = execute(comfy, "MemguardMemorizationScore", family_node_inputs(sdxl, tmp_path, policy, positive))
    assert abs(output[0][0] - expected) < 1e-5
    assert last_record(tmp_path)["context"]["comfyui"]["size"] == {**sizes, "source": "workflow"}


def test_sd3_shift_patched_by_model_sampling_sd3(comfy, tmp_path):
    """ComfyUI's ModelSamplingSD3 node (shift 6) changes the schedule as the scheduler's shift does in diffusers.
    The shift moves only t_lo (s_hi stays 1), i.e. the cosine term, so both sides weigh it here (the sd3 profile
    does not)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from guard.scoring import Scorer

    sd3 = _family(comfy, "sd3")
    (patched,) = ModelSamplingSD3().patch(sd3["model"], shift=6.0)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=6.0)
    twin = StableDiffusion3Pipeline(**{**sd3["pipe"].components, "scheduler": scheduler})
    weights = {"g_norm": 1.0, "g_cos": 1.0}
    expected = Scorer(twin, profile=weights).score([PROMPT])[0].score
    assert abs(expected - Scorer(sd3["pipe"], profile=weights).score([PROMPT])[0].score) > 1e-3
    positive, _ = encode_node(comfy, sd3, PROMPT)
    policy = policy_file(tmp_path, {"when": {"score": {"gte": 1e9}}, "action": "warn"}, profile=weights)
    output = execute(comfy, "MemguardMemorizationScore",
                     {**family_node_inputs(sd3, tmp_path, policy, positive), "model": patched})
    assert abs(output[0][0] - expected) < 1e-5


def test_edm_patched_sdxl_is_refused_and_fails_closed(comfy, tmp_path):
    """An SDXL model switched to EDM sampling by ComfyUI's ModelSamplingContinuousEDM node (Playground v2.5 style)
    is not a model the score is defined for: the node takes the policy's on_error (block), audited."""
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    sdxl = _family(comfy, "sdxl")
    (patched,) = ModelSamplingContinuousEDM().patch(sdxl["model"], "edm_playground_v2.5", 80.0, 0.002)
    positive, _ = encode_node(comfy, sdxl, PROMPT)
    policy = policy_file(tmp_path, {"when": {"score": {"gte": 0.0}}, "action": "warn"})
    output = execute(comfy, "MemguardMemorizationGuard",
                     {**family_node_inputs(sdxl, tmp_path, policy, positive), "model": patched})
    assert "on_error" in blocked_by_guard(output)
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    (record,) = [r for r in records if r["event"] in ("decision", "error")]
    assert record["event"] == "error" and "EDM sampling" in record["reason"]


def test_sd2_v_prediction_in_real_comfyui(comfy, tmp_path):
    """SD 2.x style: ComfyUI's ldm UNet (linear transformers, 16-wide heads) with V_PREDICTION sampling, the
    twin's weights; the node's eps-space score equals the diffusers adapter's to 1e-5."""
    from guard.scoring import Scorer
    from guard.testing import tiny_sd_pipeline

    c = comfy["comfy"]
    import comfy.model_base as model_base

    pipe = tiny_sd_pipeline("v_prediction", seed=4, sample_size=LATENT)
    unet_config = {**UNET_CONFIG, "num_heads": -1, "num_head_channels": 16, "use_linear_in_transformer": True}
    config = c.supported_models.SD20(unet_config)
    config.unet_config.update(num_heads=-1, num_head_channels=16)  # SD20's defaults are 64-wide heads
    mapping = c.utils.unet_to_diffusers(config.unet_config)
    weights = pipe.unet.state_dict()
    with torch.inference_mode():
        base = model_base.BaseModel(config, model_type=model_base.ModelType.V_PREDICTION, device=torch.device("cpu"))
        result = base.diffusion_model.load_state_dict(
            {ldm: weights[name] for name, ldm in mapping.items() if name in weights}, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    cpu = torch.device("cpu")
    model = c.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    clip = StandInCLIP(pipe)
    with torch.no_grad():
        positive = [[clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True)[0], {}]]
    policy = policy_file(tmp_path, {"when": {"score": {"gte": 1e9}}, "action": "warn"})
    inputs = node_inputs({"model": model, "clip": clip, "positive": positive, "negative": positive}, tmp_path, policy)
    output = execute(comfy, "MemguardMemorizationScore", inputs)
    expected = Scorer(pipe).score([PROMPT])[0]
    assert abs(output[0][0] - expected.score) < 1e-5 and last_record(tmp_path)["profile"] == "sd2"


# ---------------------------------------------------------------------------------------------- guarded KSampler

SAMPLER = {"seed": 5, "steps": 4, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}


def sampler_call(comfy, family: dict, tmp_path: Path, policy: str, positive: list, **extra) -> tuple[dict, dict]:
    """The guarded sampler's inputs, and ComfyUI's own KSampler's for the same call (empty 64 px latents, 2 images;
    cfg 1 for the guidance-distilled FLUX, 4 otherwise)."""
    (latent,) = execute(comfy, "EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 2}, unique_id="l")[0]
    (negative,) = execute(comfy, comfy["nodes"].CLIPTextEncode, {"clip": family["clip"], "text": ""}, unique_id="n")[0]
    cfg = 1.0 if family["name"].startswith("flux") else 4.0
    plain = {"model": family["model"], "positive": positive, "negative": negative, "latent_image": latent,
             "cfg": cfg, **SAMPLER}
    guarded = {**plain, "clip": family["clip"], "policy": "monitor", "policy_path": policy,
               "unconditional": "empty prompt (reference)", "detection_seed": 51, "samples": 1, "latent_size": 8,
               "audit_path": str(tmp_path / "audit.jsonl"), **extra}
    return guarded, plain


def test_family_guarded_sampler_allows_exactly_as_ksampler(comfy, family, tmp_path):
    """SDXL (sizes from CLIPTextEncodeSDXL), SD3, FLUX dev (FluxGuidance 3.5, ModelSamplingFlux patch) and schnell:
    an allowed prompt's latents are ComfyUI's own KSampler's, bit for bit."""
    positive, text_node = encode_node(comfy, family, PROMPT)
    policy = policy_file(tmp_path, {"when": {"score": {"gte": 1e9}}, "action": "warn"})
    guarded, plain = sampler_call(comfy, family, tmp_path, policy, positive)
    (expected,) = execute(comfy, comfy["nodes"].KSampler, plain, unique_id="k")[0]
    graph = {"3": text_node, "5": {"class_type": "MemguardGuardedKSampler", "inputs": {"positive": ["3", 0]}}}
    output = execute(comfy, "MemguardGuardedKSampler", guarded, workflow=graph)
    assert output.expand is None
    assert torch.equal(output[0][0]["samples"], expected["samples"])
    records = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in records if r["event"] in ("decision", "outcome")] == ["pending", "generated"]
    assert abs(output[1][0] - family["reference"][0].score) < 1e-5


def test_family_guarded_sampler_rewrites_through_comfyui_sampling(comfy, family, tmp_path):
    """A rewrite runs through ComfyUI's own sampler: with classifier-free guidance (SDXL, SD3) the guidance rung's
    image is KSampler's with a CFG hook that gives opposite guidance for the first half of the steps; FLUX (cfg 1,
    no guidance to schedule) takes the prompt-embedding rung through its inference-mode weights. Both verified
    against probes sampled by ComfyUI, and the verified latents are released."""
    positive, _ = encode_node(comfy, family, PROMPT)
    score = family["reference"][0].score
    distilled = family["name"].startswith("flux")
    rewrite = {"ladder": ["guidance_schedule", "prompt_embedding"], "guidance": [{"until": 0.5, "scale": -2.0}],
               "target": {"score": score - 1e-3}, "max_steps": 20,
               "verify": {"max_similarity": 1.0, "probes": 1, "probe_steps": 3}, "fallback": "block"}
    policy = policy_file(tmp_path, {"when": {"score": {"gte": score - 1.0}}, "action": "rewrite", "rewrite": rewrite})
    guarded, plain = sampler_call(comfy, family, tmp_path, policy, positive)
    output = execute(comfy, "MemguardGuardedKSampler", guarded)
    assert output.expand is None, output[2][0]
    record = last_record(tmp_path)
    assert record["outcome"] == "rewritten", output[2][0]
    mitigation = record["extras"]["mitigation"]
    assert mitigation["released"] == ("prompt_embedding" if distilled else "guidance_schedule")
    (own,) = execute(comfy, comfy["nodes"].KSampler, plain, unique_id="k")[0]
    assert not torch.equal(output[0][0]["samples"], own["samples"])
    if distilled:
        assert mitigation["rungs"][0]["ran"] is False and "cfg" in mitigation["rungs"][0]["note"]
        assert all(p.is_inference() for p in family["model"].model.diffusion_model.parameters())  # restored
        return

    def opposite_first_half(args):
        sigmas = args["model_options"]["transformer_options"]["sample_sigmas"]
        position = int((sigmas[:-1] - args["sigma"][0]).abs().argmin())
        scale = -2.0 if position / (len(sigmas) - 1) < 0.5 else args["cond_scale"]
        return args["uncond"] + (args["cond"] - args["uncond"]) * scale

    hooked = family["model"].clone()
    hooked.set_model_sampler_cfg_function(opposite_first_half)
    (expected,) = execute(comfy, comfy["nodes"].KSampler, {**plain, "model": hooked}, unique_id="k")[0]
    assert torch.equal(output[0][0]["samples"], expected["samples"])
