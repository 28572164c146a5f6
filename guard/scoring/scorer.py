"""The anisotropy memorization score (DESIGN.md §1), computed as cheaply as the metric allows (§2).

Per prompt only the two conditional evaluations (at t_hi and t_lo) are new work: the detection
noise and the unconditional branch do not depend on the prompt, so their predictions are computed
once and cached, and many prompts share one batched UNet call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .adapters import ModelAdapter, adapter_for
from .conditioning import TextConditioning
from .errors import NonFiniteScoreError
from .noise import DEFAULT_INFERENCE_STEPS, DEFAULT_SEED, detection_noise
from .profiles import ModelProfile, ProfileLike, get_profile
from .result import MemorizationScore

PredictionSpace = Literal["eps", "native"]


def guidance_statistics(
    uncond_hi: torch.Tensor, cond_hi: torch.Tensor, uncond_lo: torch.Tensor, cond_lo: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(norm, cos)`` of DESIGN.md §1 from predictions at t_hi and t_lo (same space, ``[B, C, H, W]``).

    ``norm`` is the guidance vector's L2 norm at t_hi; ``cos`` the cosine between the unconditional
    prediction and the guidance vector along the channels at t_lo, averaged over pixels.
    """
    norm = (cond_hi - uncond_hi).flatten(1).norm(dim=1)
    cos = F.cosine_similarity(uncond_lo, cond_lo - uncond_lo, dim=1).flatten(1).mean(dim=1)
    return norm, cos


def validate_prompts(prompts: str | Sequence[str]) -> list[str]:
    """Prompts as a list of strings, or a clear error saying which entry is wrong."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a string or a sequence of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt to score")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{index}] must be a string, got {type(prompt).__name__}: {prompt!r}")
    return prompts


class Scorer:
    """Scores prompts for one model with fixed settings; holds the cache of unconditional predictions.

    Args:
        model: a diffusers text-to-image pipeline, or a ``ModelAdapter``.
        samples: noise draws per prompt (1 is the reference setting; 4 is more accurate).
        seed: seed of the detection noise; independent of any generator of the caller's.
        inference_steps: length of the DDIM schedule that t_hi/t_lo are taken from.
        profile: score weights; by default the model family's profile (``sd1``, ``sd2``, ``sdxl``).
        prediction_space: ``"eps"`` (model-agnostic) or ``"native"`` (reproduces the reference code
            for v-prediction models: raw-v cosine, score-space norm).
        batch_size: prompts per UNet call (each prompt costs ``2 * samples`` rows).
    """

    def __init__(
        self,
        model: Any,
        *,
        samples: int = 1,
        seed: int = DEFAULT_SEED,
        inference_steps: int = DEFAULT_INFERENCE_STEPS,
        profile: ProfileLike | None = None,
        prediction_space: PredictionSpace = "eps",
        batch_size: int = 16,
    ) -> None:
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prediction_space not in ("eps", "native"):
            raise ValueError(f"prediction_space must be 'eps' or 'native', got {prediction_space!r}")
        self.adapter: ModelAdapter = adapter_for(model)
        self.samples = samples
        self.seed = seed
        self.inference_steps = inference_steps
        self.profile: ModelProfile = get_profile(profile if profile is not None else self.adapter.default_profile)
        self.prediction_space = prediction_space
        self.batch_size = batch_size
        self.t_hi, self.t_lo = self.adapter.timesteps(inference_steps)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def clear_cache(self) -> None:
        """Forget cached unconditional predictions (call after changing the model's weights in place)."""
        self._cache.clear()

    def encode(self, prompts: str | Sequence[str], **encode_kwargs: Any) -> TextConditioning:
        """Text conditioning for ``prompts``, reusable for generation (``prompt_embeds=``)."""
        prompts = validate_prompts(prompts)
        return self.adapter.encode(prompts, **encode_kwargs)

    def score(self, prompts: str | Sequence[str], **encode_kwargs: Any) -> list[MemorizationScore]:
        """Score each prompt; results are in input order."""
        prompts = validate_prompts(prompts)
        results: list[MemorizationScore] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            with torch.no_grad():
                cond = self.adapter.encode(chunk, **encode_kwargs)
            results.extend(self.score_conditioning(cond, chunk))
        return results

    def score_conditioning(
        self, cond: TextConditioning, prompts: Sequence[str | None] | None = None, *, strict: bool = True
    ) -> list[MemorizationScore]:
        """Score precomputed text conditioning (e.g. embeddings the caller also generates with).

        A non-finite score raises ``NonFiniteScoreError``; with ``strict=False`` it is returned as is
        (NaN/inf, with a warning) so that a caller can decide prompt by prompt, as the Guard does.
        """
        prompts = list(prompts) if prompts is not None else [None] * len(cond)
        if len(prompts) != len(cond):
            raise ValueError(f"got {len(prompts)} prompts for {len(cond)} embeddings")
        norms, cosines = [], []
        with torch.no_grad():
            for start in range(0, len(cond), self.batch_size):
                norm, cos = self.statistics(cond.select(slice(start, start + self.batch_size)))
                norms.append(norm)
                cosines.append(cos)
        norm_all, cos_all = torch.cat(norms).tolist(), torch.cat(cosines).tolist()
        return [
            self._result(prompt, norm, cos, truncated, strict)
            for prompt, norm, cos, truncated in zip(prompts, norm_all, cos_all, cond.truncated)
        ]

    def combine(self, norm: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        """``g_norm * norm + g_cos * cos`` with this scorer's profile (differentiable)."""
        return self.profile.g_norm * norm + self.profile.g_cos * cos

    def statistics(self, cond: TextConditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-prompt ``(norm, cos)`` as float32 tensors, in one UNet call, differentiable w.r.t. ``cond``.

        No batching or ``no_grad`` here: mitigation back-propagates through this.
        """
        adapter = self.adapter
        device, dtype = adapter.device, adapter.dtype
        batch, samples = len(cond), self.samples
        noise, noise32, uncond_hi, uncond_lo = self._unconditional_predictions()
        rows = batch * samples
        sample = noise.repeat(batch, 1, 1, 1)
        timesteps = torch.tensor([self.t_hi] * rows + [self.t_lo] * rows, device=device)
        cond_rows = cond.to(device=device, dtype=dtype).repeat_each(samples)
        output = adapter.predict(torch.cat([sample, sample]), timesteps, TextConditioning.cat([cond_rows] * 2))
        raw_hi, raw_lo = output.float().chunk(2)
        x32 = noise32.repeat(batch, 1, 1, 1)
        norm, cos = guidance_statistics(
            uncond_hi.repeat(batch, 1, 1, 1),
            self._to_space(raw_hi, x32, self.t_hi),
            uncond_lo.repeat(batch, 1, 1, 1),
            self._to_space(raw_lo, x32, self.t_lo),
        )
        norm = norm * self._norm_scale()
        return norm.view(batch, samples).mean(dim=1), cos.view(batch, samples).mean(dim=1)

    def _unconditional_predictions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        adapter = self.adapter
        device, dtype = adapter.device, adapter.dtype
        key = (adapter.cache_token(), adapter.latent_shape, self.seed, self.samples, dtype, str(device),
               self.t_hi, self.t_lo, self.prediction_space)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        noise32 = detection_noise(
            adapter.latent_shape, samples=self.samples, seed=self.seed,
            init_noise_sigma=adapter.init_noise_sigma, device=device, dtype=torch.float32,
        )
        noise = noise32.to(dtype)
        with torch.no_grad():
            uncond = adapter.unconditional().to(device=device, dtype=dtype)
            rows = self.samples
            timesteps = torch.tensor([self.t_hi] * rows + [self.t_lo] * rows, device=device)
            output = adapter.predict(torch.cat([noise, noise]), timesteps, uncond.repeat_each(2 * rows))
        raw_hi, raw_lo = output.float().chunk(2)
        entry = (noise, noise32, self._to_space(raw_hi, noise32, self.t_hi), self._to_space(raw_lo, noise32, self.t_lo))
        self._cache[key] = entry
        return entry

    def _alpha_bar(self, timestep: int) -> float:
        return float(self.adapter.alphas_cumprod()[timestep])

    def _to_space(self, raw: torch.Tensor, x: torch.Tensor, timestep: int) -> torch.Tensor:
        if self.adapter.prediction_type == "epsilon" or self.prediction_space == "native":
            return raw
        alpha_bar = self._alpha_bar(timestep)
        return math.sqrt(alpha_bar) * raw + math.sqrt(1.0 - alpha_bar) * x

    def _norm_scale(self) -> float:
        """The reference's score-space factor for v-prediction models in ``native`` space."""
        if self.adapter.prediction_type == "v_prediction" and self.prediction_space == "native":
            alpha_bar = self._alpha_bar(self.t_hi)
            return math.sqrt(alpha_bar) / (1.0 - alpha_bar)
        return 1.0

    def _result(
        self, prompt: str | None, norm: float, cos: float, truncated: bool, strict: bool = True
    ) -> MemorizationScore:
        score = self.profile.g_norm * norm + self.profile.g_cos * cos
        warnings: list[str] = []
        if not all(math.isfinite(value) for value in (norm, cos, score)):
            problem = (
                f"non-finite memorization score for prompt {prompt!r}: norm={norm}, cos={cos} "
                f"(model {self.adapter.model_class}, dtype {self.adapter.dtype})"
            )
            if strict:
                raise NonFiniteScoreError(problem)
            warnings.append(problem)
        if truncated:
            warnings.append("prompt longer than the tokenizer's limit: scored (and generated) truncated")
        if prompt == "":
            warnings.append("empty prompt: it is the unconditional prompt itself")
        return MemorizationScore(
            prompt=prompt, norm=norm, cos=cos, score=score, g_norm=self.profile.g_norm, g_cos=self.profile.g_cos,
            profile=self.profile.name, t_hi=self.t_hi, t_lo=self.t_lo, samples=self.samples, seed=self.seed,
            prediction_space=self.prediction_space, truncated=truncated, warnings=tuple(warnings),
        )


def score_prompts(
    pipe: Any,
    prompts: str | Sequence[str],
    *,
    samples: int = 1,
    seed: int = DEFAULT_SEED,
    inference_steps: int = DEFAULT_INFERENCE_STEPS,
    profile: ProfileLike | None = None,
    prediction_space: PredictionSpace = "eps",
    batch_size: int = 16,
) -> list[MemorizationScore]:
    """Memorization scores of ``prompts`` on ``pipe``, before any denoising.

    >>> scores = score_prompts(pipe, ["a photo of a cat", "the starry night by van gogh"])
    >>> scores[1].score
    """
    scorer = Scorer(
        pipe, samples=samples, seed=seed, inference_steps=inference_steps, profile=profile,
        prediction_space=prediction_space, batch_size=batch_size,
    )
    return scorer.score(prompts)
