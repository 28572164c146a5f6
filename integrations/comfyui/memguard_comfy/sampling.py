"""ComfyUI's own sampling as memguard's ``Generator``: what lets the guarded KSampler rewrite and verify.

memguard's core owns a request (judge -> act -> conclude); to rewrite a prompt it needs images: the ladder's
candidates, the probes that verify them, the verification calibration and the release. ``ComfySampler`` makes
all of them with ComfyUI's ``comfy.sample.sample`` at the settings of the KSampler call it stands for (seed,
steps, cfg, sampler, scheduler, denoise), so:

- an allowed prompt is sampled exactly as ``KSampler`` samples it (``common_ksampler``: the empty latent widened
  to the model's channels, the noise ``comfy.sample.prepare_noise`` draws from the seed, the latent's noise mask
  and batch indices), which keeps its image bit-identical to the unguarded graph's;
- a rewritten prompt's embeddings go in as a conditioning entry with the caller's options (SDXL sizes, FLUX
  guidance), its initial noise as the sampler's noise, and a guidance schedule through ComfyUI's CFG hook
  (``model_options["sampler_cfg_function"]``, chained to one the model already has);
- internal jobs (probes, calibration) sample empty latents at the call's size from their own noise and a private
  seed; their final latents are read back in the model's space (``latent_format.process_in``).

Nothing here decides anything: which rows to generate, what to verify and what to release is the core's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from guard.actions.generation import GenerationJob, GenerationResult
from guard.actions.guidance import scale_at
from guard.errors import MemguardError
from guard.policy import GuidanceStage
from guard.scoring import TextConditioning

__all__ = ["ComfySampler", "KSamplerSettings", "NoRewriteHere"]

#: Seed of the sampler's own randomness (ancestral and SDE samplers) in internal jobs: fixed, never the caller's.
INTERNAL_SEED = 0


class NoRewriteHere(MemguardError, ValueError):
    """This call's images cannot be rewritten one prompt at a time (the core then takes the rule's fallback)."""


@dataclass(frozen=True)
class KSamplerSettings:
    """A ``KSampler`` call's own settings (``nodes.KSampler``'s inputs besides model, conditionings and latent)."""

    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    denoise: float = 1.0


def _plain_latent(latent: Mapping[str, Any]) -> dict[str, Any]:
    return {key: (value.clone() if isinstance(value, torch.Tensor) else value) for key, value in latent.items()}


class ComfySampler:
    """The guarded KSampler's generation, as the core's ``Generator`` (``guard.actions.generation``).

    Args:
        model: the MODEL (``ModelPatcher``) the caller samples with.
        positive: the caller's positive CONDITIONING (``[[embeds, options], ...]``); its rows are the prompts.
        negative: the caller's negative CONDITIONING.
        latent: the caller's LATENT (``{"samples": ..., "batch_index"?, "noise_mask"?}``).
        settings: the call's seed, steps, cfg, sampler, scheduler and denoise.
        entry_rows: how many prompt rows each positive entry holds (``[1]`` for one ``CLIPTextEncode``).
        clip: the CLIP, for the negative of internal jobs that are not the caller's prompts ("" encoded, as a
            diffusers pipeline's default negative); None: the caller's negative is used for them too.
        family: the model's family (``sd1``, ``sdxl``, ``sd3``, ``flux``, ...), for messages.

    With one prompt (the usual ``CLIPTextEncode`` positive), the call's images are that prompt's
    ``images_per_prompt``. A positive that holds several prompts (``ConditioningCombine``, batched encodes) is
    mixed into every image by ComfyUI's sampler: such a call can be released with some entries left out
    (``batch: drop_blocked``), but not rewritten per prompt (``initial_noise`` raises ``NoRewriteHere``).
    """

    def __init__(
        self,
        model: Any,
        positive: Sequence[Sequence[Any]],
        negative: Sequence[Sequence[Any]],
        latent: Mapping[str, Any],
        settings: KSamplerSettings,
        *,
        entry_rows: Sequence[int],
        clip: Any = None,
        family: str | None = None,
    ) -> None:
        import comfy.sample

        self.model = model
        self.positive = [list(entry) for entry in positive]
        self.negative = [list(entry) for entry in negative]
        self.latent = _plain_latent(latent)
        self.settings = settings
        self.entry_rows = [int(n) for n in entry_rows]
        self.clip = clip
        self.family = family
        self.steps = int(settings.steps)
        self.guidance_scale = float(settings.cfg)
        self.latent_image = comfy.sample.fix_empty_latent_channels(model, self.latent["samples"])
        if self.latent_image.ndim != 4:
            raise NoRewriteHere(f"the guarded sampler samples image latents [B, C, H, W], got {self.latent_image.ndim}"
                                " dimensions")
        self.batch = int(self.latent_image.shape[0])
        self.latent_shape: tuple[int, int, int] = tuple(int(v) for v in self.latent_image.shape[1:])
        #: The conditioning the core judged (one row per prompt), set by the node after ``judge``: jobs whose rows
        #: equal it use the caller's own positive entries (what keeps an allowed image bit-identical).
        self.cond: TextConditioning | None = None
        self._noise: torch.Tensor | None = None
        self._empty_negative: list[list[Any]] | None = None
        #: Sample under ``torch.inference_mode`` (as ComfyUI's executor does) or, where autograd must be able to
        #: mutate saved tensors around the sampler (FLUX rewrites), under ``torch.no_grad``: the same numbers.
        self.inference_mode = True
        self.calls: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ the Generator protocol

    @property
    def prompts(self) -> int:
        return sum(self.entry_rows)

    @property
    def images_per_prompt(self) -> int:
        """The call's images per prompt: all of them for one prompt; 1 for a mixture of several (see the class)."""
        return self.batch if self.prompts == 1 else 1

    @property
    def settings_key(self) -> tuple[str, str, float]:
        """What else this call's images depend on: a verification calibration measured with one sampler and
        scheduler is not used for another (``guard.actions.generation.generation_settings``)."""
        return (str(self.settings.sampler_name), str(self.settings.scheduler), float(self.settings.denoise))

    @property
    def guidance_unavailable(self) -> str | None:
        """Why this call's guidance cannot be scheduled (None when it can)."""
        if self.guidance_scale <= 1.0:
            distilled = " (FLUX.1 is guidance-distilled; it samples with cfg 1)" if self.family == "flux" else ""
            return f"the call's cfg is {self.guidance_scale:g} <= 1: there is no classifier-free guidance to " \
                   f"schedule{distilled}"
        return None

    def initial_noise(self) -> torch.Tensor:
        """The call's own initial noise, as ``KSampler`` draws it from the seed (``comfy.sample.prepare_noise``,
        with the latent's batch indices), float32 on the CPU: ``[images, C, h, w]``."""
        if self.prompts != 1:
            raise NoRewriteHere(
                f"this positive conditioning holds {self.prompts} prompts, which ComfyUI's sampler mixes into every "
                "image, so no prompt can be rewritten on its own; guard each prompt with its own sampler")
        return self._own_noise().float().clone()

    def _own_noise(self) -> torch.Tensor:
        import comfy.sample

        if self._noise is None:
            self._noise = comfy.sample.prepare_noise(self.latent_image, self.settings.seed,
                                                     self.latent.get("batch_index"))
        return self._noise

    def __call__(self, job: GenerationJob) -> GenerationResult:
        release = job.kind == "release"
        if release and (job.cond is None or self._is_own(job.cond, job.prompts)):
            positive_groups = [(list(range(job.rows)), self._caller_positive(job.prompts))]
        else:
            positive_groups = self._job_positive(job)
        per = job.images_per_prompt
        if job.latents is not None:
            noise = job.latents.float().cpu()
        elif release:
            noise = self._own_noise()
        else:
            raise ValueError("an internal job brings its own initial noise")
        if release:
            latent_image, denoise, seed = self.latent_image, self.settings.denoise, self.settings.seed
            negative = self.negative
        else:
            latent_image = torch.zeros((noise.shape[0], *self.latent_shape), dtype=self.latent_image.dtype)
            denoise, seed = 1.0, INTERNAL_SEED
            negative = self.negative if job.prompts is not None else self._internal_negative()
        steps = int(job.steps) if job.steps is not None else self.steps
        whole = len(positive_groups) == 1 and noise.shape[0] == latent_image.shape[0]
        samples_parts: list[torch.Tensor] = []
        order: list[int] = []
        for rows, positive in positive_groups:
            images = list(range(noise.shape[0])) if whole else [r * per + i for r in rows for i in range(per)]
            guidance = {images.index(image): stages for image, stages in job.guidance.items() if image in images}
            part_noise = noise if whole else noise[images]
            part_latent = latent_image if whole else latent_image[images]
            samples_parts.append(self._sample(positive, negative, part_noise, part_latent, steps=steps,
                                              denoise=denoise, seed=seed, guidance=guidance,
                                              caller_latent=release and whole))
            order.extend(images)
        samples = samples_parts[0] if whole else _reorder(torch.cat(samples_parts), order)
        latents = None
        if job.keep_latents:
            latent_format = self.model.get_model_object("latent_format")
            latents = latent_format.process_in(samples.float()).float().cpu().clone()
        output = None
        if release:
            output = dict(self.latent)
            output["samples"] = samples
        return GenerationResult(output=output, latents=latents)

    # ------------------------------------------------------------------ conditionings

    def _is_own(self, cond: TextConditioning, prompts: Sequence[int] | None) -> bool:
        """Whether ``cond`` holds exactly the judged rows of ``prompts`` (nothing rewritten)."""
        if self.cond is None or prompts is None:
            return False
        own = self.cond.select(list(prompts))
        return all(_same(a, b) for a, b in ((cond.embeds, own.embeds), (cond.pooled, own.pooled),
                                            (cond.mask, own.mask)))

    def _entry_of(self, row: int) -> int:
        start = 0
        for entry, size in enumerate(self.entry_rows):
            if row < start + size:
                return entry
            start += size
        raise IndexError(f"prompt row {row} is not in the positive conditioning ({self.prompts} rows)")

    def _caller_positive(self, prompts: Sequence[int] | None) -> list[list[Any]]:
        """The caller's own positive entries whose every row is among ``prompts`` (all of them for None)."""
        if prompts is None:
            return self.positive
        keep = set(prompts)
        out, start = [], 0
        for entry, size in zip(self.positive, self.entry_rows):
            if all(row in keep for row in range(start, start + size)):
                out.append(entry)
            start += size
        if not out:
            raise ValueError(f"no positive entry holds only the prompts {sorted(keep)}")
        return out

    def _options(self, prompt: int | None) -> dict[str, Any]:
        """The conditioning options a row is sampled with: its own entry's (sizes, guidance, areas), or for rows
        that are not the caller's prompts the call's first entry's; the pooled output is the row's own."""
        entry = self.positive[self._entry_of(prompt) if prompt is not None else 0]
        options = dict(entry[1]) if len(entry) > 1 else {}
        options.pop("pooled_output", None)
        return options

    def _job_positive(self, job: GenerationJob) -> list[tuple[list[int], list[list[Any]]]]:
        """One positive per group of rows that ComfyUI can batch (same token length and options): each a single
        entry whose batch holds every image of its rows (row ``k``'s images at ``k * per ...``)."""
        cond, per = job.cond, job.images_per_prompt
        if cond is None:
            raise ValueError("an internal job needs conditioning")
        groups: dict[tuple, list[int]] = {}
        rows: dict[int, tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]] = {}
        for k in range(len(cond)):
            embeds = cond.embeds[k : k + 1]
            if cond.mask is not None:
                embeds = embeds[:, : int(cond.mask[k].sum())]
            pooled = cond.pooled[k : k + 1] if cond.pooled is not None else None
            prompt = job.prompts[k] if job.prompts is not None else None
            rows[k] = (embeds, pooled, self._options(prompt))
            entry = self._entry_of(prompt) if prompt is not None else 0  # rows of one entry share its options
            groups.setdefault((int(embeds.shape[1]), entry), []).append(k)
        out = []
        for members in groups.values():
            embeds = torch.cat([rows[k][0] for k in members]).repeat_interleave(per, dim=0)
            options = dict(rows[members[0]][2])
            if rows[members[0]][1] is not None:
                options["pooled_output"] = torch.cat([rows[k][1] for k in members]).repeat_interleave(per, dim=0)
            out.append((members, [[embeds.detach(), options]]))
        return out

    def _internal_negative(self) -> list[list[Any]]:
        """The negative of rows that are not the caller's prompts: "" through the CLIP (a diffusers pipeline's
        default negative), with the caller's negative options; the caller's negative without a CLIP."""
        if self.clip is None:
            return self.negative
        if self._empty_negative is None:
            embeds, pooled = self.clip.encode_from_tokens(self.clip.tokenize(""), return_pooled=True)
            options = dict(self.negative[0][1]) if self.negative and len(self.negative[0]) > 1 else {}
            options.pop("pooled_output", None)
            if isinstance(pooled, torch.Tensor):
                options["pooled_output"] = pooled
            self._empty_negative = [[embeds, options]]
        return self._empty_negative

    # ------------------------------------------------------------------ one sampler call

    def _sample(
        self, positive: list[list[Any]], negative: list[list[Any]], noise: torch.Tensor, latent_image: torch.Tensor,
        *, steps: int, denoise: float, seed: int, guidance: Mapping[int, Sequence[GuidanceStage]], caller_latent: bool,
    ) -> torch.Tensor:
        """``comfy.sample.sample`` as ``common_ksampler`` calls it; ``caller_latent``: a release on the caller's own
        latent (its noise mask and KSampler's progress previews apply), not a probe or calibration job."""
        import comfy.sample
        import comfy.utils

        model = self.model
        if guidance:
            model = model.clone()
            model.set_model_sampler_cfg_function(
                scheduled_cfg(guidance, model.model_options.get("sampler_cfg_function")))
        callback = _preview_callback(model, steps) if caller_latent else None
        noise_mask = self.latent.get("noise_mask") if caller_latent else None
        self.calls.append({"images": int(noise.shape[0]), "steps": steps, "release": caller_latent,
                           "guidance": sorted(guidance)})
        with torch.inference_mode() if self.inference_mode else torch.no_grad():
            samples = comfy.sample.sample(
                model, noise, steps, self.settings.cfg, self.settings.sampler_name, self.settings.scheduler,
                positive, negative, latent_image, denoise=denoise, noise_mask=noise_mask, callback=callback,
                disable_pbar=not caller_latent or not getattr(comfy.utils, "PROGRESS_BAR_ENABLED", True), seed=seed,
            )
        return samples.clone()  # outside inference mode: an ordinary tensor the core may compute with


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.equal(a.detach().cpu().float(), b.detach().cpu().float())


def _reorder(samples: torch.Tensor, order: Sequence[int]) -> torch.Tensor:
    """Rows of ``samples`` (in ``order``'s image positions) put back in image order."""
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(list(order))] = torch.arange(len(order))
    return samples[inverse]


def _preview_callback(model: Any, steps: int) -> Any:
    """KSampler's progress and preview callback (ComfyUI's ``latent_preview``), where there is one."""
    try:
        import latent_preview
    except ImportError:
        return None
    return latent_preview.prepare_callback(model, steps)


def scheduled_cfg(
    rows: Mapping[int, Sequence[GuidanceStage]], previous: Callable[[dict[str, Any]], torch.Tensor] | None = None,
) -> Callable[[dict[str, Any]], torch.Tensor]:
    """A ``sampler_cfg_function`` under which image ``row`` of the batch follows ``rows[row]``'s guidance stages.

    ComfyUI calls it once per model evaluation with ``cond = x - x0_c`` and ``uncond = x - x0_u`` (and returns
    ``x`` minus the result as the denoised estimate); the call's ``cond_scale`` applies where no stage does. The
    step's position is that of ``sigma`` among the sampler's sigmas (``transformer_options["sample_sigmas"]``),
    as a fraction of the steps, the same measure the diffusers front end uses. ``previous``, a CFG function the
    model already had (e.g. from a rescale node), is kept: it is called with each row's scale.
    """

    def combine(args: dict[str, Any], scale: float) -> torch.Tensor:
        if previous is not None:
            return previous({**args, "cond_scale": scale})
        return args["uncond"] + (args["cond"] - args["uncond"]) * scale

    def cfg(args: dict[str, Any]) -> torch.Tensor:
        default = float(args["cond_scale"])
        fraction = _step_fraction(args)
        scales = [default] * int(args["cond"].shape[0])
        for row, stages in rows.items():
            if row < len(scales) and fraction is not None:
                stage = scale_at(stages, fraction)
                if stage is not None:
                    scales[row] = float(stage)
        if all(math.isclose(s, default) for s in scales):
            return combine(args, default)
        out = None
        for scale in sorted(set(scales)):
            part = combine(args, scale)
            if out is None:
                out = part.clone()
            mask = torch.tensor([s == scale for s in scales], device=part.device)
            out[mask] = part[mask]
        return out

    return cfg


def _step_fraction(args: Mapping[str, Any]) -> float | None:
    """Where this evaluation lies in the sampling run, 0 at the first step (None without the run's sigmas)."""
    options = args.get("model_options") or {}
    sigmas = (options.get("transformer_options") or {}).get("sample_sigmas")
    sigma = args.get("sigma")
    if sigmas is None or sigma is None or len(sigmas) < 2:
        return None
    current = float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)
    levels = sigmas[:-1].float().cpu()
    position = int(torch.argmin((levels - current).abs()))
    return position / len(levels)
