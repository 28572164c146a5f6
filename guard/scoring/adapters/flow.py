"""Rectified-flow families: Stable Diffusion 3 / 3.5 and FLUX.1 (dev and schnell) (docs/scoring.md, "Per family").

The model predicts the velocity v = eps - x0; in eps space the guidance vector is (1 - s)(v_c - v_u), which
vanishes at the first step, so these models are scored in velocity space. The two scoring steps come from
the pipeline's own scheduler set exactly as its ``__call__`` sets it for the requested number of steps at
the native size (never recomputed: diffusers' shift handling differs from the textbook formula), and the
transformer is called exactly as the pipeline's loop calls it at those steps.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import sys
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ...compat import flux_image_ids, flux_pack, flux_unpack
from ..conditioning import TextConditioning
from ..errors import UnsupportedPipelineError
from .base import PipelineAdapter, schedule_json

_FLOW_SCHEDULE_KEYS = (
    "num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
    "max_image_seq_len", "invert_sigmas", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
    "use_beta_sigmas", "time_shift_type", "use_flow_sigmas",
)


def call_default(pipe: Any, name: str) -> Any:
    """The default of ``name`` in the pipeline's ``__call__``: what a call that does not pass it uses."""
    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def pipeline_function(pipe: Any, name: str, fallback_module: str) -> Any:
    """A module-level helper of the pipeline's own module (``retrieve_timesteps``, ``calculate_shift``), so a
    pipeline that ships its own variant is followed; diffusers' original otherwise."""
    function = getattr(sys.modules.get(type(pipe).__module__), name, None)
    return function if function is not None else getattr(importlib.import_module(fallback_module), name)


def require_components(pipe: Any, names: Sequence[str], what: str) -> None:
    missing = [name for name in names if getattr(pipe, name, None) is None]
    if missing:
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__} has no {', '.join(missing)}: the memorization score of a {what} pipeline needs "
            "its transformer, its scheduler and the pipeline's own encode_prompt"
        )


class FlowMatchingAdapter(PipelineAdapter):
    """What SD3 and FLUX share: velocity space, unscaled noise, and the scheduler set as the call sets it."""

    prediction_type = "flow"
    init_noise_sigma = 1.0
    #: diffusers' module of the pipeline family, whose ``retrieve_timesteps``/``calculate_shift`` are used
    #: when the pipeline's own module has none.
    _pipeline_module: str

    def score_space(self, requested: str = "auto") -> str:
        if requested in ("auto", "native", "velocity"):
            return "velocity"
        if requested == "eps":
            raise UnsupportedPipelineError(
                f"{self.model_class} is a rectified-flow model: flow models are scored in velocity space (in eps "
                "space the guidance vector (1 - s)(v_c - v_u) vanishes at the first step); use prediction_space "
                "'auto' or 'native'"
            )
        raise UnsupportedPipelineError(f"{self.model_class} cannot be scored in {requested!r} space")

    def call_default(self, name: str) -> Any:
        return call_default(self.pipe, name)

    def schedule_identity(self) -> str:
        scheduler = self.pipe.scheduler
        config = dict(scheduler.config, runtime_shift=getattr(scheduler, "shift", None))
        return type(scheduler).__name__ + schedule_json(config, (*_FLOW_SCHEDULE_KEYS, "runtime_shift"))

    def schedule(self, inference_steps: int) -> Any:
        """A copy of the pipeline's scheduler with its timesteps set as ``__call__`` sets them for
        ``inference_steps`` steps at the native size (the pipeline's own scheduler is left untouched)."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        retrieve = pipeline_function(self.pipe, "retrieve_timesteps", self._pipeline_module)
        retrieve(scheduler, inference_steps, "cpu", **self._schedule_arguments(scheduler, inference_steps))
        return scheduler

    @abstractmethod
    def _schedule_arguments(self, scheduler: Any, inference_steps: int) -> dict[str, Any]:
        """The ``retrieve_timesteps`` keywords the call passes at the native size (``sigmas``, ``mu``)."""

    def _calculate_shift(self, scheduler: Any, image_seq_len: int, max_shift_default: float) -> float:
        shift = pipeline_function(self.pipe, "calculate_shift", self._pipeline_module)
        config = scheduler.config
        return shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", max_shift_default),
        )

    def scoring_sigmas(self, inference_steps: int) -> tuple[float, float]:
        """``(s_hi, s_lo)``: the noise levels of the first and third-from-last of the call's steps."""
        sigmas = self.schedule(self._check_steps(inference_steps)).sigmas
        return float(sigmas[0]), float(sigmas[inference_steps - 3])

    def scoring_timesteps(self, inference_steps: int) -> tuple[float, float]:
        timesteps = self.schedule(self._check_steps(inference_steps)).timesteps
        return self._label(timesteps[0:1]), self._label(timesteps[inference_steps - 3 : inference_steps - 2])

    def _label(self, timestep: torch.Tensor) -> float:
        """The label the pipeline's loop passes the transformer for scheduler timestep ``timestep``."""
        return float(timestep.item())

    @staticmethod
    def _check_steps(inference_steps: int) -> int:
        if inference_steps < 3:
            raise ValueError(
                f"inference_steps must be at least 3 to have a third-from-last step, got {inference_steps}"
            )
        return inference_steps

    def _with_defaults(self, encode_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        options = dict(encode_kwargs)
        if options.get("max_sequence_length") is None:
            options["max_sequence_length"] = self.call_default("max_sequence_length")
        return options

    def _call_value(self, generation: Mapping[str, Any], name: str) -> Any:
        value = generation.get(name)
        return self.call_default(name) if value is None else value

    def per_image_arguments(self, generation: Mapping[str, Any]) -> dict[str, Any]:
        """One embedding row per image, and one image per row, when the call asks for several per prompt.

        SD3's and FLUX's ``__call__`` repeat the embeddings they compute ``num_images_per_prompt`` times, but
        take given ``prompt_embeds``/``pooled_prompt_embeds`` as they are, one row per image (diffusers 0.42:
        a shape error otherwise). So the guard's rows are repeated per image, the negative branch is computed
        by the pipeline's own ``encode_prompt`` from the call's own arguments (as ``__call__`` would), and
        ``num_images_per_prompt`` becomes 1: the transformer sees the same tensors, and the call draws the
        same ``prompts x images`` initial latents from the caller's generator.
        """
        arguments = dict(generation)
        per_prompt = arguments.get("num_images_per_prompt") or 1
        if per_prompt == 1 or arguments.get("prompt_embeds") is None:
            return arguments
        with torch.no_grad():  # as in ``__call__``: grad mode changes T5's kernels at the 1e-6 level
            arguments.update(self._negative_branch(arguments, per_prompt))
        for name in ("prompt_embeds", "pooled_prompt_embeds"):
            if arguments.get(name) is not None:
                arguments[name] = arguments[name].repeat_interleave(per_prompt, dim=0)
        arguments["num_images_per_prompt"] = 1
        return arguments

    @abstractmethod
    def _negative_branch(self, arguments: Mapping[str, Any], per_prompt: int) -> dict[str, Any]:
        """The negative-branch arguments of a call with ``per_prompt`` images per prompt, computed as its
        ``__call__`` computes them (none when the call has no negative branch)."""

    def _lora_scale(self, arguments: Mapping[str, Any]) -> Any:
        return (arguments.get("joint_attention_kwargs") or {}).get("scale")


class StableDiffusion3Adapter(FlowMatchingAdapter):
    """``StableDiffusion3Pipeline`` (SD3, SD3.5): two CLIP encoders and T5 (``text_encoder_3`` may be None,
    in which case the pipeline itself uses zeros for the T5 part). u is the pipeline's own negative branch
    for "" from ``encode_prompt``; skip-layer guidance is not part of the score."""

    family = "sd3"
    default_profile = "sd3"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    prompt_arguments = ("prompt", "prompt_2", "prompt_3")
    _pipeline_module = "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3"

    def __init__(self, pipe: Any) -> None:
        require_components(pipe, ("transformer", "scheduler", "encode_prompt"), "Stable Diffusion 3")
        super().__init__(pipe, pipe.transformer)
        self.transformer = pipe.transformer
        size = int(pipe.default_sample_size)
        self.latent_shape = (int(self.transformer.config.in_channels), size, size)

    def _schedule_arguments(self, scheduler: Any, inference_steps: int) -> dict[str, Any]:
        if not scheduler.config.get("use_dynamic_shifting", None):
            return {}
        patch = self.transformer.config.patch_size
        image_seq_len = (self.latent_shape[1] // patch) * (self.latent_shape[2] // patch)
        return {"mu": self._calculate_shift(scheduler, image_seq_len, 1.16)}

    def _truncation_limits(self, max_sequence_length: int) -> list[tuple[str, int | None]]:
        limits: list[tuple[str, int | None]] = [("tokenizer", None), ("tokenizer_2", None)]
        if getattr(self.pipe, "text_encoder_3", None) is not None:
            limits.append(("tokenizer_3", max_sequence_length))
        return limits

    def encode(self, prompts: Sequence[str], **encode_kwargs: Any) -> TextConditioning:
        options = self._with_defaults(encode_kwargs)
        limits = self._truncation_limits(int(options["max_sequence_length"]))
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=options.pop("prompt_2", None),
            prompt_3=options.pop("prompt_3", None),
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            **options,
        )
        return TextConditioning(embeds, pooled, truncated=self.truncated(prompts, limits))

    @torch.no_grad()
    def unconditional(self) -> TextConditioning:
        """Computed without autograd, as the pipeline's ``__call__`` computes it: grad mode changes T5's
        kernels at the 1e-6 level, and nothing is ever differentiated through u."""
        _, negative, _, negative_pooled = self.pipe.encode_prompt(
            prompt=[""],
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            max_sequence_length=self.call_default("max_sequence_length"),
        )
        return TextConditioning(negative, negative_pooled)

    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        return self.transformer(
            hidden_states=sample,
            timestep=timesteps,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]

    def encode_options(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        options = {
            name: arguments[name]
            for name in ("prompt_2", "prompt_3", "clip_skip", "max_sequence_length")
            if arguments.get(name) is not None
        }
        scale = (arguments.get("joint_attention_kwargs") or {}).get("scale")
        if scale is not None:
            options["lora_scale"] = scale
        return options

    def _negative_branch(self, arguments: Mapping[str, Any], per_prompt: int) -> dict[str, Any]:
        if not float(self._call_value(arguments, "guidance_scale")) > 1:
            return {}
        _, negative, _, negative_pooled = self.pipe.encode_prompt(
            prompt=None,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=arguments.get("negative_prompt"),
            negative_prompt_2=arguments.get("negative_prompt_2"),
            negative_prompt_3=arguments.get("negative_prompt_3"),
            do_classifier_free_guidance=True,
            prompt_embeds=arguments["prompt_embeds"],
            negative_prompt_embeds=arguments.get("negative_prompt_embeds"),
            pooled_prompt_embeds=arguments.get("pooled_prompt_embeds"),
            negative_pooled_prompt_embeds=arguments.get("negative_pooled_prompt_embeds"),
            device=self.device,
            clip_skip=arguments.get("clip_skip"),
            num_images_per_prompt=per_prompt,
            max_sequence_length=self._call_value(arguments, "max_sequence_length"),
            lora_scale=self._lora_scale(arguments),
        )
        return {
            "negative_prompt": None, "negative_prompt_2": None, "negative_prompt_3": None,
            "negative_prompt_embeds": negative, "negative_pooled_prompt_embeds": negative_pooled,
        }

    def embeds_dtype(self) -> torch.dtype:
        """``encode_prompt`` casts both CLIP parts to ``text_encoder``'s dtype and the T5 part (zeros without
        T5) to ``text_encoder_3``'s; the concatenation promotes."""
        clip = getattr(self.pipe, "text_encoder", None)
        if not isinstance(clip, torch.nn.Module):
            return super().embeds_dtype()
        t5 = getattr(self.pipe, "text_encoder_3", None)
        return torch.promote_types(clip.dtype, t5.dtype if isinstance(t5, torch.nn.Module) else clip.dtype)


class FluxAdapter(FlowMatchingAdapter):
    """``FluxPipeline``: FLUX.1-dev (guidance embedding, called with the call's default guidance 3.5) and
    schnell (no guidance input). Latents are packed into 2x2 patches for the transformer and unpacked back,
    so the score works on the unpacked ``(C, H, W)`` latent. Guidance-distilled FLUX has no unconditional
    pass; u is "" through the same encoders with the same guidance input: the negative branch of the
    pipeline's ``true_cfg_scale`` path."""

    family = "flux"
    default_profile = "flux"
    classifier_free_guidance = False
    leading_bos = False  # prompt_embeds are T5's alone
    text_encoders = ("text_encoder", "text_encoder_2")
    prompt_arguments = ("prompt", "prompt_2")
    _pipeline_module = "diffusers.pipelines.flux.pipeline_flux"

    def __init__(self, pipe: Any) -> None:
        require_components(pipe, ("transformer", "scheduler", "encode_prompt"), "FLUX")
        super().__init__(pipe, pipe.transformer)
        self.transformer = pipe.transformer
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        pixels = int(pipe.default_sample_size) * self.vae_scale_factor
        size = 2 * (pixels // (self.vae_scale_factor * 2))
        self.latent_shape = (int(self.transformer.config.in_channels) // 4, size, size)
        self.guidance_scale: float | None = (
            float(self.call_default("guidance_scale")) if self.transformer.config.guidance_embeds else None
        )

    def _schedule_arguments(self, scheduler: Any, inference_steps: int) -> dict[str, Any]:
        sigmas = np.linspace(1.0, 1 / inference_steps, inference_steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        image_seq_len = (self.latent_shape[1] // 2) * (self.latent_shape[2] // 2)
        return {"sigmas": sigmas, "mu": self._calculate_shift(scheduler, image_seq_len, 1.15)}

    def _label(self, timestep: torch.Tensor) -> float:
        return float((timestep.to(self.embeds_dtype()) / 1000).item())

    def _truncation_limits(self, max_sequence_length: int) -> list[tuple[str, int | None]]:
        return [("tokenizer", None), ("tokenizer_2", max_sequence_length)]

    def encode(self, prompts: Sequence[str], **encode_kwargs: Any) -> TextConditioning:
        options = self._with_defaults(encode_kwargs)
        limits = self._truncation_limits(int(options["max_sequence_length"]))
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=list(prompts),
            prompt_2=options.pop("prompt_2", None),
            device=self.device,
            num_images_per_prompt=1,
            **options,
        )
        return TextConditioning(embeds, pooled, truncated=self.truncated(prompts, limits))

    @torch.no_grad()
    def unconditional(self) -> TextConditioning:
        """Computed without autograd, as the pipeline's ``__call__`` computes it: grad mode changes T5's
        kernels at the 1e-6 level, and nothing is ever differentiated through u."""
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=[""],
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.call_default("max_sequence_length"),
        )
        return TextConditioning(embeds, pooled)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked ``[B, C, H, W]`` latents as the transformer takes them (the pipeline's own packing)."""
        return flux_pack(self.pipe, latents)

    def unpack(self, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents of a ``height`` x ``width`` latent image back to ``[B, C, H, W]``."""
        scale = self.vae_scale_factor
        return flux_unpack(self.pipe, packed, height * scale, width * scale, scale)

    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        batch, _, height, width = sample.shape
        device = sample.device
        image_ids = flux_image_ids(self.pipe, batch, height // 2, width // 2, device, sample.dtype)
        text_ids_dtype = self.pipe.text_encoder.dtype if self.pipe.text_encoder is not None else self.transformer.dtype
        text_ids = torch.zeros(cond.embeds.shape[1], 3, device=device, dtype=text_ids_dtype)
        guidance = None
        if self.guidance_scale is not None:
            guidance = torch.full([batch], self.guidance_scale, device=device, dtype=torch.float32)
        packed = self.transformer(
            hidden_states=self.pack(sample),
            timestep=timesteps,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0]
        return self.unpack(packed, height, width)

    def encode_options(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        names = ("prompt_2", "max_sequence_length")
        options = {name: arguments[name] for name in names if arguments.get(name) is not None}
        scale = (arguments.get("joint_attention_kwargs") or {}).get("scale")
        if scale is not None:
            options["lora_scale"] = scale
        return options

    def _negative_branch(self, arguments: Mapping[str, Any], per_prompt: int) -> dict[str, Any]:
        """FLUX has a negative branch only on its ``true_cfg_scale`` path."""
        has_negative = arguments.get("negative_prompt") is not None or (
            arguments.get("negative_prompt_embeds") is not None
            and arguments.get("negative_pooled_prompt_embeds") is not None
        )
        if not (float(self._call_value(arguments, "true_cfg_scale")) > 1 and has_negative):
            return {}
        negative, negative_pooled, _ = self.pipe.encode_prompt(
            prompt=arguments.get("negative_prompt"),
            prompt_2=arguments.get("negative_prompt_2"),
            prompt_embeds=arguments.get("negative_prompt_embeds"),
            pooled_prompt_embeds=arguments.get("negative_pooled_prompt_embeds"),
            device=self.device,
            num_images_per_prompt=per_prompt,
            max_sequence_length=self._call_value(arguments, "max_sequence_length"),
            lora_scale=self._lora_scale(arguments),
        )
        return {
            "negative_prompt": None, "negative_prompt_2": None,
            "negative_prompt_embeds": negative, "negative_pooled_prompt_embeds": negative_pooled,
        }

    def prepare_latents(self, arguments: Mapping[str, Any], batch: int) -> torch.Tensor:
        given = arguments.get("latents")
        if isinstance(given, torch.Tensor) and given.ndim == 3:
            return self.unpack_latents(given, arguments)
        return super().prepare_latents(arguments, batch)

    def _draw_latents(self, rows: int, height: int, width: int, generator: Any) -> torch.Tensor:
        packed, _ = self.pipe.prepare_latents(
            rows, self.latent_shape[0], height, width, self.embeds_dtype(), self.device, generator, None
        )
        scale = self.vae_scale_factor
        return self.unpack(packed, 2 * (height // (scale * 2)), 2 * (width // (scale * 2)))

    def latents_argument(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pack(latents)

    def unpack_latents(self, latents: torch.Tensor, arguments: Mapping[str, Any]) -> torch.Tensor:
        if latents.ndim != 3:
            return latents
        height, width = self.call_size(arguments)
        scale = self.vae_scale_factor
        return self.unpack(latents, 2 * (int(height) // (scale * 2)), 2 * (int(width) // (scale * 2)))
