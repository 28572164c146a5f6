"""Stand-ins for ComfyUI's networks (ldm ``UNetModel``, MMDiT, ``comfy.ldm.flux.model.Flux``) over diffusers
models: the same ``forward(x, timesteps, context=..., y=..., ...)`` signature and meaning, so the fake
``BaseModel`` calls them as ComfyUI's calls its own. Not part of ComfyUI; the real-checkout tests use ComfyUI's
networks with the same weights."""

from __future__ import annotations

import copy
from typing import Any

import torch


class UNetModel(torch.nn.Module):
    """A diffusers UNet taking ComfyUI's inputs; with SDXL's ``y`` = [pooled, six 256-wide size embeddings] the
    size embeddings are fed in already embedded (a copy of the UNet whose ``add_time_proj`` passes them on)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        if getattr(unet.config, "addition_embed_type", None) == "text_time":
            self.unet = copy.deepcopy(unet)
            self.unet.add_time_proj = torch.nn.Identity()

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
                control: Any = None, transformer_options: dict | None = None, **kwargs: Any) -> torch.Tensor:
        added = None
        if y is not None:
            sizes = 6 * 256
            added = {"text_embeds": y[:, :-sizes], "time_ids": y[:, -sizes:]}
        return self.unet(x, timesteps, encoder_hidden_states=context, added_cond_kwargs=added, return_dict=False)[0]


class MMDiT(torch.nn.Module):
    """A diffusers ``SD3Transformer2DModel`` taking ComfyUI's inputs (timestep = 1000 sigma, ``y`` = pooled)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
                control: Any = None, transformer_options: dict | None = None, **kwargs: Any) -> torch.Tensor:
        return self.transformer(hidden_states=x, timestep=timesteps, encoder_hidden_states=context,
                                pooled_projections=y, return_dict=False)[0]


class Flux(torch.nn.Module):
    """A diffusers ``FluxTransformer2DModel`` taking ComfyUI's inputs: unpacked latents, packed here into 2x2
    patches with row/column image ids and zero text ids (as ComfyUI's Flux does), timestep = sigma, ``guidance``
    used only by a model with a guidance input."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
                guidance: torch.Tensor | None = None, control: Any = None, transformer_options: dict | None = None,
                **kwargs: Any) -> torch.Tensor:
        b, c, h, w = x.shape
        packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)
        img_ids = torch.zeros(h // 2, w // 2, 3, device=x.device, dtype=x.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=x.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=x.device)[None, :]
        txt_ids = torch.zeros(context.shape[1], 3, device=x.device, dtype=x.dtype)
        if not self.transformer.config.guidance_embeds:
            guidance = None
        out = self.transformer(hidden_states=packed, timestep=timestep, guidance=guidance, pooled_projections=y,
                               encoder_hidden_states=context, txt_ids=txt_ids, img_ids=img_ids.reshape(-1, 3),
                               return_dict=False)[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
