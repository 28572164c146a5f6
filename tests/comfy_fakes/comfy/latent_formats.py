"""Fake of ``comfy.latent_formats``: the latent channel counts the pack reads (``latent_channels``)."""

from __future__ import annotations


class LatentFormat:
    latent_channels = 4
    scale_factor = 1.0


class SD15(LatentFormat):
    scale_factor = 0.18215


class SDXL(LatentFormat):
    scale_factor = 0.13025


class SD3(LatentFormat):
    latent_channels = 16
    scale_factor = 1.5305


class Flux(SD3):
    scale_factor = 0.3611
