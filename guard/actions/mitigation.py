"""The ``rewrite`` action: change the input of a generation until its memorization score is low (docs/mitigation.md).

Two methods, both driven by memguard's own score so that "mitigated" means what detection means:

* ``prompt_embedding`` (Wen et al. 2024 style): gradient steps on the prompt's text embedding, with the score
  itself as the loss, until it falls to the target; the pipeline then generates from ``prompt_embeds=c*`` with
  the caller's own seed.
* ``initial_noise`` (SAIL, Jeon et al. 2025): gradient steps on a batch of candidate x_T that flatten the
  guidance around them; the first candidates whose score (measured at that noise) meets the target are passed
  to the pipeline as ``latents=``. The prompt is unchanged.

Neither touches the model: gradients are taken only with respect to the optimised input
(``torch.autograd.grad``), so no ``.grad`` accumulates on the UNet and no ``requires_grad`` flag is changed.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..policy import Optimisation
from ..scoring import Scorer, TextConditioning, guidance_statistics

__all__ = [
    "MitigationResult",
    "mitigate_initial_noise",
    "mitigate_prompt_embedding",
    "noise_seed",
]

#: Initial noises the ``initial_noise`` rung optimises side by side (the call's own first).
NOISE_CANDIDATES = 8


@dataclass
class MitigationResult:
    """What one mitigation did; ``to_dict`` (no tensors) goes into the audit record.

    For ``prompt_embedding``, ``cond`` is the adapted conditioning row (float32). For ``initial_noise``,
    ``latents`` is the un-scaled noise for the prompt's images and the scores are measured at the
    generation noise (before: the caller's own noise; after: the noise returned).
    """

    method: str
    score_before: float
    score_after: float
    steps: int
    target: float
    met: bool
    seconds: float
    cond: TextConditioning | None = None
    latents: torch.Tensor | None = None

    def summary(self) -> Optimisation:
        """What the audit record and the decision keep of it (no tensors)."""
        return Optimisation(method=self.method, score_before=self.score_before, score_after=self.score_after,
                            steps=self.steps, target=self.target, met=self.met, seconds=round(self.seconds, 4))


# ---------------------------------------------------------------------------------------------- prompt embedding


def mitigate_prompt_embedding(
    scorer: Scorer,
    cond_row: TextConditioning,
    *,
    target: float,
    max_steps: int = 10,
    lr: float = 0.05,
    proximity: float = 0.0,
) -> MitigationResult:
    """Adapt one prompt's text conditioning until ``scorer``'s score is ``<= target``, or ``max_steps`` run out.

    The embedding is optimised in float32 (the UNet still runs in its own dtype), a CLIP BOS token is left
    alone (it carries no prompt content and dominates CLIP's activations; ``adapter.leading_bos``), and
    ``proximity`` penalises the mean squared distance to the original embedding. Where there is a pooled
    embedding (SDXL, SD3, FLUX) it is optimised with the token embeddings; an attention mask (PixArt) is
    kept. The score is checked before each step, so ``steps`` counts the updates actually needed and
    ``score_after`` is measured, not estimated.
    """
    if len(cond_row) != 1:
        raise ValueError(f"mitigate one prompt at a time, got {len(cond_row)} rows")
    started = time.perf_counter()
    device = scorer.adapter.device
    original = cond_row.detach().to(device=device, dtype=torch.float32)
    embeds = original.embeds.clone().requires_grad_(True)
    pooled = None if original.pooled is None else original.pooled.clone().requires_grad_(True)
    params = [embeds] if pooled is None else [embeds, pooled]
    optimizer = torch.optim.Adam(params, lr=lr)

    score_before = score_now = math.nan
    steps = 0
    with torch.enable_grad():
        while True:
            current = TextConditioning(embeds, pooled, original.mask, list(original.truncated))
            score = scorer.combine(*scorer.statistics(current))[0]
            score_now = float(score.detach())
            if steps == 0:
                score_before = score_now
            if not math.isfinite(score_now) or score_now <= target or steps >= max_steps:
                break
            loss = score
            if proximity > 0.0:
                loss = loss + proximity * F.mse_loss(embeds, original.embeds, reduction="mean")
                if pooled is not None:
                    loss = loss + proximity * F.mse_loss(pooled, original.pooled, reduction="mean")
            grads = torch.autograd.grad(loss, params)
            if scorer.adapter.leading_bos:
                grads[0][:, 0] = 0.0  # CLIP's BOS token (T5-only embeddings, FLUX and PixArt, have none)
            for param, grad in zip(params, grads):
                param.grad = grad
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1

    adapted = TextConditioning(
        embeds.detach(), None if pooled is None else pooled.detach(), original.mask, list(original.truncated)
    )
    return MitigationResult(
        method="prompt_embedding",
        score_before=score_before,
        score_after=score_now,
        steps=steps,
        target=float(target),
        met=math.isfinite(score_now) and score_now <= target,
        seconds=time.perf_counter() - started,
        cond=adapted,
    )


# ---------------------------------------------------------------------------------------------- initial noise


def _default_lam(scorer: Scorer) -> float:
    """SAIL's Gaussianity weights: 0.05 for epsilon models (SD 1), 0.01 for v-prediction (SD 2)."""
    return 0.01 if scorer.adapter.prediction_type == "v_prediction" else 0.05


def mitigate_initial_noise(
    scorer: Scorer,
    cond_row: TextConditioning,
    latents: torch.Tensor,
    *,
    target: float,
    max_steps: int = 10,
    lr: float = 0.05,
    lam: float | None = None,
    candidates: int = NOISE_CANDIDATES,
    threshold: float | None = None,
    seed: int = 0,
) -> MitigationResult:
    """Find initial noise for one prompt's images at which its memorization score is ``<= target`` (SAIL).

    ``latents`` is the prompt's own un-scaled noise (``[n, C, h, w]``, n = images per prompt, at the
    generation's latent size); it heads a batch of ``max(candidates, n)`` candidates, the rest drawn from
    ``seed``. Each step minimises ``||eps_c(x + d) - eps_u(x + d)|| + lam * ||x||`` at ``t_hi``, d being the
    unit guidance direction at x (detached), which flattens the sharp, memorized basin around x. A candidate
    is accepted once its memguard score, measured at x itself, is ``<= target`` (and, with ``threshold``,
    once its SAIL loss is under it); the first n accepted are returned. If fewer are found, the n
    lowest-scoring candidates come back with ``met=False``.

    The norm is rescaled to the model's native latent size (``sqrt(native / generation)`` elements), so the
    target keeps its meaning when the caller asks for another resolution.
    """
    if len(cond_row) != 1:
        raise ValueError(f"mitigate one prompt at a time, got {len(cond_row)} rows")
    if latents.ndim != 4:
        raise ValueError(f"latents must be [images, C, H, W], got shape {tuple(latents.shape)}")
    started = time.perf_counter()
    adapter = scorer.adapter
    device = adapter.device
    lam = _default_lam(scorer) if lam is None else lam
    wanted = latents.shape[0]
    total = max(candidates, wanted)
    own = latents.detach().to(device=device, dtype=torch.float32)
    extra_generator = torch.Generator("cpu").manual_seed(seed)
    extra = torch.randn((total - wanted, *own.shape[1:]), generator=extra_generator, dtype=torch.float32)
    x = torch.cat([own, extra.to(device)]).requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    cond_row = cond_row.detach()
    sigma = float(adapter.init_noise_sigma)
    native = math.prod(adapter.latent_shape)
    norm_scale = scorer.norm_scale() * math.sqrt(native / own[0].numel())

    accepted: list[int] = []
    snapshots: dict[int, tuple[torch.Tensor, float]] = {}
    score_before = math.nan
    steps = 0
    scores = torch.full((total,), math.inf)
    while True:
        with torch.no_grad():
            (uncond_hi, cond_hi), (uncond_lo, cond_lo) = scorer.predictions(x.detach() * sigma, cond_row)
            norm, cos = guidance_statistics(uncond_hi, cond_hi, uncond_lo, cond_lo)
            scores = scorer.combine(norm * norm_scale, cos).cpu()
            guidance = cond_hi - uncond_hi
            direction = guidance / guidance.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        if steps == 0:
            score_before = float(scores[:wanted].mean())
        last = steps >= max_steps
        sail_loss = None
        if threshold is not None or not last:
            with torch.enable_grad():
                ((uncond_moved, cond_moved),) = scorer.predictions((x + direction) * sigma, cond_row, [scorer.t_hi])
                sharpness = (cond_moved - uncond_moved).flatten(1).norm(dim=1)
                sail_loss = sharpness + lam * x.flatten(1).norm(dim=1)
        ok = scores <= target
        if threshold is not None:
            ok &= sail_loss.detach().cpu() <= threshold
        for index in torch.nonzero(ok).flatten().tolist():
            if index not in snapshots:
                accepted.append(index)
                snapshots[index] = (x.detach()[index].clone(), float(scores[index]))
        if len(accepted) >= wanted or last:
            break
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(sail_loss.sum(), [x])
        x.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1

    chosen = [snapshots[i] for i in accepted[:wanted]]
    if len(chosen) < wanted:
        rest = [i for i in torch.argsort(scores).tolist() if i not in snapshots]
        chosen += [(x.detach()[i].clone(), float(scores[i])) for i in rest[: wanted - len(chosen)]]
    met = len(accepted) >= wanted
    return MitigationResult(
        method="initial_noise",
        score_before=score_before,
        score_after=sum(score for _, score in chosen) / wanted,
        steps=steps,
        target=float(target),
        met=met,
        seconds=time.perf_counter() - started,
        latents=torch.stack([latent for latent, _ in chosen]),
    )


# ---------------------------------------------------------------------------------------------- the Guard's hook


def noise_seed(latents: torch.Tensor) -> int:
    """A seed for extra SAIL candidates that follows the caller's noise: same call, same result."""
    digest = hashlib.sha256(latents.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
