"""Fake of ``comfy.latent_formats``: the latent channel counts the pack reads (``latent_channels``), and the scaling
between the VAE's latents (what KSampler takes and returns) and the model's (``process_in`` / ``process_out``)."""

from __future__ import annotations

import torch


class LatentFormat:
    latent_channels = 4
    scale_factor = 1.0

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.scale_factor

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.scale_factor


class SD15(LatentFormat):
    scale_factor = 0.18215


class SDXL(LatentFormat):
    scale_factor = 0.13025


class SD3(LatentFormat):
    latent_channels = 16
    scale_factor = 1.5305


class Flux(SD3):
    scale_factor = 0.3611
