"""``ComfyUIModelAdapter``: memguard's score computed from ComfyUI's MODEL and CLIP objects.

ComfyUI's ``BaseModel.apply_model(x, sigma, c_crossattn=...)`` takes a k-diffusion sample
``x = x0 + sigma * eps`` and a noise level ``sigma`` (not a timestep), and returns the denoised ``x0``.
The diffusers convention memguard's score is defined in (docs/scoring.md) feeds ``x_t`` with unit
variance at timestep ``t``. The two meet through ``x = x_t * sqrt(sigma^2 + 1)`` with
``sigma = sqrt((1 - a_t) / a_t)``; then ``eps = (x - x0) / sigma`` whatever the model predicts
natively (eps or v), so this adapter always answers in eps space and the formulas stay in
``guard.scoring``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from guard.scoring import ModelAdapter, TextConditioning, UnsupportedPipelineError, scoring_timesteps
from guard.scoring.adapters import weights_digest

__all__ = ["ComfyUIModelAdapter", "conditioning_from_comfy", "comfy_from_conditioning", "native_latent_size"]

# Prediction classes of ``comfy.model_sampling`` whose output ``apply_model`` turns into x0 with
# ``x = x0 + sigma * eps``, on a discrete 1000-step DDPM schedule: what the score is defined for.
_SUPPORTED_SAMPLING = ("EPS", "V_PREDICTION")
_UNSUPPORTED_SAMPLING = ("EDM", "CONST", "X0", "IMG_TO_IMG", "COSMOS_RFLOW")

# Native latent sizes (diffusers' ``unet.config.sample_size``) by ComfyUI model config class.
_NATIVE_LATENT = {"SD15": 64, "SD20": 64, "SD21UnclipL": 96, "SD21UnclipH": 96, "SDXL": 128, "SDXLRefiner": 128}


def _sampling_kind(model_sampling: Any) -> str:
    names = [cls.__name__ for cls in type(model_sampling).__mro__]
    for name in names:
        if name in _UNSUPPORTED_SAMPLING:
            return name
        if name in _SUPPORTED_SAMPLING:
            return name
    return type(model_sampling).__name__


def native_latent_size(base_model: Any, kind: str) -> int:
    """The latent side the model was trained at, so scores (and calibrations) do not drift with the
    resolution a workflow generates at; SD 2.x v-prediction checkpoints are 768 px models."""
    name = type(getattr(base_model, "model_config", None)).__name__
    if name == "SD20" and kind == "V_PREDICTION":
        return 96
    return _NATIVE_LATENT.get(name, 64)


def conditioning_from_comfy(conditioning: Sequence[Sequence[Any]]) -> TextConditioning:
    """The token embeddings of the first entry of a ComfyUI CONDITIONING list (``[[tensor, dict], ...]``)."""
    if not conditioning:
        raise ValueError("the CONDITIONING input is empty")
    embeds = conditioning[0][0]
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3:
        raise ValueError(f"expected a [batch, tokens, dim] tensor in CONDITIONING, got {type(embeds).__name__}")
    pooled = conditioning[0][1].get("pooled_output") if len(conditioning[0]) > 1 else None
    return TextConditioning(embeds, pooled if isinstance(pooled, torch.Tensor) else None)


def comfy_from_conditioning(original: Sequence[Sequence[Any]], embeds: torch.Tensor) -> list[list[Any]]:
    """A CONDITIONING list like ``original`` whose first entry carries ``embeds`` (a rewritten prompt)."""
    first_options = dict(original[0][1]) if len(original[0]) > 1 else {}
    return [[embeds, first_options]] + [[entry[0], dict(entry[1])] for entry in original[1:]]


def _repeat_to(embeds: torch.Tensor, length: int) -> torch.Tensor:
    """Repeat the token axis up to ``length`` (a multiple): cross-attention over a key sequence repeated
    k times gives exactly the same output, which is how ComfyUI itself batches prompts of 77 and 154 tokens."""
    return embeds.repeat(1, length // embeds.shape[1], 1)


def cat_token_lengths(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate ``[1, L_i, D]`` embeddings of different token lengths along the batch axis."""
    length = math.lcm(*[part.shape[1] for part in parts])
    return torch.cat([_repeat_to(part, length) for part in parts])


class ComfyUIModelAdapter(ModelAdapter):
    """Gives ``guard.scoring.Scorer`` eps predictions and text embeddings from ComfyUI objects.

    Args:
        model: ComfyUI's MODEL, a ``comfy.model_patcher.ModelPatcher``.
        clip: ComfyUI's CLIP, used to encode prompts and the empty prompt "" (the reference
            unconditional branch). May be ``None`` when ``unconditional`` is given.
        unconditional: embeddings to use instead of ``clip``'s "" (e.g. the workflow's negative
            conditioning, when the operator asks for it).
        latent_size: latent side of the detection noise; default: the model's native size.
        model_id: the model's name in audit records.
    """

    prediction_type = "epsilon"

    def __init__(
        self,
        model: Any,
        clip: Any = None,
        *,
        unconditional: TextConditioning | None = None,
        latent_size: int | None = None,
        model_id: str | None = None,
    ) -> None:
        self.patcher = model
        self.base_model = getattr(model, "model", None)
        if self.base_model is None or not hasattr(self.base_model, "apply_model"):
            raise UnsupportedPipelineError(f"{type(model).__name__} is not a ComfyUI MODEL (ModelPatcher)")
        self.clip = clip
        self._unconditional = unconditional
        if clip is None and unconditional is None:
            raise UnsupportedPipelineError("connect a CLIP (to encode the empty prompt) or use the negative branch")
        sampling = self.base_model.model_sampling
        kind = _sampling_kind(sampling)
        if kind not in _SUPPORTED_SAMPLING or not hasattr(sampling, "num_timesteps"):
            raise UnsupportedPipelineError(
                f"{type(self.base_model).__name__} uses {kind} sampling: the memorization score is defined for "
                "discrete-time eps- or v-prediction diffusion models (SD 1.x/2.x style)"
            )
        if int(getattr(self.base_model, "adm_channels", 0) or 0) > 0:
            raise UnsupportedPipelineError(
                f"{type(self.base_model).__name__} needs extra (adm) conditioning such as SDXL's pooled text and "
                "size embeddings; this node pack scores SD 1.x/2.x style models only so far"
            )
        self.sampling_kind = kind
        self.model_class = f"ComfyUI/{type(getattr(self.base_model, 'model_config', self.base_model)).__name__}"
        self.model_id = model_id or self.model_class
        self.family = "sd2" if kind == "V_PREDICTION" else "sd1"
        self.default_profile = self.family
        side = int(latent_size) if latent_size else native_latent_size(self.base_model, kind)
        channels = int(getattr(getattr(self.base_model, "latent_format", None), "latent_channels", 4))
        self.latent_shape = (channels, side, side)
        self._fingerprint: str | None = None
        self._loaded = False

    # ------------------------------------------------------------------ placement

    def load(self) -> None:
        """Place the model as ComfyUI's samplers do (patches such as LoRAs applied, VRAM managed)."""
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.patcher])
        self._loaded = True

    @property
    def device(self) -> torch.device:
        return torch.device(getattr(self.patcher, "load_device", "cpu"))

    @property
    def dtype(self) -> torch.dtype:
        manual = getattr(self.base_model, "manual_cast_dtype", None)
        return manual if manual is not None else self.base_model.get_dtype()

    # ------------------------------------------------------------------ schedule

    def scoring_timesteps(self, inference_steps: int) -> tuple[int, int]:
        """DDIM, leading spacing, ``steps_offset=1`` over the model's training steps (SD's own scheduler)."""
        config = {
            "num_train_timesteps": int(self.base_model.model_sampling.num_timesteps),
            "timestep_spacing": "leading",
            "steps_offset": 1,
            "set_alpha_to_one": False,
            "clip_sample": False,
        }
        return scoring_timesteps(config, inference_steps)

    # ------------------------------------------------------------------ text

    def _encode_one(self, text: str) -> torch.Tensor:
        tokens = self.clip.tokenize(text)
        embeds, _ = self.clip.encode_from_tokens(tokens, return_pooled=True)
        return embeds

    def encode(self, prompts: Sequence[str], **encode_kwargs: Any) -> TextConditioning:
        if self.clip is None:
            raise UnsupportedPipelineError("no CLIP connected: prompts cannot be encoded")
        if encode_kwargs:
            raise TypeError(f"ComfyUI's CLIP takes no encode options here, got {sorted(encode_kwargs)}")
        return TextConditioning(cat_token_lengths([self._encode_one(text) for text in prompts]))

    def unconditional(self) -> TextConditioning:
        if self._unconditional is not None:
            return self._unconditional.select([0])
        return TextConditioning(self._encode_one(""))

    # ------------------------------------------------------------------ predictions

    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        """eps at integer ``timesteps`` for unit-variance ``sample`` rows, through ComfyUI's ``apply_model``."""
        if not self._loaded:
            self.load()
        sampling = self.base_model.model_sampling
        sigma = sampling.sigma(timesteps.to(sampling.sigmas.device)).to(sample.device, torch.float32)
        scale = (sigma**2 + 1.0).sqrt().view(-1, 1, 1, 1)
        x_in = sample.float() * scale
        options = dict(getattr(self.patcher, "model_options", {}) or {})
        transformer_options = dict(options.get("transformer_options", {}) or {})
        context = cond.embeds
        if context.shape[0] != sample.shape[0]:
            raise ValueError(f"{context.shape[0]} embeddings for {sample.shape[0]} samples")
        denoised = self.base_model.apply_model(
            x_in, sigma, c_crossattn=context, transformer_options=transformer_options
        ).float()
        return (x_in - denoised) / sigma.view(-1, 1, 1, 1)

    # ------------------------------------------------------------------ identity

    def fingerprint(self) -> str:
        """Weights (as patched and placed) and configs of the UNet and text encoder, and the uncond choice."""
        if self._fingerprint is None:
            if not self._loaded:
                self.load()
            digest = hashlib.sha256(self.model_class.encode())
            config = getattr(getattr(self.base_model, "model_config", None), "unet_config", {}) or {}
            digest.update(repr(sorted((str(k), repr(v)) for k, v in dict(config).items())).encode())
            digest.update(self.sampling_kind.encode())
            digest.update(weights_digest(self.base_model.diffusion_model).encode())
            encoder = getattr(self.clip, "cond_stage_model", None)
            if isinstance(encoder, torch.nn.Module):
                digest.update(weights_digest(encoder).encode())
            digest.update(b"uncond:" + (b"negative" if self._unconditional is not None else b"empty"))
            if self._unconditional is not None:
                digest.update(self._unconditional.embeds.detach().float().cpu().numpy().tobytes())
            self._fingerprint = digest.hexdigest()[:16]
        return self._fingerprint

    def cache_token(self) -> object:
        uncond = None if self._unconditional is None else id(self._unconditional.embeds)
        return (id(self.base_model.diffusion_model), id(self.clip), uncond)
