"""Fake of ``comfy.samplers`` (v0.3.64): ``KSampler``'s sampler and scheduler names, the sigma schedules and the
prediction a sampler steps with, keeping ComfyUI's contract where the pack relies on it:

- conditioning entries ``[embeds, options]`` become ``apply_model`` inputs through the model's ``extra_conds``
  (options such as SDXL sizes or FLUX guidance included, ``width``/``height`` defaulting to 8x the latent), each
  processed to the batch size; several entries are averaged, as full-area entries are;
- classifier-free guidance is ``uncond + (cond - uncond) * cfg``, or ``x - sampler_cfg_function(args)`` with
  ``args["cond"] = x - cond_denoised`` and ``args["uncond"] = x - uncond_denoised`` when the model options have
  that hook; the run's sigmas are in ``model_options["transformer_options"]["sample_sigmas"]``; at cfg 1 the
  unconditional branch is skipped unless ``disable_cfg1_optimization``;
- the sampler starts from ``noise_scaling(sigma_0, noise, latent)`` and ends in the model's latent space.

Samplers: ``euler`` and ``euler_ancestral`` (the latter draws its noise from the call's ``seed``); schedulers:
``normal`` (evenly spaced timesteps) and ``simple`` (every n-th of the model's sigmas).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import model_sampling as sampling

KSAMPLER_NAMES = ["euler", "euler_ancestral"]
SAMPLER_NAMES = list(KSAMPLER_NAMES)
SCHEDULER_NAMES = ["normal", "simple"]


def calculate_sigmas(model_sampling: Any, scheduler_name: str, steps: int) -> torch.Tensor:
    sigmas = model_sampling.sigmas
    if scheduler_name == "simple":
        stride = len(sigmas) / steps
        out = [float(sigmas[-(1 + int(x * stride))]) for x in range(steps)]
    elif scheduler_name == "normal":
        start = float(model_sampling.timestep(sigmas[-1].reshape(1)).reshape(()))
        end = float(model_sampling.timestep(sigmas[0].reshape(1)).reshape(()))
        timesteps = torch.linspace(start, end, steps)
        out = [float(model_sampling.sigma(t.reshape(1)).reshape(())) for t in timesteps]
    else:
        raise ValueError(f"error invalid scheduler {scheduler_name}")
    return torch.FloatTensor([*out, 0.0])


def noise_scaling(model_sampling: Any, sigma: torch.Tensor, noise: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    if isinstance(model_sampling, sampling.CONST):
        return sigma * noise + (1.0 - sigma) * latent
    return noise * sigma + latent


def _model_inputs(model: Any, entries: list[list[Any]], x: torch.Tensor) -> list[dict[str, Any]]:
    out = []
    for embeds, options in entries:
        params = {"width": x.shape[3] * 8, "height": x.shape[2] * 8, **dict(options), "cross_attn": embeds,
                  "device": x.device, "noise": x}
        conds = model.extra_conds(**params)
        out.append({name: value.process_cond(batch_size=x.shape[0], device=x.device, area=None).cond
                    for name, value in conds.items()})
    return out


def _denoised(model: Any, inputs: list[dict[str, Any]], x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    sigmas = sigma.expand(x.shape[0])
    return sum(model.apply_model(x, sigmas, **kwargs) for kwargs in inputs) / len(inputs)


def cfg_function(model: Any, cond_pred: torch.Tensor, uncond_pred: torch.Tensor, cond_scale: float, x: torch.Tensor,
                 timestep: torch.Tensor, model_options: dict[str, Any]) -> torch.Tensor:
    if "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep,
                "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": model_options}
        return x - model_options["sampler_cfg_function"](args)
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale


class KSampler:
    SCHEDULERS = SCHEDULER_NAMES
    SAMPLERS = SAMPLER_NAMES

    def __init__(self, model: Any, steps: int, device: Any, sampler: str | None = None, scheduler: str | None = None,
                 denoise: float | None = None, model_options: dict | None = None) -> None:
        self.model = model
        self.sampler = sampler if sampler in self.SAMPLERS else self.SAMPLERS[0]
        self.scheduler = scheduler if scheduler in self.SCHEDULERS else self.SCHEDULERS[0]
        self.model_options = dict(model_options or {})
        model_sampling = model.get_model_object("model_sampling")
        if denoise is None or denoise > 0.9999:
            self.sigmas = calculate_sigmas(model_sampling, self.scheduler, steps)
        else:
            self.sigmas = calculate_sigmas(model_sampling, self.scheduler, int(steps / denoise))[-(steps + 1):]

    def sample(self, noise: torch.Tensor, positive: list, negative: list, cfg: float, latent_image: torch.Tensor,
               seed: int | None = None, callback: Any = None, denoise_mask: Any = None) -> torch.Tensor:
        import comfy.model_management

        comfy.model_management.load_models_gpu([self.model])
        base = self.model.model
        model_sampling = self.model.get_model_object("model_sampling")
        sigmas = self.sigmas
        if torch.count_nonzero(latent_image) > 0:
            latent_image = base.latent_format.process_in(latent_image)
        options = dict(self.model_options)
        options["transformer_options"] = {**dict(options.get("transformer_options") or {}), "sample_sigmas": sigmas}
        x = noise_scaling(model_sampling, sigmas[0], noise, latent_image)
        cond_inputs = _model_inputs(base, positive, x)
        uncond_inputs = None
        if not math.isclose(cfg, 1.0) or options.get("disable_cfg1_optimization", False):
            uncond_inputs = _model_inputs(base, negative, x)
        generator = torch.Generator("cpu").manual_seed(int(seed or 0))
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i]
            cond = _denoised(base, cond_inputs, x, sigma)
            if uncond_inputs is None:
                denoised = cond
            else:
                uncond = _denoised(base, uncond_inputs, x, sigma)
                denoised = cfg_function(base, cond, uncond, cfg, x, sigma.expand(x.shape[0]), options)
            if callback is not None:
                callback(i, denoised, x, len(sigmas) - 1)
            if self.sampler == "euler_ancestral" and float(sigmas[i + 1]) > 0:
                down = float(sigmas[i + 1]) ** 2 / float(sigma)
                up = (float(sigmas[i + 1]) ** 2 - down**2) ** 0.5
                x = x + (x - denoised) / sigma * (down - sigma)
                x = x + torch.randn(x.shape, generator=generator) * up
            else:
                x = x + (x - denoised) / sigma * (sigmas[i + 1] - sigma)
        return base.latent_format.process_out(x.float())
