"""Fake of ``comfy.sample`` (v0.3.64): the noise KSampler draws from a seed, the empty latent widened to the model's
latent channels, and ``sample`` as ``nodes.common_ksampler`` calls it."""

from __future__ import annotations

from typing import Any

import torch

from . import samplers, utils

calls: list[dict[str, Any]] = []


def prepare_noise(latent_image: torch.Tensor, seed: int, noise_inds: Any = None) -> torch.Tensor:
    generator = torch.manual_seed(seed)
    if noise_inds is None:
        return torch.randn(latent_image.size(), dtype=latent_image.dtype, generator=generator, device="cpu")
    noises = [torch.randn([1, *latent_image.shape[1:]], dtype=latent_image.dtype, generator=generator)
              for _ in range(max(noise_inds) + 1)]
    return torch.cat([noises[i] for i in noise_inds])


def fix_empty_latent_channels(model: Any, latent_image: torch.Tensor) -> torch.Tensor:
    latent_format = model.get_model_object("latent_format")
    if latent_format.latent_channels != latent_image.shape[1] and torch.count_nonzero(latent_image) == 0:
        latent_image = utils.repeat_to_batch_size(latent_image, latent_format.latent_channels, dim=1)
    return latent_image


def sample(model: Any, noise: torch.Tensor, steps: int, cfg: float, sampler_name: str, scheduler: str,
           positive: list, negative: list, latent_image: torch.Tensor, denoise: float = 1.0,
           disable_noise: bool = False, start_step: Any = None, last_step: Any = None,
           force_full_denoise: bool = False, noise_mask: Any = None, sigmas: Any = None, callback: Any = None,
           disable_pbar: bool = False, seed: int | None = None) -> torch.Tensor:
    calls.append({"images": int(noise.shape[0]), "steps": steps, "cfg": cfg, "seed": seed,
                  "cfg_function": "sampler_cfg_function" in model.model_options})
    sampler = samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                scheduler=scheduler, denoise=denoise, model_options=model.model_options)
    return sampler.sample(noise, positive, negative, cfg, latent_image, seed=seed, callback=callback,
                          denoise_mask=noise_mask)
