"""The anisotropy memorization score, computed as cheaply as the metric allows (docs/scoring.md).

Per prompt only the two conditional evaluations (at t_hi and t_lo) are new work: the detection
noise and the unconditional branch do not depend on the prompt, so their predictions are computed
once and cached, and many prompts share one batched model call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .adapters import SCORE_SPACES, ModelAdapter, adapter_for
from .conditioning import TextConditioning
from .errors import NonFiniteScoreError
from .noise import DEFAULT_INFERENCE_STEPS, DEFAULT_SEED, detection_noise
from .profiles import ModelProfile, ProfileLike, get_profile
from .result import MemorizationScore
from .settings import DEFAULT_BATCH_SIZE, Measurement

__all__ = ["Scorer", "guidance_statistics", "score_prompts", "validate_prompts"]


def guidance_statistics(
    uncond_hi: torch.Tensor, cond_hi: torch.Tensor, uncond_lo: torch.Tensor, cond_lo: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(norm, cos)`` from predictions at t_hi and t_lo (same space, ``[B, C, H, W]``).

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
        samples: noise draws per prompt (1 is the reference setting; 4 is more accurate). Draw ``k`` is row ``k``
            of one fixed draw, so the first ``k`` draws of any sample count are the same noise.
        seed: seed of the detection noise; independent of any generator of the caller's.
        inference_steps: length of the schedule that t_hi/t_lo are taken from.
        profile: score weights; by default the model family's profile (``sd1``, ``sd2``, ``sdxl``, ...).
        prediction_space: ``"auto"`` (eps for discrete-time models, velocity for flow models), ``"eps"``,
            ``"native"`` (reproduces the reference code for v-prediction models: raw-v cosine, score-space norm;
            velocity for flow models) or ``"velocity"`` (flow models only).
        batch_size: prompts per model call (each prompt costs ``2 * samples`` rows).
    """

    #: How many draws a prompt gets: all ``samples`` (``fixed``) or as many as its decision needs (``adaptive``).
    sampling: str = "fixed"

    def __init__(
        self,
        model: Any,
        *,
        samples: int = 1,
        seed: int = DEFAULT_SEED,
        inference_steps: int = DEFAULT_INFERENCE_STEPS,
        profile: ProfileLike | None = None,
        prediction_space: str = "auto",
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prediction_space not in ("auto", *SCORE_SPACES):
            raise ValueError(
                f"prediction_space must be 'auto', 'eps', 'native' or 'velocity', got {prediction_space!r}"
            )
        self.adapter: ModelAdapter = adapter_for(model)
        self.samples = samples
        self.seed = seed
        self.inference_steps = inference_steps
        self.profile: ModelProfile = get_profile(profile if profile is not None else self.adapter.default_profile)
        self.prediction_space = self.adapter.score_space(prediction_space)
        self.batch_size = batch_size
        self.t_hi, self.t_lo = self.adapter.scoring_timesteps(inference_steps)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def measurement(self) -> Measurement:
        """The settings that tie a score (and a calibration) to this model measured this way."""
        return Measurement(
            fingerprint=self.adapter.fingerprint(),
            model_class=self.adapter.model_class,
            profile=self.profile.name,
            g_norm=self.profile.g_norm,
            g_cos=self.profile.g_cos,
            seed=self.seed,
            samples=self.samples,
            steps=self.inference_steps,
            prediction_space=self.prediction_space,
            sampling=self.sampling,
        )

    def clear_cache(self) -> None:
        """Forget cached unconditional predictions (call after changing the model's weights in place)."""
        self._cache.clear()

    def encode(self, prompts: str | Sequence[str], **encode_kwargs: Any) -> TextConditioning:
        """Text conditioning for ``prompts``, reusable for generation."""
        prompts = validate_prompts(prompts)
        with torch.no_grad():
            return self.adapter.encode(prompts, **encode_kwargs)

    def score(self, prompts: str | Sequence[str], **encode_kwargs: Any) -> list[MemorizationScore]:
        """Score each prompt; results are in input order."""
        prompts = validate_prompts(prompts)
        results: list[MemorizationScore] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            results.extend(self.score_conditioning(self.encode(chunk, **encode_kwargs), chunk))
        return results

    def score_conditioning(
        self, cond: TextConditioning, prompts: Sequence[str | None] | None = None, *, strict: bool = True
    ) -> list[MemorizationScore]:
        """Score precomputed text conditioning (e.g. embeddings the caller also generates with).

        A non-finite score raises ``NonFiniteScoreError``; with ``strict=False`` it is returned as is
        (NaN/inf, with a warning that does not quote the prompt) so that a caller can decide prompt by
        prompt, as the guard does.
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

    def combine(self, norm: Any, cos: Any) -> Any:
        """``g_norm * norm + g_cos * cos`` with this scorer's profile (differentiable)."""
        return self.profile.combine(norm, cos)

    # ------------------------------------------------------------------ the fast path

    def statistics(self, cond: TextConditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-prompt ``(norm, cos)`` on the detection noise as float32 tensors, in one model call.

        Unconditional predictions come from the cache. Differentiable w.r.t. ``cond``: no batching or
        ``no_grad`` here, so that mitigation can back-propagate through it.
        """
        norm, cos = self.sample_statistics(cond, 0, self.samples)
        return norm.mean(dim=1), cos.mean(dim=1)

    def sample_statistics(
        self, cond: TextConditioning, start: int = 0, count: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-prompt, per-draw ``(norm, cos)`` (``[B, count]`` float32) on detection-noise rows
        ``start .. start + count - 1``, in one model call.

        Row ``k`` is the same draw whatever the sample count (one cached draw, sliced), so adding draws to a prompt
        scored on the first ``k`` gives exactly what scoring it on more draws from the start gives. Differentiable
        w.r.t. ``cond``.
        """
        count = self.samples - start if count is None else count
        if start < 0 or count < 1:
            raise ValueError(f"noise rows {start}..{start + count - 1} do not exist")
        adapter = self.adapter
        device, dtype = adapter.device, adapter.dtype
        batch = len(cond)
        noise_all, uncond_hi_all, uncond_lo_all = self._unconditional_predictions(start + count)
        noise32 = noise_all[start : start + count]
        uncond_hi, uncond_lo = uncond_hi_all[start : start + count], uncond_lo_all[start : start + count]
        rows = batch * count
        x32 = noise32.repeat(batch, 1, 1, 1)
        sample = x32.to(dtype)
        timesteps = torch.tensor([self.t_hi] * rows + [self.t_lo] * rows, device=device)
        cond_rows = cond.to(device=device, dtype=dtype).repeat_each(count)
        output = adapter.predict(torch.cat([sample, sample]), timesteps, TextConditioning.cat([cond_rows] * 2))
        raw_hi, raw_lo = output.float().chunk(2)
        norm, cos = guidance_statistics(
            uncond_hi.repeat(batch, 1, 1, 1),
            self.to_space(raw_hi, x32, self.t_hi),
            uncond_lo.repeat(batch, 1, 1, 1),
            self.to_space(raw_lo, x32, self.t_lo),
        )
        norm = norm * self.norm_scale()
        return norm.view(batch, count), cos.view(batch, count)

    def _unconditional_predictions(self, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise and unconditional predictions for at least ``rows`` draws (default ``samples``): one cache entry
        per model and settings serves every sample count, since draw ``k`` does not depend on how many are made."""
        adapter = self.adapter
        device, dtype = adapter.device, adapter.dtype
        needed = max(rows or 0, self.samples)
        key = (adapter.cache_token(), adapter.latent_shape, self.seed, dtype, str(device),
               self.t_hi, self.t_lo, self.prediction_space)
        cached = self._cache.get(key)
        if cached is not None and cached[0].shape[0] >= needed:
            return cached
        noise32 = self.detection_noise(needed)
        with torch.no_grad():
            (uncond_hi, _), (uncond_lo, _) = self.predictions(noise32, adapter.unconditional(), with_conditional=False)
        entry = (noise32, uncond_hi, uncond_lo)
        self._cache[key] = entry
        return entry

    # ------------------------------------------------------------------ public hooks (mitigation, verification)

    def detection_noise(self, count: int | None = None) -> torch.Tensor:
        """The ``samples`` (or ``count``) draws of x_T the score is measured on, float32 on the model's device."""
        return detection_noise(
            self.adapter.latent_shape, samples=count or self.samples, seed=self.seed,
            init_noise_sigma=self.adapter.init_noise_sigma, device=self.adapter.device, dtype=torch.float32,
        )

    def to_space(self, raw: torch.Tensor, sample32: torch.Tensor, timestep: float) -> torch.Tensor:
        """A raw model output at ``timestep`` in this scorer's prediction space (float32)."""
        return self.adapter.to_score_space(raw, sample32, timestep, self.prediction_space)

    def norm_scale(self) -> float:
        """The constant factor on the guidance norm at t_hi in this scorer's space."""
        return self.adapter.norm_scale(self.prediction_space, self.t_hi)

    def predictions(
        self,
        sample32: torch.Tensor,
        cond: TextConditioning,
        timesteps: Sequence[float] | None = None,
        *,
        with_conditional: bool = True,
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """``(unconditional, conditional)`` predictions in this scorer's space for every row of ``sample32``
        at each of ``timesteps`` (default: t_hi and t_lo), in one uncached model call.

        ``cond`` is one row (broadcast) or one row per sample. Differentiable w.r.t. ``sample32`` and
        ``cond``; the unconditional branch is the adapter's own. Where the two branches' token sequences
        differ in length (a T5 family called with its own ``max_sequence_length``, while u keeps the
        default's), each branch gets its own model call.
        """
        adapter = self.adapter
        device, dtype = adapter.device, adapter.dtype
        timesteps = [self.t_hi, self.t_lo] if timesteps is None else list(timesteps)
        rows = sample32.shape[0]
        uncond = adapter.unconditional().to(device=device, dtype=dtype).repeat_each(rows)
        branches = [uncond]
        if with_conditional:
            cond = cond.to(device=device, dtype=dtype)
            branches.append(cond.repeat_each(rows) if len(cond) == 1 else cond)
        together = all(branch.embeds.shape[1:] == uncond.embeds.shape[1:] for branch in branches)
        groups = [list(range(len(branches)))] if together else [[index] for index in range(len(branches))]
        sample = sample32.to(dtype)
        raw: list[list[torch.Tensor]] = [[] for _ in branches]  # per branch, per timestep
        for group in groups:
            text = TextConditioning.cat([branches[i] for i in group] * len(timesteps))
            per_call = rows * len(group)
            labels = torch.tensor([t for t in timesteps for _ in range(per_call)], device=device)
            output = adapter.predict(torch.cat([sample] * (len(group) * len(timesteps))), labels, text).float()
            for step in range(len(timesteps)):
                chunk = output[step * per_call : (step + 1) * per_call]
                for position, branch in enumerate(group):
                    raw[branch].append(chunk[position * rows : (position + 1) * rows])
        out = []
        for step, timestep in enumerate(timesteps):
            uncond_pred = self.to_space(raw[0][step], sample32, timestep)
            cond_pred = self.to_space(raw[1][step], sample32, timestep) if with_conditional else None
            out.append((uncond_pred, cond_pred))
        return out

    def statistics_at(self, sample32: torch.Tensor, cond: TextConditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row ``(norm, cos)`` measured at ``sample32`` instead of the detection noise (uncached)."""
        (uncond_hi, cond_hi), (uncond_lo, cond_lo) = self.predictions(sample32, cond)
        norm, cos = guidance_statistics(uncond_hi, cond_hi, uncond_lo, cond_lo)
        return norm * self.norm_scale(), cos

    # ------------------------------------------------------------------ results

    def _result(
        self, prompt: str | None, norm: float, cos: float, truncated: bool, strict: bool = True,
        samples: int | None = None, warnings: Sequence[str] = (),
    ) -> MemorizationScore:
        score = self.profile.combine(norm, cos)
        warnings = list(warnings)
        if not all(math.isfinite(value) for value in (norm, cos, score)):
            measured = f"norm={norm}, cos={cos} (model {self.adapter.model_class}, dtype {self.adapter.dtype})"
            if strict:
                raise NonFiniteScoreError(f"non-finite memorization score for prompt {prompt!r}: {measured}")
            warnings.append(f"non-finite memorization score: {measured}")
        if truncated:
            warnings.append("prompt longer than the tokenizer's limit: scored (and generated) truncated")
        if prompt == "":
            warnings.append("empty prompt: it is the unconditional prompt itself")
        return MemorizationScore(
            prompt=prompt, norm=norm, cos=cos, score=score, g_norm=self.profile.g_norm, g_cos=self.profile.g_cos,
            profile=self.profile.name, t_hi=self.t_hi, t_lo=self.t_lo, samples=samples or self.samples, seed=self.seed,
            prediction_space=self.prediction_space, truncated=truncated, warnings=tuple(warnings),
            sampling=self.sampling, max_samples=self.samples if self.sampling == "adaptive" else None,
        )


def score_prompts(
    pipe: Any,
    prompts: str | Sequence[str],
    *,
    samples: int = 1,
    seed: int = DEFAULT_SEED,
    inference_steps: int = DEFAULT_INFERENCE_STEPS,
    profile: ProfileLike | None = None,
    prediction_space: str = "auto",
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
