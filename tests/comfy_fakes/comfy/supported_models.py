"""Fake of ``comfy.supported_models``: model configs by class name (the pack reads the name, ``unet_config``,
``latent_format`` and, through the model sampling, ``sampling_settings``), as in ComfyUI v0.3.64."""

from __future__ import annotations

from typing import Any

from . import latent_formats


class BASE:
    unet_config: dict[str, Any] = {}
    sampling_settings: dict[str, Any] = {}
    latent_format: type = latent_formats.LatentFormat
    manual_cast_dtype = None

    def __init__(self, unet_config: dict[str, Any]) -> None:
        self.unet_config = dict(unet_config)
        self.sampling_settings = dict(type(self).sampling_settings)
        self.latent_format = type(self).latent_format()


class SD15(BASE):
    sampling_settings = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012}
    latent_format = latent_formats.SD15


class SD20(SD15):
    pass


class SDXL(BASE):
    latent_format = latent_formats.SDXL


class SDXLRefiner(SDXL):
    pass


class SD3(BASE):
    sampling_settings = {"shift": 3.0}
    latent_format = latent_formats.SD3


class Flux(BASE):
    sampling_settings: dict[str, Any] = {}
    latent_format = latent_formats.Flux


class FluxSchnell(Flux):
    sampling_settings = {"multiplier": 1.0, "shift": 1.0}
