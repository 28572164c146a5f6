"""Stable Diffusion 1.x / 2.x and SDXL: UNets on a discrete DDPM schedule, epsilon or v-prediction.

The score as docs/scoring.md defines it: t_hi and t_lo from a 50-step DDIM schedule built from the pipeline's
scheduler config, the detection noise at the UNet's native size, and the pipeline's own ``encode_prompt``
for the prompt and for the unconditional branch ("" for SD 1.x/2.x; for SDXL the zero embeddings the
pipeline itself uses when ``force_zeros_for_empty_prompt`` is set).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..conditioning import TextConditioning
from ..errors import UnsupportedPipelineError
from ..noise import scoring_timesteps
from .base import PipelineAdapter, schedule_json

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")
_SCHEDULE_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
    "timestep_spacing", "steps_offset", "rescale_betas_zero_snr",
)


def require_prediction_type(scheduler_config: Mapping[str, Any], what: str) -> str:
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise UnsupportedPipelineError(
            f"{what} predicts {prediction_type!r}; the memorization score supports "
            f"{' and '.join(SUPPORTED_PREDICTION_TYPES)} models"
        )
    return prediction_type


class DiscreteDiffusionAdapter(PipelineAdapter):
    """The score-space rules of a discrete-time eps/v model: eps = sqrt(a) v + sqrt(1 - a) x for v models
    in ``eps`` space; in ``native`` space the raw output, and the reference's norm factor sqrt(a) / (1 - a)."""

    def alphas_cumprod(self) -> torch.Tensor:
        """The training noise schedule's cumulative alphas, indexed by integer timestep."""
        return self.pipe.scheduler.alphas_cumprod

    def _alpha_bar(self, timestep: float) -> float:
        return float(self.alphas_cumprod()[int(timestep)])

    def scoring_timesteps(self, inference_steps: int) -> tuple[int, int]:
        return scoring_timesteps(self.pipe.scheduler.config, inference_steps)

    def to_score_space(self, raw: torch.Tensor, sample: torch.Tensor, timestep: float, space: str) -> torch.Tensor:
        if self.prediction_type == "epsilon" or space == "native":
            return raw
        alpha_bar = self._alpha_bar(timestep)
        return math.sqrt(alpha_bar) * raw + math.sqrt(1.0 - alpha_bar) * sample

    def norm_scale(self, space: str, timestep: float) -> float:
        if self.prediction_type == "v_prediction" and space == "native":
            alpha_bar = self._alpha_bar(timestep)
            return math.sqrt(alpha_bar) / (1.0 - alpha_bar)
        return 1.0

    def schedule_identity(self) -> str:
        return schedule_json(self.pipe.scheduler.config, _SCHEDULE_KEYS)


class StableDiffusionAdapter(DiscreteDiffusionAdapter):
    """Stable Diffusion 1.x / 2.x style pipelines: one text encoder, ``encode_prompt`` -> (cond, uncond)."""

    default_profiles = {"epsilon": "sd1", "v_prediction": "sd2"}

    def __init__(self, pipe: Any) -> None:
        self.model_class = type(pipe).__name__
        self._check_supported(pipe)
        super().__init__(pipe, pipe.unet)
        self.unet = pipe.unet
        self.prediction_type = require_prediction_type(pipe.scheduler.config, self.model_class)
        self.family = self.default_profiles[self.prediction_type]
        self.default_profile = self.family
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (int(self.unet.config.in_channels), int(height), int(width))

    def _check_supported(self, pipe: Any) -> None:
        missing = [name for name in ("unet", "scheduler", "encode_prompt") if getattr(pipe, name, None) is None]
        if missing:
            raise UnsupportedPipelineError(
                f"{self.model_class} has no {', '.join(missing)}: the memorization score needs a UNet, "
                "its scheduler config and the pipeline's own encode_prompt"
            )
        if getattr(pipe.unet.config, "time_cond_proj_dim", None) is not None:
            raise UnsupportedPipelineError(
                f"{self.model_class}'s UNet is guidance-distilled (time_cond_proj_dim is set): it has no "
                "unconditional branch for classifier-free guidance, which the score compares against"
            )
        if "do_classifier_free_guidance" not in inspect.signature(pipe.encode_prompt).parameters:
            raise UnsupportedPipelineError(
                f"{self.model_class}.encode_prompt has no do_classifier_free_guidance parameter: "
                "the pipeline has no unconditional branch the score can use"
            )

    def _tokenizers(self) -> list[tuple[str, int | None]]:
        return [("tokenizer", None)]

    def encode(self, prompts: Sequence[str], **encode_kwargs: Any) -> TextConditioning:
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False, **encode_kwargs)
        return TextConditioning(embeds, truncated=self.truncated(prompts, self._tokenizers()))

    def unconditional(self) -> TextConditioning:
        _, negative = self.pipe.encode_prompt([""], self.device, 1, True)
        return TextConditioning(negative)

    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        return self.unet(sample, timesteps, encoder_hidden_states=cond.embeds, return_dict=False)[0]

    def encode_options(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        options: dict[str, Any] = {}
        if arguments.get("clip_skip") is not None:
            options["clip_skip"] = arguments["clip_skip"]
        scale = (arguments.get("cross_attention_kwargs") or {}).get("scale")
        if scale is not None:
            options["lora_scale"] = scale
        return options


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """SDXL-style pipelines: two text encoders, pooled embeddings and native-size ``text_time`` conditioning."""

    default_profiles = {"epsilon": "sdxl", "v_prediction": "sdxl"}
    text_encoders = ("text_encoder", "text_encoder_2")
    prompt_arguments = ("prompt", "prompt_2")

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        native = self.default_size()
        projection_dim = (
            pipe.text_encoder_2.config.projection_dim
            if getattr(pipe, "text_encoder_2", None) is not None
            else int(pipe.unet.add_embedding.linear_1.in_features - 6 * pipe.unet.config.addition_time_embed_dim)
        )
        self._time_ids = pipe._get_add_time_ids(
            native, (0, 0), native, dtype=torch.float32, text_encoder_projection_dim=projection_dim
        )

    def _tokenizers(self) -> list[tuple[str, int | None]]:
        return [("tokenizer", None), ("tokenizer_2", None)]

    def encode(self, prompts: Sequence[str], **encode_kwargs: Any) -> TextConditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            **encode_kwargs,
        )
        return TextConditioning(embeds, pooled, truncated=self.truncated(prompts, self._tokenizers()))

    def unconditional(self) -> TextConditioning:
        _, negative, _, negative_pooled = self.pipe.encode_prompt(
            [""], device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=True
        )
        return TextConditioning(negative, negative_pooled)

    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        time_ids = self._time_ids.to(device=sample.device, dtype=cond.embeds.dtype).repeat(sample.shape[0], 1)
        added = {"text_embeds": cond.pooled, "time_ids": time_ids}
        return self.unet(
            sample, timesteps, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False
        )[0]

    def encode_options(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        options = super().encode_options(arguments)
        if arguments.get("prompt_2") is not None:
            options["prompt_2"] = arguments["prompt_2"]
        return options
