"""Baseline detectors, written the way their reference code runs them, for side-by-side benchmarks.

- ``reference_style_scores``: the anisotropy score as the reference implementation computes it:
  one prompt at a time, two UNet calls of batch 2 (uncond + cond) per noise sample, no cache.
- ``first_step_norms``: Wen et al. 2024's detector, one batch-2 call at t_hi per sample.
- ``sharpness_scores``: Jeon et al.'s Hessian-sharpness detector: one Jacobian-vector product of the
  conditional-minus-unconditional prediction along that difference at t_hi (``torch.func.jvp``).

All take the detection noise, timesteps and embeddings from the same conventions as memguard, so the
numbers are directly comparable; only the way they are computed differs. The two detectors go through the
model adapter (``predict``, ``to_score_space``), so they run on every family memguard scores: for rectified-flow
models (SD3, FLUX) the first-step norm is the velocity-guidance norm at the first step, s = sigmas[0].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from guard.scoring import Scorer, TextConditioning


def _context(scorer: Scorer, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    cond = scorer.adapter.encode([prompt]).embeds
    uncond = scorer.adapter.unconditional().embeds
    return cond, uncond


def _noise(scorer: Scorer) -> torch.Tensor:
    """The scorer's detection noise (scaled by ``init_noise_sigma``) in the model's dtype."""
    return scorer.detection_noise().to(scorer.adapter.dtype)


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


def _branches(scorer: Scorer, prompt: str) -> TextConditioning:
    """``[u, c]``: the adapter's unconditional branch and the prompt's conditioning, one batch of 2."""
    adapter = scorer.adapter
    return TextConditioning.cat([adapter.unconditional(), adapter.encode([prompt])]).to(adapter.device, adapter.dtype)


def _guidance_at_t_hi(scorer: Scorer, x: torch.Tensor, text: TextConditioning) -> torch.Tensor:
    """``f_c - f_u`` at t_hi in the scorer's space, from one batch-2 model call on one noise sample."""
    adapter = scorer.adapter
    timesteps = torch.tensor([scorer.t_hi, scorer.t_hi], device=x.device)
    raw = adapter.predict(x.repeat(2, 1, 1, 1), timesteps, text).float()
    x32 = x.float().repeat(2, 1, 1, 1)
    uncond, cond = scorer.to_space(raw, x32, scorer.t_hi).chunk(2)
    return cond - uncond


@torch.no_grad()
def first_step_norms(scorer: Scorer, prompts: list[str]) -> list[float]:
    """Wen et al.'s first-step guidance norm, one batch-2 model call per prompt and sample (any family)."""
    noise = _noise(scorer)
    results = []
    for prompt in prompts:
        text = _branches(scorer, prompt)
        norms = [_guidance_at_t_hi(scorer, noise[i : i + 1], text).flatten().norm().item()
                 for i in range(scorer.samples)]
        results.append(sum(norms) / len(norms) * scorer.norm_scale())
    return results


def sharpness_scores(scorer: Scorer, prompts: list[str]) -> list[float]:
    """Jeon et al.'s sharpness: ``|| J_d(x_T) d(x_T) ||`` with ``d = f_c - f_u`` at t_hi (any family).

    Forward-mode AD is not implemented for the CPU flash-attention kernel, so attention runs on PyTorch's
    math backend for this baseline (same numbers, slower).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    noise = _noise(scorer)
    results = []
    for prompt in prompts:
        with torch.no_grad():
            text = _branches(scorer, prompt)
        values = []
        for i in range(scorer.samples):
            x = noise[i : i + 1]

            def difference(x: torch.Tensor, text: TextConditioning = text) -> torch.Tensor:
                return _guidance_at_t_hi(scorer, x, text)

            with sdpa_kernel(SDPBackend.MATH):
                with torch.no_grad():
                    direction = difference(x).to(x.dtype)
                _, jvp = torch.func.jvp(difference, (x,), (direction,))
            values.append(jvp.float().flatten().norm().item())
        results.append(sum(values) / len(values))
    return results
