"""The two scoring timesteps and the detection noise x_T (docs/scoring.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

DEFAULT_SEED = 51
DEFAULT_INFERENCE_STEPS = 50


def scoring_timesteps(scheduler_config: Mapping[str, Any], inference_steps: int = DEFAULT_INFERENCE_STEPS):
    """``(t_hi, t_lo)``: the first and third-from-last timesteps of a DDIM schedule built from the config.

    Deriving them from the model's own config (spacing, offset, training steps) rather than
    hard-coding 981/41 keeps the score right for models trained with other schedules.
    """
    from diffusers import DDIMScheduler

    if inference_steps < 3:
        raise ValueError(f"inference_steps must be at least 3 to have a third-from-last step, got {inference_steps}")
    scheduler = DDIMScheduler.from_config(dict(scheduler_config))
    scheduler.set_timesteps(inference_steps)
    timesteps = scheduler.timesteps
    return int(timesteps[0]), int(timesteps[-3])


def detection_noise(
    latent_shape: tuple[int, int, int],
    *,
    samples: int = 1,
    seed: int = DEFAULT_SEED,
    init_noise_sigma: float = 1.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``samples`` draws of x_T, identical on every device: a CPU generator in float32, then moved.

    The generator is private to this call, so the caller's generators and the global RNG are untouched.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((samples, *latent_shape), generator=generator, dtype=torch.float32) * init_noise_sigma
    return noise.to(device=device, dtype=dtype)
