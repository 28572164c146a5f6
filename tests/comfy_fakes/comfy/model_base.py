"""Fake of ``comfy.model_base.BaseModel`` around a diffusers UNet, with ComfyUI's ``apply_model`` contract."""

from __future__ import annotations

from typing import Any

import torch

from .model_sampling import EPS, model_sampling


class LatentFormat:
    latent_channels = 4


class SD15:
    """Stands for ComfyUI's ``supported_models.SD15`` model config (its class name is what the pack reads)."""

    def __init__(self, unet_config: dict[str, Any]) -> None:
        self.unet_config = unet_config
        self.latent_format = LatentFormat()


class BaseModel(torch.nn.Module):
    """``apply_model(x, sigma, c_crossattn=ctx)``: ``x`` is the k-diffusion sample (x0 + sigma * eps); it is
    scaled by ``calculate_input`` (1/sqrt(sigma^2+1)), the UNet runs at ``timestep(sigma)``, and the denoised x0
    comes back through ``calculate_denoised``, as in ComfyUI v0.3.64's ``BaseModel._apply_model``."""

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor, prediction: type = EPS) -> None:
        super().__init__()
        self.diffusion_model = unet
        self.model_sampling = model_sampling(alphas_cumprod, prediction)
        self.model_config = SD15({"context_dim": unet.config.cross_attention_dim})
        self.latent_format = self.model_config.latent_format
        self.adm_channels = 0
        self.manual_cast_dtype = None
        self.calls: list[dict[str, Any]] = []

    def get_dtype(self) -> torch.dtype:
        return self.diffusion_model.dtype

    def apply_model(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        c_concat: Any = None,
        c_crossattn: Any = None,
        control: Any = None,
        transformer_options: dict | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        sigma = t
        self.calls.append({"sigma": sigma.detach().clone(), "batch": x.shape[0]})
        xc = self.model_sampling.calculate_input(sigma, x).to(self.get_dtype())
        timestep = self.model_sampling.timestep(t).float()
        context = c_crossattn.to(xc.device, self.get_dtype())
        output = self.diffusion_model(xc, timestep, encoder_hidden_states=context, return_dict=False)[0].float()
        return self.model_sampling.calculate_denoised(sigma, output, x)
