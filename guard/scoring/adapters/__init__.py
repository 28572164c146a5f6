"""Model adapters: how to get text conditioning and predictions out of each model family."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedPipelineError
from .base import SCORE_SPACES, ModelAdapter, PipelineAdapter, weights_digest
from .stable_diffusion import DiscreteDiffusionAdapter, StableDiffusionAdapter, StableDiffusionXLAdapter

__all__ = [
    "SCORE_SPACES",
    "DiscreteDiffusionAdapter",
    "ModelAdapter",
    "PipelineAdapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "adapter_for",
    "weights_digest",
]


def _denoiser_class(model: Any) -> str:
    denoiser = getattr(model, "unet", None) or getattr(model, "transformer", None)
    return type(denoiser).__name__ if denoiser is not None else ""


def adapter_for(model: Any) -> ModelAdapter:
    """The adapter for a diffusers pipeline (or ``model`` itself if it already is one)."""
    if isinstance(model, ModelAdapter):
        return model
    unet = getattr(model, "unet", None)
    if unet is not None:
        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            return StableDiffusionXLAdapter(model)
        return StableDiffusionAdapter(model)
    if getattr(model, "transformer", None) is not None:
        raise UnsupportedPipelineError(
            f"{type(model).__name__} ({_denoiser_class(model)}) is not a model family memguard can score yet"
        )
    return StableDiffusionAdapter(model)  # names what is missing
