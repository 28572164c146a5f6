"""Model adapters: how to get text conditioning and predictions out of each model family."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedPipelineError
from .base import SCORE_SPACES, ModelAdapter, PipelineAdapter, weights_digest
from .flow import FlowMatchingAdapter, FluxAdapter, StableDiffusion3Adapter
from .pixart import PixArtAdapter
from .stable_diffusion import DiscreteDiffusionAdapter, StableDiffusionAdapter, StableDiffusionXLAdapter

__all__ = [
    "SCORE_SPACES",
    "DiscreteDiffusionAdapter",
    "FlowMatchingAdapter",
    "FluxAdapter",
    "ModelAdapter",
    "PipelineAdapter",
    "PixArtAdapter",
    "StableDiffusion3Adapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "adapter_for",
    "weights_digest",
]


def _denoiser_class(model: Any) -> str:
    denoiser = getattr(model, "unet", None) or getattr(model, "transformer", None)
    return type(denoiser).__name__ if denoiser is not None else ""


#: Transformer class -> (the text-to-image pipelines whose call contract the adapter follows, adapter).
_TRANSFORMER_FAMILIES = {
    "SD3Transformer2DModel": (("StableDiffusion3Pipeline",), StableDiffusion3Adapter),
    "FluxTransformer2DModel": (("FluxPipeline",), FluxAdapter),
    "PixArtTransformer2DModel": (("PixArtAlphaPipeline", "PixArtSigmaPipeline"), PixArtAdapter),
}


def _is_instance_of(model: Any, class_names: tuple[str, ...]) -> bool:
    import diffusers

    classes = tuple(getattr(diffusers, name) for name in class_names)
    return isinstance(model, classes)


def adapter_for(model: Any) -> ModelAdapter:
    """The adapter for a diffusers pipeline (or ``model`` itself if it already is one).

    UNet pipelines are taken as SD 1.x/2.x or SDXL; transformer pipelines are dispatched on the transformer's
    class and must be (subclasses of) the text-to-image pipeline whose ``__call__`` the adapter reproduces:
    another pipeline around the same transformer (img2img, inpainting, control) builds its inputs differently.
    """
    if isinstance(model, ModelAdapter):
        return model
    unet = getattr(model, "unet", None)
    if unet is not None:
        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            return StableDiffusionXLAdapter(model)
        return StableDiffusionAdapter(model)
    if getattr(model, "transformer", None) is not None:
        family = _TRANSFORMER_FAMILIES.get(_denoiser_class(model))
        if family is None:
            raise UnsupportedPipelineError(
                f"{type(model).__name__} ({_denoiser_class(model)}) is not a model family memguard can score yet"
            )
        pipelines, adapter = family
        if not _is_instance_of(model, pipelines):
            raise UnsupportedPipelineError(
                f"{type(model).__name__} ({_denoiser_class(model)}) is not a pipeline memguard can score yet: "
                f"for this transformer it scores {' and '.join(pipelines)}, whose call it reproduces"
            )
        return adapter(model)
    return StableDiffusionAdapter(model)  # names what is missing
