"""Fake of ``comfy.model_base`` (v0.3.64): ``BaseModel`` and the SDXL, SD3 and FLUX model classes.

What the pack relies on keeps ComfyUI's contract: ``model_sampling`` built from the config and ``ModelType``;
``extra_conds(**kwargs)`` turning a conditioning entry (``cross_attn``, ``pooled_output``, SDXL's sizes, FLUX's
``guidance``) into ``apply_model``'s keyword inputs (``c_crossattn``, ``y``, ``guidance``) through the model's
``encode_adm``; and ``apply_model(x, sigma, ...)``: sigma in, ``calculate_input``, the network at
``timestep(sigma)``, denoised x0 out through ``calculate_denoised``. The network is one of
``comfy.fake_networks`` (ComfyUI's own would be its ldm UNet, MMDiT or Flux).
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

import torch

from . import conds
from . import model_sampling as sampling


class ModelType(Enum):
    EPS = 1
    V_PREDICTION = 2
    V_PREDICTION_EDM = 3
    STABLE_CASCADE = 4
    EDM = 5
    FLOW = 6
    V_PREDICTION_CONTINUOUS = 7
    FLUX = 8
    IMG_TO_IMG = 9
    FLOW_COSMOS = 10


def model_sampling(model_config: Any, model_type: ModelType) -> torch.nn.Module:
    """``ModelSampling(<sampling>, <prediction>)`` for a model type, as ComfyUI composes it."""
    base: type = sampling.ModelSamplingDiscrete
    if model_type == ModelType.EPS:
        prediction: type = sampling.EPS
    elif model_type == ModelType.V_PREDICTION:
        prediction = sampling.V_PREDICTION
    elif model_type == ModelType.EDM:
        prediction, base = sampling.EDM, sampling.ModelSamplingContinuousEDM
    elif model_type == ModelType.FLOW:
        prediction, base = sampling.CONST, sampling.ModelSamplingDiscreteFlow
    elif model_type == ModelType.FLUX:
        prediction, base = sampling.CONST, sampling.ModelSamplingFlux
    else:
        raise NotImplementedError(f"the fake has no {model_type}")
    return type("ModelSampling", (base, prediction), {})(model_config)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding, cosines first (ComfyUI's ldm ``timestep_embedding``, what SDXL's ``Timestep`` uses)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class BaseModel(torch.nn.Module):
    def __init__(self, model_config: Any, diffusion_model: torch.nn.Module, model_type: ModelType = ModelType.EPS,
                 device: Any = None) -> None:
        super().__init__()
        self.model_config = model_config
        self.latent_format = model_config.latent_format
        self.manual_cast_dtype = model_config.manual_cast_dtype
        self.diffusion_model = diffusion_model
        self.model_type = model_type
        self.model_sampling = model_sampling(model_config, model_type)
        self.adm_channels = model_config.unet_config.get("adm_in_channels", None) or 0
        self.concat_keys: tuple[str, ...] = ()
        self.calls: list[dict[str, Any]] = []

    def get_dtype(self) -> torch.dtype:
        return self.diffusion_model.dtype

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, c_concat: Any = None, c_crossattn: Any = None,
                    control: Any = None, transformer_options: dict | None = None, **kwargs: Any) -> torch.Tensor:
        sigma = t
        self.calls.append({"sigma": sigma.detach().clone(), "batch": x.shape[0], "inputs": sorted(kwargs)})
        xc = self.model_sampling.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat.to(xc)], dim=1)
        dtype = self.manual_cast_dtype or self.get_dtype()
        xc = xc.to(dtype)
        timestep = self.model_sampling.timestep(t).float()
        context = None if c_crossattn is None else c_crossattn.to(xc.device, dtype)
        extra = {k: (v.to(xc.device, dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                 for k, v in kwargs.items()}
        output = self.diffusion_model(xc, timestep, context=context, control=control,
                                      transformer_options=transformer_options or {}, **extra).float()
        return self.model_sampling.calculate_denoised(sigma, output, x)

    def encode_adm(self, **kwargs: Any) -> torch.Tensor | None:
        return None

    def concat_cond(self, **kwargs: Any) -> torch.Tensor | None:
        return None

    def extra_conds(self, **kwargs: Any) -> dict[str, conds.CONDRegular]:
        out: dict[str, conds.CONDRegular] = {}
        concat = self.concat_cond(**kwargs)
        if concat is not None:
            out["c_concat"] = conds.CONDNoiseShape(concat)
        adm = self.encode_adm(**kwargs)
        if adm is not None:
            out["y"] = conds.CONDRegular(adm)
        cross_attn = kwargs.get("cross_attn", None)
        if cross_attn is not None:
            out["c_crossattn"] = conds.CONDCrossAttn(cross_attn)
        return out


class SDXL(BaseModel):
    """``encode_adm``: pooled text, then 256-wide embeddings of height, width, crop_h, crop_w, target height and
    width (defaults: 768, crop 0, target = size), as ComfyUI's SDXL builds ``y``."""

    def encode_adm(self, **kwargs: Any) -> torch.Tensor:
        pooled = kwargs["pooled_output"]
        width, height = kwargs.get("width", 768), kwargs.get("height", 768)
        values = [height, width, kwargs.get("crop_h", 0), kwargs.get("crop_w", 0),
                  kwargs.get("target_height", height), kwargs.get("target_width", width)]
        flat = torch.cat([timestep_embedding(torch.tensor([float(v)]), 256) for v in values]).flatten()
        return torch.cat((pooled, flat.unsqueeze(0).repeat(pooled.shape[0], 1).to(pooled.device)), dim=1)


class SD3(BaseModel):
    def __init__(self, model_config: Any, diffusion_model: torch.nn.Module, model_type: ModelType = ModelType.FLOW,
                 device: Any = None) -> None:
        super().__init__(model_config, diffusion_model, model_type, device)

    def encode_adm(self, **kwargs: Any) -> torch.Tensor:
        return kwargs["pooled_output"]

    def extra_conds(self, **kwargs: Any) -> dict[str, conds.CONDRegular]:
        out = super().extra_conds(**kwargs)
        if kwargs.get("cross_attn") is not None:
            out["c_crossattn"] = conds.CONDRegular(kwargs["cross_attn"])
        return out


class Flux(BaseModel):
    """FLUX: pooled ``y``, context not concatenable across lengths, and ``guidance`` (3.5 unless the entry says
    otherwise; None passes none)."""

    def __init__(self, model_config: Any, diffusion_model: torch.nn.Module, model_type: ModelType = ModelType.FLUX,
                 device: Any = None) -> None:
        super().__init__(model_config, diffusion_model, model_type, device)

    def encode_adm(self, **kwargs: Any) -> torch.Tensor:
        return kwargs["pooled_output"]

    def extra_conds(self, **kwargs: Any) -> dict[str, conds.CONDRegular]:
        out = super().extra_conds(**kwargs)
        if kwargs.get("cross_attn") is not None:
            out["c_crossattn"] = conds.CONDRegular(kwargs["cross_attn"])
        guidance = kwargs.get("guidance", 3.5)
        if guidance is not None:
            out["guidance"] = conds.CONDRegular(torch.FloatTensor([guidance]))
        return out


class Chroma(Flux):
    """A FLUX derivative (another model: the pack must refuse it)."""
