"""Model adapters: how to get text conditioning and noise predictions out of one kind of model.

The score's formulas (``guard.scoring.scorer``) only ever talk to a ``ModelAdapter``, so a new
model family, or another runtime such as ComfyUI, plugs in by implementing one class.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .conditioning import TextConditioning
from .errors import UnsupportedPipelineError
from .noise import scoring_timesteps

SUPPORTED_PREDICTION_TYPES = ("epsilon", "v_prediction")


class ModelAdapter(ABC):
    """The handful of operations the memorization score needs from a model."""

    model_class: str
    model_id: str
    prediction_type: str
    default_profile: str
    latent_shape: tuple[int, int, int]
    init_noise_sigma: float = 1.0

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @abstractmethod
    def alphas_cumprod(self) -> torch.Tensor:
        """The training noise schedule's cumulative alphas, indexed by integer timestep."""

    @abstractmethod
    def timesteps(self, inference_steps: int) -> tuple[int, int]:
        """``(t_hi, t_lo)`` for a DDIM schedule of ``inference_steps`` steps."""

    @abstractmethod
    def encode(self, prompts: Sequence[str], **encode_kwargs: Any) -> TextConditioning:
        """Conditional embeddings of ``prompts``, exactly as the model's pipeline would compute them."""

    @abstractmethod
    def unconditional(self) -> TextConditioning:
        """The pipeline's own unconditional branch (batch of one)."""

    @abstractmethod
    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        """Raw model output (in ``prediction_type`` space) for a batch; one timestep per row."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A stable id of the weights and configs, for caching calibrations per model."""

    def cache_token(self) -> object:
        """Identity of the underlying network, so cached predictions are never reused across models."""
        return id(self)


def _require_prediction_type(scheduler_config: Mapping[str, Any], what: str) -> str:
    prediction_type = scheduler_config.get("prediction_type", "epsilon")
    if prediction_type not in SUPPORTED_PREDICTION_TYPES:
        raise UnsupportedPipelineError(
            f"{what} predicts {prediction_type!r}; the memorization score supports "
            f"{' and '.join(SUPPORTED_PREDICTION_TYPES)} models"
        )
    return prediction_type


def weights_digest(module: torch.nn.Module, values_per_tensor: int = 256) -> str:
    """Hash of every parameter's name, shape and first values: cheap, and distinct across fine-tunes."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in module.named_parameters():
            digest.update(name.encode())
            digest.update(str(tuple(param.shape)).encode())
            head = param.detach().reshape(-1)[:values_per_tensor].to("cpu", torch.float32)
            digest.update(head.numpy().tobytes())
    return digest.hexdigest()


def _config_json(config: Any) -> str:
    return json.dumps({k: v for k, v in dict(config).items() if not k.startswith("_")}, sort_keys=True, default=str)


class DiffusersAdapter(ModelAdapter):
    """Stable Diffusion 1.x / 2.x style pipelines: one text encoder, ``encode_prompt`` -> (cond, uncond)."""

    default_profiles = {"epsilon": "sd1", "v_prediction": "sd2"}

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.model_class = type(pipe).__name__
        self._check_supported(pipe)
        self.unet = pipe.unet
        self.prediction_type = _require_prediction_type(pipe.scheduler.config, self.model_class)
        self.default_profile = self.default_profiles[self.prediction_type]
        self.model_id = str(getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path") or "")
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        self.latent_shape = (int(self.unet.config.in_channels), int(height), int(width))
        self._fingerprint: str | None = None
        self._device_memo: tuple[tuple, tuple[torch.device, torch.dtype]] | None = None

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

    @property
    def device(self) -> torch.device:
        """The pipeline's execution device (offloading aware), memoized while its placement is unchanged.

        ``_execution_device`` walks every submodule looking for offload hooks, which costs milliseconds
        per call on a full-size UNet; the placement signature is a handful of attribute reads.
        """
        return self._placement()[0]

    def _placement(self) -> tuple[torch.device, torch.dtype]:
        signature = self._placement_signature()
        if self._device_memo is None or self._device_memo[0] != signature:
            self._device_memo = (signature, (self.pipe._execution_device, self.unet.dtype))
        return self._device_memo[1]

    def _placement_signature(self) -> tuple:
        signature = []
        for module in self.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                first = next(module.parameters(), None)
                signature.append((
                    id(module),
                    None if first is None else (first.device, first.dtype),
                    id(getattr(module, "_hf_hook", None)),
                    id(getattr(module, "_diffusers_hook", None)),
                ))
        return tuple(signature)

    @property
    def dtype(self) -> torch.dtype:
        return self._placement()[1]

    def alphas_cumprod(self) -> torch.Tensor:
        return self.pipe.scheduler.alphas_cumprod

    def timesteps(self, inference_steps: int) -> tuple[int, int]:
        return scoring_timesteps(self.pipe.scheduler.config, inference_steps)

    def truncated(self, prompts: Sequence[str]) -> list[bool]:
        flags = [False] * len(prompts)
        for tokenizer_name in ("tokenizer", "tokenizer_2"):
            tokenizer = getattr(self.pipe, tokenizer_name, None)
            if tokenizer is None:
                continue
            texts = list(prompts)
            if hasattr(self.pipe, "maybe_convert_prompt"):
                texts = self.pipe.maybe_convert_prompt(texts, tokenizer)
            ids = tokenizer(texts, truncation=False, padding=False).input_ids
            flags = [flag or len(row) > tokenizer.model_max_length for flag, row in zip(flags, ids)]
        return flags

    def encode(self, prompts: Sequence[str], **encode_kwargs: Any) -> TextConditioning:
        embeds, _ = self.pipe.encode_prompt(list(prompts), self.device, 1, False, **encode_kwargs)
        return TextConditioning(embeds, None, self.truncated(prompts))

    def unconditional(self) -> TextConditioning:
        _, negative = self.pipe.encode_prompt([""], self.device, 1, True)
        return TextConditioning(negative)

    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        return self.unet(sample, timesteps, encoder_hidden_states=cond.embeds, return_dict=False)[0]

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.sha256(self.model_class.encode())
            digest.update(_config_json(self.unet.config).encode())
            digest.update(_config_json(self.pipe.scheduler.config).encode())
            for name in ("text_encoder", "text_encoder_2"):
                encoder = getattr(self.pipe, name, None)
                if encoder is not None:
                    digest.update(encoder.config.to_json_string().encode())
                    digest.update(weights_digest(encoder).encode())
            digest.update(weights_digest(self.unet).encode())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def cache_token(self) -> object:
        return id(self.unet)


class DiffusersXLAdapter(DiffusersAdapter):
    """SDXL-style pipelines: two text encoders, pooled embeddings and ``text_time`` micro-conditioning."""

    default_profiles = {"epsilon": "sdxl", "v_prediction": "sdxl"}

    def __init__(self, pipe: Any) -> None:
        super().__init__(pipe)
        vae_scale = getattr(pipe, "vae_scale_factor", 8)
        native = (self.latent_shape[1] * vae_scale, self.latent_shape[2] * vae_scale)
        projection_dim = (
            pipe.text_encoder_2.config.projection_dim
            if getattr(pipe, "text_encoder_2", None) is not None
            else int(pipe.unet.add_embedding.linear_1.in_features - 6 * pipe.unet.config.addition_time_embed_dim)
        )
        self._time_ids = pipe._get_add_time_ids(
            native, (0, 0), native, dtype=torch.float32, text_encoder_projection_dim=projection_dim
        )

    def encode(self, prompts: Sequence[str], **encode_kwargs: Any) -> TextConditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            **encode_kwargs,
        )
        return TextConditioning(embeds, pooled, self.truncated(prompts))

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


def adapter_for(model: Any) -> ModelAdapter:
    """The adapter for a diffusers pipeline (or ``model`` itself if it already is one)."""
    if isinstance(model, ModelAdapter):
        return model
    unet = getattr(model, "unet", None)
    if unet is not None and getattr(unet.config, "addition_embed_type", None) == "text_time":
        return DiffusersXLAdapter(model)
    return DiffusersAdapter(model)
