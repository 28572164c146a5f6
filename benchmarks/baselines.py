"""Baseline detectors, written the way their reference code runs them, for side-by-side benchmarks.

- ``reference_style_scores``: the anisotropy score as the reference implementation computes it:
  one prompt at a time, two UNet calls of batch 2 (uncond + cond) per noise sample, no cache.
- ``first_step_norms``: Wen et al. 2024's detector, one batch-2 call at t_hi per sample.
- ``sharpness_scores``: Jeon et al.'s Hessian-sharpness detector: one Jacobian-vector product of the
  conditional-minus-unconditional prediction along that difference at t_hi (``torch.func.jvp``).

All take the detection noise, timesteps and embeddings from the same conventions as memguard, so the
numbers are directly comparable; only the way they are computed differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from guard.scoring import Scorer


def _context(scorer: Scorer, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    cond = scorer.adapter.encode([prompt]).embeds
    uncond = scorer.adapter.unconditional().embeds
    return cond, uncond


def _noise(scorer: Scorer) -> torch.Tensor:
    from guard.scoring import detection_noise

    adapter = scorer.adapter
    return detection_noise(
        adapter.latent_shape, samples=scorer.samples, seed=scorer.seed, device=adapter.device, dtype=adapter.dtype
    )


def _uncond_and_cond(unet, x: torch.Tensor, timestep: int, context: torch.Tensor):
    """One UNet call of batch 2 (unconditional, conditional) on one noise sample, as the reference does."""
    return unet(x.repeat(2, 1, 1, 1), timestep, encoder_hidden_states=context)[0].float().chunk(2)


@torch.no_grad()
def reference_style_scores(scorer: Scorer, prompts: list[str]) -> list[tuple[float, float, float]]:
    """``(norm, cos, score)`` per prompt, computed like the reference code (epsilon models)."""
    unet = scorer.adapter.unet
    noise = _noise(scorer)
    results = []
    for prompt in prompts:
        cond, uncond = _context(scorer, prompt)
        context = torch.cat([uncond, cond])
        norms, coses = [], []
        for i in range(scorer.samples):
            eps_u, eps_c = _uncond_and_cond(unet, noise[i : i + 1], scorer.t_hi, context)
            norms.append((eps_c - eps_u).flatten().norm().item())
            eps_u, eps_c = _uncond_and_cond(unet, noise[i : i + 1], scorer.t_lo, context)
            coses.append(F.cosine_similarity(eps_u, eps_c - eps_u, dim=1).mean().item())
        norm, cos = sum(norms) / len(norms), sum(coses) / len(coses)
        results.append((norm, cos, scorer.profile.g_norm * norm + scorer.profile.g_cos * cos))
    return results


@torch.no_grad()
def first_step_norms(scorer: Scorer, prompts: list[str]) -> list[float]:
    """Wen et al.'s first-step guidance norm, one batch-2 UNet call per prompt and sample."""
    unet = scorer.adapter.unet
    noise = _noise(scorer)
    results = []
    for prompt in prompts:
        cond, uncond = _context(scorer, prompt)
        context = torch.cat([uncond, cond])
        norms = []
        for i in range(scorer.samples):
            eps_u, eps_c = _uncond_and_cond(unet, noise[i : i + 1], scorer.t_hi, context)
            norms.append((eps_c - eps_u).flatten().norm().item())
        results.append(sum(norms) / len(norms))
    return results


def sharpness_scores(scorer: Scorer, prompts: list[str]) -> list[float]:
    """Jeon et al.'s sharpness: ``|| J_d(x_T) d(x_T) ||`` with ``d = eps_c - eps_u`` at t_hi.

    Forward-mode AD is not implemented for the CPU flash-attention kernel, so the UNet is switched
    to classic attention for this baseline (same numbers, slower).
    """
    from diffusers.models.attention_processor import AttnProcessor

    unet = scorer.adapter.unet
    unet.set_attn_processor(AttnProcessor())
    noise = _noise(scorer)
    timestep = torch.tensor([scorer.t_hi, scorer.t_hi], device=noise.device)
    results = []
    for prompt in prompts:
        cond, uncond = _context(scorer, prompt)
        context = torch.cat([uncond, cond])

        def difference(x: torch.Tensor, context: torch.Tensor = context) -> torch.Tensor:
            eps_u, eps_c = unet(x.repeat(2, 1, 1, 1), timestep, encoder_hidden_states=context)[0].chunk(2)
            return eps_c - eps_u

        values = []
        for i in range(scorer.samples):
            x = noise[i : i + 1]
            with torch.no_grad():
                direction = difference(x)
            _, jvp = torch.func.jvp(difference, (x,), (direction,))
            values.append(jvp.float().flatten().norm().item())
        results.append(sum(values) / len(values))
    return results
