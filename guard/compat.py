"""The private parts of diffusers and accelerate memguard relies on, each in one place, with why.

Some things the guard must do exactly as a pipeline does (pack FLUX latents, preprocess PixArt captions, find the
execution device under CPU offloading) exist only as underscore methods. Each is used through this module and
nowhere else, and ``tests/test_compat.py`` fails loudly, naming the function, when an upgrade removes or renames
one. Everything else goes through public API: per-step access is the pipelines' step-end callbacks
(``final_latents_arguments``), not a patched scheduler.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

__all__ = [
    "execution_device",
    "final_latents_arguments",
    "flux_image_ids",
    "flux_pack",
    "flux_unpack",
    "offload_hooks",
    "pixart_text_preprocessing",
]


def execution_device(pipe: Any) -> torch.device:
    """The device a pipeline runs its models on, offloading included (``DiffusionPipeline._execution_device``, what
    every pipeline's ``__call__`` itself uses; no public equivalent)."""
    return pipe._execution_device


def offload_hooks(module: torch.nn.Module) -> tuple[int, int]:
    """Identities of the offload hooks on ``module`` (accelerate's ``_hf_hook``, diffusers' ``_diffusers_hook``), so
    that a placement memo notices ``enable_model_cpu_offload`` and friends being switched on or off."""
    return id(getattr(module, "_hf_hook", None)), id(getattr(module, "_diffusers_hook", None))


def flux_pack(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Unpacked ``[B, C, H, W]`` latents as FLUX's transformer takes them (``FluxPipeline._pack_latents``)."""
    batch, channels, height, width = latents.shape
    return type(pipe)._pack_latents(latents, batch, channels, height, width)


def flux_unpack(pipe: Any, packed: torch.Tensor, height_px: int, width_px: int, vae_scale_factor: int) -> torch.Tensor:
    """Packed FLUX latents of an image of ``height_px`` x ``width_px`` back to ``[B, C, H, W]``
    (``FluxPipeline._unpack_latents``)."""
    return type(pipe)._unpack_latents(packed, height_px, width_px, vae_scale_factor)


def flux_image_ids(pipe: Any, batch: int, height: int, width: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """FLUX's positional ids of a ``height`` x ``width`` grid of packed patches
    (``FluxPipeline._prepare_latent_image_ids``)."""
    return type(pipe)._prepare_latent_image_ids(batch, height, width, device, dtype)


def pixart_text_preprocessing(pipe: Any, texts: list[str], clean_caption: bool) -> list[str]:
    """Captions as PixArt's ``encode_prompt`` cleans them before tokenizing (``_text_preprocessing``)."""
    return pipe._text_preprocessing(texts, clean_caption=clean_caption)


def final_latents_arguments(pipe: Any, arguments: Mapping[str, Any],
                            captured: MutableMapping[str, torch.Tensor]) -> dict[str, Any]:
    """``__call__`` arguments that record the latents after every denoising step into ``captured["latents"]``
    (the last record is the call's final latents), through the pipeline's public step-end callback, chained after
    the caller's own callback (which still sees and may change the latents first).

    ``callback_on_step_end`` where the pipeline has it (SD, SDXL, SD3, FLUX); the older ``callback`` with
    ``callback_steps=1`` where it has only that (PixArt).
    """
    parameters = inspect.signature(pipe.__call__).parameters
    if "callback_on_step_end" in parameters:
        theirs = arguments.get("callback_on_step_end")
        inputs = list(arguments.get("callback_on_step_end_tensor_inputs") or ["latents"])
        inputs = list(getattr(theirs, "tensor_inputs", None) or inputs)
        if "latents" not in inputs:
            inputs.append("latents")

        def on_step_end(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            out = theirs(pipeline, step, timestep, kwargs) if theirs is not None else {}
            out = dict(out or {})
            captured["latents"] = out.get("latents", kwargs["latents"])
            return out

        return {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": inputs}
    if "callback" in parameters:
        theirs_legacy = arguments.get("callback")
        every = int(arguments.get("callback_steps") or 1)

        def on_step(step: int, timestep: Any, latents: torch.Tensor) -> None:
            if theirs_legacy is not None and step % every == 0:
                theirs_legacy(step, timestep, latents)
            captured["latents"] = latents

        return {"callback": on_step, "callback_steps": 1}
    raise TypeError(f"{type(pipe).__name__}.__call__ has no step callback, so its final latents cannot be read")
