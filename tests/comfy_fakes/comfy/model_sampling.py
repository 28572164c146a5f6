"""Fake of ``comfy.model_sampling`` (v0.3.64): prediction types and the discrete, flow and FLUX samplings.

Same names and formulas as ComfyUI: ``sigma``/``timestep`` convert noise levels and the labels the network
receives, ``calculate_input`` scales the sampler's ``x`` for the network, ``calculate_denoised`` turns the
network's output into x0.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def _reshape(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    return sigma.view(()) if sigma.nelement() == 1 else sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))


class EPS:
    def calculate_input(self, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise / (_reshape(sigma, noise.ndim) ** 2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, model_input: torch.Tensor):
        return model_input - model_output * _reshape(sigma, model_output.ndim)


class V_PREDICTION(EPS):  # noqa: N801 (ComfyUI's name)
    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, model_input: torch.Tensor):
        sigma = _reshape(sigma, model_output.ndim)
        var = sigma**2 + self.sigma_data**2
        return model_input * self.sigma_data**2 / var - model_output * sigma * self.sigma_data / var**0.5


class EDM(V_PREDICTION):
    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, model_input: torch.Tensor):
        sigma = _reshape(sigma, model_output.ndim)
        var = sigma**2 + self.sigma_data**2
        return model_input * self.sigma_data**2 / var + model_output * sigma * self.sigma_data / var**0.5


class CONST:
    """Rectified flow: the network's input is ``x`` itself and its output the velocity (x0 = x - sigma * v)."""

    def calculate_input(self, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, model_input: torch.Tensor):
        return model_input - model_output * _reshape(sigma, model_output.ndim)


def _settings(model_config: Any) -> dict[str, Any]:
    return dict(getattr(model_config, "sampling_settings", {}) or {}) if model_config is not None else {}


class ModelSamplingDiscrete(torch.nn.Module):
    """A DDPM schedule from the config's sampling settings (ComfyUI's ``linear`` is linear in sqrt(beta), i.e.
    diffusers' ``scaled_linear``): ``sigma_t = sqrt((1 - a_t) / a_t)``; ``timestep`` inverts by nearest log-sigma."""

    def __init__(self, model_config: Any = None) -> None:
        super().__init__()
        settings = _settings(model_config)
        start, end = settings.get("linear_start", 0.00085), settings.get("linear_end", 0.012)
        steps = settings.get("timesteps", 1000)
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.num_timesteps = int(steps)
        self.sigma_data = 1.0
        self.set_sigmas(((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)

    def set_sigmas(self, sigmas: torch.Tensor) -> None:
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp().to(timestep.device)


class ModelSamplingContinuousEDM(torch.nn.Module):
    """Continuous EDM sigmas (Playground v2.5, SDXL EDM v-pred checkpoints): no discrete timesteps."""

    def __init__(self, model_config: Any = None) -> None:
        super().__init__()
        settings = _settings(model_config)
        self.sigma_data = settings.get("sigma_data", 1.0)
        sigmas = torch.linspace(math.log(settings.get("sigma_min", 0.002)), math.log(settings.get("sigma_max", 120.0)),
                                1000).exp()
        self.register_buffer("sigmas", sigmas)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return 0.25 * sigma.log()

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return (timestep / 0.25).exp()


def time_snr_shift(alpha: float, t: Any) -> Any:
    return t if alpha == 1.0 else alpha * t / (1 + (alpha - 1) * t)


class ModelSamplingDiscreteFlow(torch.nn.Module):
    """SD3's (and FLUX schnell's) flow sampling: ``sigma(t) = shift(t / multiplier)``, ``timestep = sigma *
    multiplier``; one sigma per training step in ``sigmas``."""

    def __init__(self, model_config: Any = None) -> None:
        super().__init__()
        settings = _settings(model_config)
        self.set_parameters(shift=settings.get("shift", 1.0), multiplier=settings.get("multiplier", 1000))

    def set_parameters(self, shift: float = 1.0, timesteps: int = 1000, multiplier: float = 1000) -> None:
        self.shift = shift
        self.multiplier = multiplier
        self.register_buffer("sigmas", self.sigma((torch.arange(1, timesteps + 1, 1) / timesteps) * multiplier))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.multiplier

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return time_snr_shift(self.shift, timestep / self.multiplier)


def flux_time_shift(mu: float, sigma: float, t: Any) -> Any:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


class ModelSamplingFlux(torch.nn.Module):
    """FLUX.1-dev's sampling: ``sigma(t) = exp(shift) / (exp(shift) + 1/t - 1)`` (shift 1.15 by default, the
    ``ModelSamplingFlux`` node sets it from a resolution); the network receives ``sigma`` itself."""

    def __init__(self, model_config: Any = None) -> None:
        super().__init__()
        self.set_parameters(shift=_settings(model_config).get("shift", 1.15))

    def set_parameters(self, shift: float = 1.15, timesteps: int = 10000) -> None:
        self.shift = shift
        self.register_buffer("sigmas", self.sigma(torch.arange(1, timesteps + 1, 1) / timesteps))

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        return flux_time_shift(self.shift, 1.0, timestep)
