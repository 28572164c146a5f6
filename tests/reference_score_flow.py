"""A plain, obviously-correct implementation of docs/scoring.md (SD3 / SD3.5, FLUX.1, PixArt-alpha / -Sigma).

One prompt, one noise sample at a time; the conditional and the unconditional branch each get their own
transformer call; no cache, no batching; the scheduler is set up the way the pipeline's ``__call__`` sets it.
It uses diffusers directly and nothing of ``guard``: the fast path must match it.
"""

import copy
import inspect

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, FluxPipeline, PixArtAlphaPipeline, StableDiffusion3Pipeline

#: docs/scoring.md: the encoders' max_sequence_length each pipeline's __call__ uses by default.
MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512, "pixart-alpha": 120, "pixart-sigma": 300}


def family(pipe):
    if isinstance(pipe, StableDiffusion3Pipeline):
        return "sd3"
    if isinstance(pipe, FluxPipeline):
        return "flux"
    return "pixart-alpha" if isinstance(pipe, PixArtAlphaPipeline) else "pixart-sigma"


def call_default(pipe, name):
    return inspect.signature(pipe.__call__).parameters[name].default


def shift_mu(image_seq_len, config, max_shift_default):
    """diffusers' ``calculate_shift``: mu linear in the image sequence length."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", max_shift_default)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def sd3_setup(pipe, prompt, steps):
    height = width = pipe.default_sample_size * pipe.vae_scale_factor
    shape = (pipe.transformer.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    scheduler = copy.deepcopy(pipe.scheduler)
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", None):
        patch = pipe.transformer.config.patch_size
        kwargs["mu"] = shift_mu((shape[1] // patch) * (shape[2] // patch), scheduler.config, 1.16)
    scheduler.set_timesteps(steps, device="cpu", **kwargs)
    assert len(scheduler.sigmas) == steps + 1 and float(scheduler.sigmas[-1]) == 0.0
    labels = [scheduler.timesteps[0], scheduler.timesteps[steps - 3]]
    assert [float(t) for t in labels] == [float(scheduler.sigmas[k] * 1000) for k in (0, steps - 3)]
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompt, None, None, device="cpu", do_classifier_free_guidance=True,
        max_sequence_length=MAX_SEQUENCE_LENGTH["sd3"],
    )

    def model(x, label, branch):
        embeds, pooled_embeds = (cond, pooled) if branch == "cond" else (uncond, uncond_pooled)
        return pipe.transformer(
            hidden_states=x, timestep=label.expand(x.shape[0]), encoder_hidden_states=embeds,
            pooled_projections=pooled_embeds,
        ).sample

    return shape, [float(t) for t in labels], labels, model


def flux_setup(pipe, prompt, steps):
    scale = pipe.vae_scale_factor
    height = width = pipe.default_sample_size * scale
    latent_h, latent_w = 2 * (height // (scale * 2)), 2 * (width // (scale * 2))
    shape = (pipe.transformer.config.in_channels // 4, latent_h, latent_w)
    scheduler = copy.deepcopy(pipe.scheduler)
    assert not scheduler.config.get("use_flow_sigmas", False)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = shift_mu((latent_h // 2) * (latent_w // 2), scheduler.config, 1.15)
    scheduler.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)
    dtype = pipe.text_encoder_2.dtype
    labels = [scheduler.timesteps[k].expand(1).to(dtype) / 1000 for k in (0, steps - 3)]
    max_length = MAX_SEQUENCE_LENGTH["flux"]
    cond, pooled, text_ids = pipe.encode_prompt(prompt, None, device="cpu", max_sequence_length=max_length)
    uncond, uncond_pooled, uncond_text_ids = pipe.encode_prompt("", None, device="cpu", max_sequence_length=max_length)
    image_ids = pipe._prepare_latent_image_ids(1, latent_h // 2, latent_w // 2, "cpu", dtype)
    guidance = None
    if pipe.transformer.config.guidance_embeds:
        guidance = torch.full([1], call_default(pipe, "guidance_scale"), dtype=torch.float32)

    def model(x, label, branch):
        embeds, pooled_embeds, ids = (
            (cond, pooled, text_ids) if branch == "cond" else (uncond, uncond_pooled, uncond_text_ids)
        )
        packed = pipe._pack_latents(x, 1, shape[0], latent_h, latent_w)
        out = pipe.transformer(
            hidden_states=packed, timestep=label, guidance=guidance, pooled_projections=pooled_embeds,
            encoder_hidden_states=embeds, txt_ids=ids, img_ids=image_ids,
        ).sample
        return pipe._unpack_latents(out, height, width, scale)

    return shape, [float(t) for t in labels], labels, model


def pixart_setup(pipe, prompt, steps):
    kind = family(pipe)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    labels = [scheduler.timesteps[0], scheduler.timesteps[-3]]
    config = pipe.transformer.config
    shape = (config.in_channels, config.sample_size, config.sample_size)
    cond, cond_mask, uncond, uncond_mask = pipe.encode_prompt(
        prompt, do_classifier_free_guidance=True, negative_prompt="", device="cpu", clean_caption=True,
        max_sequence_length=MAX_SEQUENCE_LENGTH[kind],
    )
    added = {"resolution": None, "aspect_ratio": None}
    if kind == "pixart-alpha" and config.sample_size == 128:
        native = config.sample_size * pipe.vae_scale_factor
        added = {"resolution": torch.tensor([[native, native]], dtype=cond.dtype),
                 "aspect_ratio": torch.tensor([[1.0]], dtype=cond.dtype)}

    def model(x, label, branch):
        embeds, mask = (cond, cond_mask) if branch == "cond" else (uncond, uncond_mask)
        out = pipe.transformer(
            x, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=label.expand(x.shape[0]),
            added_cond_kwargs=added,
        ).sample
        return out[:, : config.in_channels]

    return shape, [int(t) for t in labels], labels, model


def reference_score_flow(pipe, prompt, *, samples=1, seed=51, steps=50, weights=(1.0, 1.0)):
    """``(norm, cos, score, (t_hi, t_lo))`` of ``prompt``, the timesteps as the labels the model gets."""
    kind = family(pipe)
    assert call_default(pipe, "max_sequence_length") == MAX_SEQUENCE_LENGTH[kind]
    setup = {"sd3": sd3_setup, "flux": flux_setup}.get(kind, pixart_setup)
    with torch.no_grad():
        shape, label_values, labels, model = setup(pipe, prompt, steps)
        noise = torch.randn((samples, *shape), generator=torch.Generator("cpu").manual_seed(seed))
        norms, cosines = [], []
        for i in range(samples):
            x = noise[i : i + 1].to(pipe.transformer.dtype)
            u_hi, c_hi = (model(x, labels[0], branch).float() for branch in ("uncond", "cond"))
            u_lo, c_lo = (model(x, labels[1], branch).float() for branch in ("uncond", "cond"))
            norms.append((c_hi - u_hi).flatten().norm().item())
            cosines.append(F.cosine_similarity(u_lo, c_lo - u_lo, dim=1).mean().item())
    norm, cos = sum(norms) / samples, sum(cosines) / samples
    return norm, cos, weights[0] * norm + weights[1] * cos, tuple(label_values)
