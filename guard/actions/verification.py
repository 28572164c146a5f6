"""Verifying that a rewritten generation left the memorized basin, before it is released.

Meeting a score target on the optimised input is a proxy: on models that memorize strongly, the
trajectory can still fall into the training image. What the user cares about is the image, so it is checked
after generation, with nothing but the model: ``probes`` short generations of the *original* prompt from
fixed probe seeds show what the model draws for it (for a memorized prompt, the copy, from any seed). The
signal ``probe_similarity`` is the released latent's largest cosine to those probes. Ordinary prompts' own
generations reach a known level against their probes (``VerificationCalibration``); a rewritten image above
the calibrated quantile is still a copy and is not released. Similarity is absolute cosine: a latent pushed
towards the negative of the copy is not counted as escaped.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from ..calibration import VerificationCalibration, calibration_cache_dir
from ..events import log_event
from ..policy import GuidanceStage, VerifySettings
from ..scoring import Scorer, TextConditioning

__all__ = [
    "Generate",
    "GenerationRequest",
    "GenerationResult",
    "auto_verification",
    "measure_verification",
    "probe_noise",
    "probe_similarity",
    "run_probes",
]

#: Probe noise is drawn from ``seed + PROBE_SEED_OFFSET``: fixed, and independent of the caller's noise.
PROBE_SEED_OFFSET = 1_000_003
#: Generations of ordinary prompts for verification calibration use seeds from here on.
NULL_SEED_OFFSET = 2_000_003


@dataclass(frozen=True)
class GenerationRequest:
    """One pipeline call a front end runs for the rewrite ladder or its probes.

    ``cond`` has one row per prompt; ``rows`` says which of the front end's prompts they are (positions in
    the conditioning it handed over; None: all, in order). ``latents`` are the unpacked initial noises,
    ``images_per_prompt`` per prompt, in prompt order. ``guidance`` maps image rows to the guidance stages
    they follow. ``steps`` overrides the call's step count; ``probe`` asks for final latents only (no
    decoding, no caller extras, a private generator).
    """

    cond: TextConditioning
    latents: torch.Tensor
    images_per_prompt: int
    rows: Sequence[int] | None = None
    guidance: Mapping[int, Sequence[GuidanceStage]] = field(default_factory=dict)
    steps: int | None = None
    probe: bool = False


@dataclass
class GenerationResult:
    """The pipeline's output (None for probes) and the final latents, unpacked, float32, one row per image."""

    output: Any
    latents: torch.Tensor


class Generate(Protocol):
    """A front end's generation for the ladder: one pipeline call per request, at the caller's settings.

    ``steps`` and ``guidance_scale`` are the call's own; ``latent_shape`` the unpacked ``(C, h, w)`` of its
    images (the size the caller asked for).
    """

    steps: int
    guidance_scale: float
    latent_shape: tuple[int, int, int]

    def __call__(self, request: GenerationRequest) -> GenerationResult: ...


def probe_noise(shape: Sequence[int], probes: int, seed: int) -> torch.Tensor:
    """``probes`` initial noises of ``shape`` (C, h, w), float32 on the CPU, from the probe seed."""
    generator = torch.Generator("cpu").manual_seed(seed + PROBE_SEED_OFFSET)
    return torch.randn((probes, *shape), generator=generator, dtype=torch.float32)


def probe_similarity(latents: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """Per image of ``latents`` ``[n, C, h, w]``: the largest absolute cosine to any of ``probes``
    ``[p, C, h, w]``. Absolute, because opposite guidance can push a latent towards the *negative* of the
    memorized one, which is the memorized structure inverted, not a new image."""
    a = F.normalize(latents.detach().float().flatten(1), dim=1)
    b = F.normalize(probes.detach().float().to(a.device).flatten(1), dim=1)
    return (a @ b.T).abs().max(dim=1).values.cpu()


def run_probes(
    generate: Generate,
    cond: TextConditioning,
    shape: Sequence[int],
    settings: VerifySettings,
    seed: int,
    rows: Sequence[int] | None = None,
) -> torch.Tensor:
    """The probe generations of each prompt of ``cond``: ``[prompts, probes, C, h, w]`` final latents."""
    noise = probe_noise(shape, settings.probes, seed).repeat(len(cond), 1, 1, 1)
    result = generate(GenerationRequest(cond=cond, latents=noise, images_per_prompt=settings.probes, rows=rows,
                                        steps=settings.probe_steps, probe=True))
    return result.latents.float().view(len(cond), settings.probes, *result.latents.shape[1:])


def measure_verification(
    generate: Generate, cond: TextConditioning, settings: VerifySettings, *, seed: int, source: str
) -> VerificationCalibration:
    """The verification calibration: each ordinary prompt of ``cond`` generated (at the call's steps and
    guidance, from a seed of its own) and compared with its own probes and with the other prompts' probes."""
    if len(cond) < 2:
        raise ValueError("a verification calibration needs at least two ordinary prompts")
    shape = generate.latent_shape
    probes = run_probes(generate, cond, shape, settings, seed)
    generator = torch.Generator("cpu").manual_seed(seed + NULL_SEED_OFFSET)
    noise = torch.randn((len(cond), *shape), generator=generator, dtype=torch.float32)
    own = generate(GenerationRequest(cond=cond, latents=noise, images_per_prompt=1, probe=True)).latents
    same, nearest, unrelated = [], [], []
    for i in range(len(cond)):
        pairs = [float(probe_similarity(own[i : i + 1], probes[j])[0]) for j in range(len(cond)) if j != i]
        same.append(float(probe_similarity(own[i : i + 1], probes[i])[0]))
        nearest.append(max(pairs))
        unrelated.extend(round(v, 6) for v in pairs)
    return VerificationCalibration(
        nearest=tuple(nearest), same=tuple(same), unrelated=tuple(unrelated), probes=settings.probes,
        probe_steps=settings.probe_steps,
        steps=generate.steps, guidance_scale=generate.guidance_scale, source=source,
    )


#: Ordinary prompts an automatic verification calibration generates (each costs about two generations).
AUTO_VERIFICATION_PROMPTS = 32


def auto_verification(
    scorer: Scorer, generate: Generate, settings: VerifySettings, *, prompts: int = AUTO_VERIFICATION_PROMPTS
) -> VerificationCalibration:
    """The verification calibration on the first ``prompts`` generic captions, measured with the calling
    front end's ``generate`` (its step count and guidance) and cached on disk next to the automatic score
    calibration; a cache that cannot be written only costs a warning."""
    from ..data import generic_captions, generic_captions_id

    measurement = scorer.measurement()
    call = f"{generate.steps}s-{generate.guidance_scale:g}g-{'x'.join(map(str, generate.latent_shape))}"
    probes = f"{settings.probes}x{settings.probe_steps}"
    key = f"v2-{measurement.fingerprint}-{probes}-{call}-{generic_captions_id()}-{prompts}"
    path = calibration_cache_dir() / "verification" / f"{key}.json"
    if path.exists():
        try:
            return VerificationCalibration.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    captions = generic_captions()[:prompts]
    log_event("verification_calibration_started", prompts=len(captions), fingerprint=measurement.fingerprint)
    verification = measure_verification(generate, scorer.encode(captions), settings, seed=scorer.seed,
                                        source=generic_captions_id())
    log_event("verification_calibration_finished", prompts=len(captions))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(verification.model_dump_json(), encoding="utf-8")
    except OSError as error:
        warnings.warn(f"memguard: could not cache the verification calibration at {path} ({error})",
                      RuntimeWarning, stacklevel=2)
    return verification
