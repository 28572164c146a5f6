"""Tiny diffusers pipelines whose denoisers ComfyUI v0.3.64 can also build, with the ComfyUI configs to build them.

ComfyUI's own model classes constrain the layout, so ``guard.testing``'s tiny models do not all fit (NOTES.md,
"Measured on 2026-11-29"): its ldm UNet hard-codes GroupNorm(32) and SDXL's ``encode_adm`` a 256-wide size
embedding; its MMDiT has 64-wide heads (hidden size = 64 x depth); its FLUX takes 16 unpacked latent channels and
its latent formats say 16 channels for SD3 and FLUX. The twins below respect all of that, so a ComfyUI model with
the same weights computes the same function. Text encoders come from ``guard.testing`` (tests hand ComfyUI the
same embeddings through a stand-in CLIP). Native sizes are small (a ``LATENT`` x ``LATENT`` latent) to keep tests
fast; FLUX's native mu is then ``calculate_shift`` of that size (``flux_native_shift``).
"""

from __future__ import annotations

from typing import Any

import torch

LATENT = 8  # native latent side of every twin (64 px with an x8 VAE)
SDXL_POOLED = 32
SDXL_CONTEXT = 64


def _vae_x8(latent_channels: int, shift_factor: float | None = None, scaling_factor: float = 0.18215):
    """A tiny VAE with four levels (``vae_scale_factor`` 8, as the full-size models) and the family's channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels, layers_per_block=1, norm_num_groups=4, sample_size=32,
        shift_factor=shift_factor, scaling_factor=scaling_factor,
    )


# ---------------------------------------------------------------------------------------------- SDXL


def sdxl_twin(seed: int = 0):
    """A ``StableDiffusionXLPipeline`` whose UNet ComfyUI's ldm ``UNetModel`` reproduces (``SDXL_UNET_CONFIG``).

    Scale-shift resnets: with 32 channels GroupNorm(32) normalises each channel alone and would cancel an additive
    time embedding at the first level (the UNet would then ignore t, the sizes and the pooled text). One 64-wide
    attention head per transformer (ComfyUI's SDXL config fixes ``num_head_channels`` at 64).
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from guard.testing import _ddim_scheduler, _text_config, build_word_tokenizer

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_word_tokenizer(), build_word_tokenizer()
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=4, out_channels=4,
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(1, 1), use_linear_projection=True, transformer_layers_per_block=1,
        cross_attention_dim=SDXL_CONTEXT, resnet_time_scale_shift="scale_shift",
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=6 * 256 + SDXL_POOLED,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae_x8(4, scaling_factor=0.13025),
        text_encoder=CLIPTextModel(_text_config(tokenizer, hidden_size=32)),
        text_encoder_2=CLIPTextModelWithProjection(
            _text_config(tokenizer_2, hidden_size=32, projection_dim=SDXL_POOLED)
        ),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=_ddim_scheduler("epsilon"),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: ComfyUI's ldm ``UNetModel`` arguments for ``sdxl_twin``'s UNet (what ``model_detection`` would infer for it).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1,
    "context_dim": SDXL_CONTEXT, "use_linear_in_transformer": True, "use_spatial_transformer": True,
    "legacy": False, "use_scale_shift_norm": True,
    "num_classes": "sequential", "adm_in_channels": 6 * 256 + SDXL_POOLED,
    "use_temporal_attention": False, "use_temporal_resblock": False, "disable_self_attentions": None,
}


# ---------------------------------------------------------------------------------------------- SD3


def sd3_twin(seed: int = 0):
    """A ``StableDiffusion3Pipeline`` whose MMDiT ComfyUI reproduces: depth 2 = two blocks, hidden 128, two 64-wide
    heads; 16 latent channels; two CLIPs and a T5 (pooled 64 = 32 + 32, joint attention dim 64)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    from guard.testing import _t5_encoder, _text_config, build_t5_tokenizer, build_word_tokenizer

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_word_tokenizer(), build_word_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=LATENT, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=64, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128,
        pooled_projection_dim=64, pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae_x8(16, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, hidden_size=32)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_size=32)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(build_t5_tokenizer(), d_model=64),
        tokenizer_3=build_t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- FLUX


def flux_twin(seed: int = 0, guidance_embeds: bool = True):
    """A ``FluxPipeline`` (dev style, or schnell style without guidance) with 16 unpacked latent channels (64
    packed), so ComfyUI's Flux (``FLUX_UNET_CONFIG``) takes the same latents. Native size ``LATENT`` x ``LATENT``
    (``default_sample_size`` lowered from FluxPipeline's 128, as the repository's FLUX tests do)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    from guard.testing import _t5_encoder, _text_config, build_t5_tokenizer, build_word_tokenizer

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_word_tokenizer(), build_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    )
    if guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae_x8(16, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=CLIPTextModel(_text_config(tokenizer, hidden_size=32)),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(tokenizer_2, d_model=32),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.default_sample_size = LATENT
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_unet_config(guidance_embeds: bool = True) -> dict[str, Any]:
    """ComfyUI's ``comfy.ldm.flux.model.Flux`` arguments for ``flux_twin``'s transformer."""
    return {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2,
        "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 32, "mlp_ratio": 4.0, "num_heads": 2,
        "depth": 1, "depth_single_blocks": 1, "axes_dim": [4, 4, 8], "theta": 10000, "qkv_bias": True,
        "guidance_embed": guidance_embeds,
    }


def flux_native_shift(pipe) -> float:
    """The ``mu`` FluxPipeline uses at the twin's native size (FLUX.1's own is 1.15 at 1024 px), which the
    ComfyUI adapter must compute for a detection latent of the twin's size."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = pipe.scheduler.config
    side = pipe.default_sample_size // 2
    return float(calculate_shift(side * side, config.get("base_image_seq_len", 256), config.get("max_image_seq_len",
                                 4096), config.get("base_shift", 0.5), config.get("max_shift", 1.15)))


class StandInCLIP:
    """ComfyUI's CLIP interface (``tokenize`` / ``encode_from_tokens`` / ``encode_from_tokens_scheduled``) over a
    diffusers pipeline's own ``encode_prompt``, so ComfyUI and the diffusers adapter score the same prompt
    embeddings, and ComfyUI's own text-encode nodes (``CLIPTextEncodeSDXL``, ``CLIPTextEncodeSD3``,
    ``CLIPTextEncodeFlux``) can run on it and add their options (sizes, guidance) as they do.

    Returns what ComfyUI's CLIP of the family returns: SD1 ``(cond, None)`` here; SDXL, SD3, FLUX
    ``(cond [1, L, D], pooled [1, P])``. Tokens are the text itself under each encoder's key.
    """

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.cond_stage_model = torch.nn.ModuleList(
            [m for m in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3"))
             if isinstance(m, torch.nn.Module)]
        )
        self.encoded: list[str] = []

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs) -> dict:
        return {"l": text, "g": text, "t5xxl": text}

    @torch.no_grad()
    def encode_from_tokens(self, tokens: dict, return_pooled: bool = False, return_dict: bool = False):
        texts = {value for value in tokens.values() if isinstance(value, str)}
        if len(texts) != 1:
            raise ValueError(f"the stand-in CLIP encodes one text for all its encoders, got {sorted(texts)}")
        (text,) = texts
        self.encoded.append(text)
        name = type(self.pipe).__name__
        cpu = torch.device("cpu")
        if name == "StableDiffusionXLPipeline":
            cond, _, pooled, _ = self.pipe.encode_prompt([text], device=cpu, num_images_per_prompt=1,
                                                         do_classifier_free_guidance=False)
        elif name == "StableDiffusion3Pipeline":
            cond, _, pooled, _ = self.pipe.encode_prompt(prompt=[text], prompt_2=None, prompt_3=None, device=cpu,
                                                         num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                         max_sequence_length=256)
        elif name == "FluxPipeline":
            cond, pooled, _ = self.pipe.encode_prompt(prompt=[text], prompt_2=None, device=cpu,
                                                      num_images_per_prompt=1, max_sequence_length=512)
        else:
            cond, _ = self.pipe.encode_prompt([text], cpu, 1, False)
            pooled = None
        if return_dict:
            return {"cond": cond, "pooled_output": pooled}
        return (cond, pooled) if return_pooled else cond

    def encode_from_tokens_scheduled(self, tokens: dict, unprojected: bool = False, add_dict: dict | None = None,
                                     show_pbar: bool = True) -> list:
        """A CONDITIONING list of one entry, with ``add_dict`` merged into its options (no hooks here)."""
        out = self.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond = out.pop("cond")
        out.update(add_dict or {})
        return [[cond, out]]


# ------------------------------------------------------------------------------------ whole graphs in real ComfyUI

#: memguard's shipped memorizer (guard/assets/memorizer) in ComfyUI's ldm UNet: SD 1.x layout, 32 groups, 16x16
#: latents, 64-wide context, 8 heads, attention only at the lower resolution and in the middle.
MEMORIZER_UNET_CONFIG: dict[str, Any] = {
    "image_size": 16, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [0, 1], "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1,
    "context_dim": 64, "num_heads": 8, "num_head_channels": -1, "use_linear_in_transformer": False,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False, "disable_self_attentions": None,
}
#: The memorizer's VAE (diffusers block_out_channels (32, 64, 64), one layer per block) as ComfyUI's ldm autoencoder.
MEMORIZER_VAE_CONFIG: dict[str, Any] = {
    "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 64, "in_channels": 3, "out_ch": 3, "ch": 32,
                 "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
    "embed_dim": 4,
}
#: The x4 spatial factor of that VAE (16x16 latents are 64x64 images): EmptyLatentImage takes 128x128 (its //8).
MEMORIZER_IMAGE_PX = 128


def import_comfyui(path: str) -> dict[str, Any]:
    """Real ComfyUI imported on the CPU, as ``main.py --cpu`` does before it imports anything of comfy."""
    import sys

    if path not in sys.path:
        sys.path.insert(0, path)
    argv = sys.argv
    sys.argv = ["main.py", "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401
        import comfy.model_patcher  # noqa: F401
        import comfy.supported_models  # noqa: F401
        import comfy.utils  # noqa: F401
        import execution
        import nodes
        from comfy_api.latest import io
    finally:
        sys.argv = argv
    return {"nodes": nodes, "execution": execution, "io": io, "comfy": comfy}


_LOADED_BY_COMFY: dict[str, Any] = {}


def load_pack_like_comfyui(comfy: dict[str, Any], pack: str, scratch: str) -> list[str]:
    """ComfyUI's own start-up loading: the pack symlinked into a ``custom_nodes`` folder registered with
    ``folder_paths``, then ``nodes.init_extra_nodes(init_custom_nodes=True)`` (ComfyUI's built-in extra nodes, such
    as PreviewAny, and every custom node folder). Once per process; returns the extra nodes that failed to import."""
    import asyncio
    import os

    import folder_paths

    if "failed" in _LOADED_BY_COMFY:
        return _LOADED_BY_COMFY["failed"]
    folder = os.path.join(scratch, "custom_nodes")
    os.makedirs(folder, exist_ok=True)
    link = os.path.join(folder, "comfyui-memguard")
    if not os.path.exists(link):
        os.symlink(pack, link)
    folder_paths.add_model_folder_path("custom_nodes", folder)
    failed = asyncio.run(comfy["nodes"].init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    _LOADED_BY_COMFY["failed"] = failed
    return failed


def memorizer_in_comfyui(path: str | None = None) -> dict[str, Any]:
    """The shipped memorizer (or another diffusers pipeline of its layout) as ComfyUI MODEL, CLIP and VAE, built in
    ComfyUI's own classes with the pipeline's weights, loaded under inference mode as ComfyUI's loaders load them.

    MODEL: ``supported_models.SD15`` -> ``BaseModel`` (ldm UNet) with weights renamed by
    ``comfy.utils.unet_to_diffusers``, latent format SD15 with the memorizer's scaling factor 1 (its latents are
    unit-variance), in a ``ModelPatcher``. VAE: ``comfy.sd.VAE`` from the diffusers weights with an explicit ldm
    config (x4). CLIP: ``StandInCLIP`` over the pipeline's own text encoder (a word-level tokenizer ComfyUI's CLIP
    classes cannot hold)."""
    import comfy.latent_formats
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    from diffusers import StableDiffusionPipeline

    from guard.assets import SHIPPED_MODEL

    pipe = StableDiffusionPipeline.from_pretrained(path or SHIPPED_MODEL)
    pipe.set_progress_bar_config(disable=True)
    if pipe.unet.config.norm_num_groups != 32:  # its weights would load, into another function (NOTES.md)
        groups = pipe.unet.config.norm_num_groups
        raise ValueError(f"ComfyUI's ldm UNet normalises in 32 groups; this UNet uses {groups}")
    cpu = torch.device("cpu")
    config = comfy.supported_models.SD15(dict(MEMORIZER_UNET_CONFIG))
    config.latent_format = comfy.latent_formats.SD15(scale_factor=float(pipe.vae.config.scaling_factor))
    mapping = comfy.utils.unet_to_diffusers(config.unet_config)
    weights = pipe.unet.state_dict()
    renamed = {ldm: weights[name] for name, ldm in mapping.items() if name in weights}
    if len(renamed) != len(weights):
        raise ValueError(f"{len(weights) - len(renamed)} UNet weights have no ComfyUI name (layout differs)")
    with torch.inference_mode():
        base = config.get_model({}, "", cpu)
        result = base.diffusion_model.load_state_dict(renamed, strict=False)
        vae = comfy.sd.VAE(sd=_vae_weights_for_comfyui(pipe.vae), config={"params": MEMORIZER_VAE_CONFIG})
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"ComfyUI's UNet does not take the weights: {result}")
    vae.downscale_ratio = vae.upscale_ratio = 4
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    return {"pipe": pipe, "model": model, "clip": StandInCLIP(pipe), "vae": vae}


def _vae_weights_for_comfyui(vae: Any) -> dict[str, torch.Tensor]:
    """The diffusers VAE's weights in ComfyUI's ldm names, by ComfyUI's own converter (``convert_vae_state_dict``),
    decoder up blocks renumbered first: the converter maps diffusers' ``up_blocks.i`` to ldm's ``up.{3 - i}`` (four
    levels, as every SD VAE has); the memorizer's has three."""
    from comfy.diffusers_convert import convert_vae_state_dict

    levels = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        if key.startswith("decoder.up_blocks."):
            index, rest = key[len("decoder.up_blocks."):].split(".", 1)
            key = f"decoder.up_blocks.{int(index) + 4 - levels}.{rest}"
        out[key] = value.clone()
    return convert_vae_state_dict(out)


class TestModelLoader:
    """A loader node of the tests' own (ComfyUI's checkpoint loaders only recognise full-size models): MODEL, CLIP
    and VAE of a model registered in ``MODELS`` under a name."""

    MODELS: dict[str, tuple[Any, Any, Any]] = {}
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:  # noqa: N802 (ComfyUI's name)
        return {"required": {"name": (sorted(cls.MODELS) or ["none"],)}}

    def load(self, name: str) -> tuple[Any, Any, Any]:
        return self.MODELS[name]


class ServerStub:
    """What ComfyUI's ``PromptExecutor`` and ``PromptQueue`` need of the server (main.py's ``prompt_worker``), and
    the events an API client would receive over its websocket."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.events: list[tuple[str, dict]] = []

    def send_sync(self, event: str, data: dict, sid: str | None = None) -> None:
        self.events.append((event, data))

    def queue_updated(self) -> None:
        """Nothing listens."""


class GraphRunner:
    """Queues API-format graphs as ``POST /prompt`` does (``execution.validate_prompt``, then ``PromptQueue.put``)
    and runs them as ``main.py``'s ``prompt_worker`` does (one ``PromptExecutor`` for all queue items, so its caches
    persist between them; ``PromptQueue.task_done`` files the result in the history ``GET /history`` serves)."""

    def __init__(self, comfy: dict[str, Any]) -> None:
        execution = comfy["execution"]
        self.execution = execution
        self.server = ServerStub()
        self.queue = execution.PromptQueue(self.server)
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)
        self.number = 0

    def validate(self, graph: dict[str, Any], prompt_id: str = "validate") -> tuple:
        import asyncio

        return asyncio.run(self.execution.validate_prompt(prompt_id, graph, None))

    def run(self, graph: dict[str, Any], prompt_id: str, client_id: str = "test-client") -> dict[str, Any]:
        """Queue and execute one graph; returns its ``/history`` entry (``status``, ``outputs``, ...)."""
        import json

        graph = json.loads(json.dumps(graph))  # as POST /prompt parses it: a fresh object per queue item
        valid = self.validate(graph, prompt_id)
        if not valid[0]:
            raise ValueError(f"the graph does not validate: {valid[1]} {valid[3]}")
        self.number += 1
        self.queue.put((self.number, prompt_id, graph, {"client_id": client_id}, valid[2]))
        item, item_id = self.queue.get(timeout=1)
        self.server.last_prompt_id = prompt_id
        self.executor.execute(item[2], prompt_id, item[3], item[4])
        status = self.execution.PromptQueue.ExecutionStatus(
            status_str="success" if self.executor.success else "error", completed=self.executor.success,
            messages=self.executor.status_messages)
        self.queue.task_done(item_id, self.executor.history_result, status=status)
        return self.queue.get_history(prompt_id=prompt_id)[prompt_id]


#: The KSampler settings the memorizer graphs use (its 16x16 latents: 128 px in EmptyLatentImage).
MEMORIZER_CALL = {"steps": 20, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal"}


def memorizer_calibration(memorizer: dict[str, Any], prompts: list[str], verification_prompts: int, out: str,
                          audit_path: str) -> str:
    """A calibration profile of the memorizer *as ComfyUI runs it*, saved to ``out``: the node's own scorer (the
    ComfyUI adapter, seed 51, one draw, 50 DDIM steps, detection latent 16) on ``prompts`` (the memorizer's own
    unseen captions, as its shipped diffusers profile was made from), plus verification values measured with the
    guarded sampler's generator (``ComfySampler``) at ``MEMORIZER_CALL`` on the first ``verification_prompts`` of
    them. (The shipped profile fits the diffusers pipeline's fingerprint, not ComfyUI's network.)"""
    from memguard_comfy.nodes import UNCOND_EMPTY, core_for
    from memguard_comfy.sampling import ComfySampler, KSamplerSettings

    from guard.actions.verification import measure_verification
    from guard.calibration import calibrate
    from guard.policy import VerifySettings, load_policy

    policy = load_policy("strict").model_copy(update={"calibration": "off"})
    core = core_for(memorizer["model"], memorizer["clip"], None, policy=policy, unconditional=UNCOND_EMPTY,
                    latent_size=16, audit_path=audit_path)
    profile = calibrate(core.scorer, prompts, source=f"memorizer-calib-{len(prompts)}", progress=False)
    clip = memorizer["clip"]
    empty = [[clip.encode_from_tokens(clip.tokenize(""), return_pooled=True)[0], {}]]
    generator = ComfySampler(memorizer["model"], empty, empty, {"samples": torch.zeros(1, 4, 16, 16)},
                             KSamplerSettings(seed=0, **MEMORIZER_CALL), entry_rows=[1], clip=clip, family="sd1")
    settings = VerifySettings(probes=2, probe_steps=25)
    verification = measure_verification(generator, core.scorer.encode(prompts[:verification_prompts]), settings,
                                        seed=core.scorer.seed, source=f"memorizer-calib-{verification_prompts}",
                                        progress=False)
    profile = profile.with_verification(verification)
    profile.save(out)
    return out
