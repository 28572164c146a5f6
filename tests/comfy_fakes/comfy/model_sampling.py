"""Fake of ``comfy.model_sampling`` (v0.3.64): discrete sigmas and the EPS / V_PREDICTION formulas."""

from __future__ import annotations

import torch


def _reshape(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    return sigma.view(()) if sigma.nelement() == 1 else sigma.view(sigma.shape[:1] + (1,) * (ndim - 1))


class EPS:
    sigma_data = 1.0

    def calculate_input(self, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise / (_reshape(sigma, noise.ndim) ** 2 + self.sigma_data**2) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, model_input: torch.Tensor):
        return model_input - model_output * _reshape(sigma, model_output.ndim)


class V_PREDICTION(EPS):  # noqa: N801 (ComfyUI's name)
    def calculate_denoised(self, sigma: torch.Tensor, model_output: torch.Tensor, model_input: torch.Tensor):
        sigma = _reshape(sigma, model_output.ndim)
        var = sigma**2 + self.sigma_data**2
        return model_input * self.sigma_data**2 / var - model_output * sigma * self.sigma_data / var**0.5


class ModelSamplingDiscrete(torch.nn.Module):
    """Sigmas of a DDPM schedule: ``sigma_t = sqrt((1 - a_t) / a_t)``; ``timestep`` inverts by nearest log-sigma."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.num_timesteps = int(sigmas.shape[0])
        self.register_buffer("sigmas", sigmas.float())
        self.register_buffer("log_sigmas", sigmas.log().float())

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)

    def sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(timestep.float().to(self.log_sigmas.device), min=0, max=len(self.sigmas) - 1)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp().to(timestep.device)


def model_sampling(alphas_cumprod: torch.Tensor, prediction: type = EPS) -> ModelSamplingDiscrete:
    """``ModelSampling(ModelSamplingDiscrete, EPS)`` as ``comfy.model_base.model_sampling`` builds it."""
    cls = type("ModelSampling", (ModelSamplingDiscrete, prediction), {})
    return cls(alphas_cumprod)
