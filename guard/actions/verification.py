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

import hashlib
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..calibration import VerificationCalibration, calibration_cache_dir
from ..events import log_event
from ..policy import VerifySettings
from ..scoring import Scorer, TextConditioning
from .generation import GenerationJob, Generator, generation_settings

__all__ = [
    "AUTO_VERIFICATION_PROMPTS",
    "auto_verification",
    "measure_verification",
    "probe_noise",
    "probe_similarity",
    "run_probes",
    "verification_cost",
]

#: Probe noise is drawn from ``seed + PROBE_SEED_OFFSET``: fixed, and independent of the caller's noise.
PROBE_SEED_OFFSET = 1_000_003
#: Generations of ordinary prompts for verification calibration use seeds from here on.
NULL_SEED_OFFSET = 2_000_003
#: Ordinary prompts per generation job of a verification calibration (memory stays bounded on large models).
CALIBRATION_CHUNK = 8


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
    generate: Generator,
    cond: TextConditioning,
    settings: VerifySettings,
    seed: int,
    prompts: Sequence[int] | None = None,
) -> torch.Tensor:
    """The probe generations of each row of ``cond``: ``[rows, probes, C, h, w]`` final latents. ``prompts``: the
    caller's prompt indices behind the rows (None: not the caller's prompts)."""
    noise = probe_noise(generate.latent_shape, settings.probes, seed).repeat(len(cond), 1, 1, 1)
    result = generate(GenerationJob(cond=cond, latents=noise, images_per_prompt=settings.probes, prompts=prompts,
                                    steps=settings.probe_steps, kind="internal"))
    return result.latents.float().view(len(cond), settings.probes, *result.latents.shape[1:])


def verification_cost(prompts: int, settings: VerifySettings, steps: int) -> str:
    """What measuring a verification calibration costs, in words (for the first-use warning and the docs)."""
    probe_images = prompts * settings.probes
    return (f"{probe_images} probe generations of {settings.probe_steps} steps and {prompts} generations of {steps} "
            f"steps (about {(probe_images * settings.probe_steps + prompts * steps) / max(steps, 1):.0f} "
            "generations' worth)")


def measure_verification(
    generate: Generator, cond: TextConditioning, settings: VerifySettings, *, seed: int, source: str,
    progress: bool = True,
) -> VerificationCalibration:
    """The verification calibration: each ordinary prompt of ``cond`` generated (at the generator's steps,
    guidance and size, from a seed of its own) and compared with its own probes and with the other prompts'
    probes. A job of its own: the rows are not the caller's prompts, and nothing of any request is used."""
    if len(cond) < 2:
        raise ValueError("a verification calibration needs at least two ordinary prompts")
    shape = generate.latent_shape
    generator = torch.Generator("cpu").manual_seed(seed + NULL_SEED_OFFSET)
    noise = torch.randn((len(cond), *shape), generator=generator, dtype=torch.float32)
    probes, own = [], []
    with tqdm(total=2 * len(cond), desc="memguard: verification calibration", unit="prompt", disable=not progress,
              leave=False) as bar:
        for start in range(0, len(cond), CALIBRATION_CHUNK):
            rows = cond.select(slice(start, start + CALIBRATION_CHUNK))
            probes.append(run_probes(generate, rows, settings, seed))
            bar.update(len(rows))
        for start in range(0, len(cond), CALIBRATION_CHUNK):
            rows = cond.select(slice(start, start + CALIBRATION_CHUNK))
            job = GenerationJob(cond=rows, latents=noise[start : start + len(rows)], kind="internal")
            own.append(generate(job).latents)
            bar.update(len(rows))
    all_probes, all_own = torch.cat(probes), torch.cat(own)
    same, nearest, unrelated = [], [], []
    for i in range(len(cond)):
        pairs = [float(probe_similarity(all_own[i : i + 1], all_probes[j])[0]) for j in range(len(cond)) if j != i]
        same.append(float(probe_similarity(all_own[i : i + 1], all_probes[i])[0]))
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
    scorer: Scorer, generate: Generator, settings: VerifySettings, *, prompts: int | None = None
) -> VerificationCalibration:
    """The verification calibration on the first ``prompts`` generic captions (default
    ``AUTO_VERIFICATION_PROMPTS``, read when called), measured with ``generate`` at its step count, guidance, size
    and other settings, and cached on disk next to the automatic score calibration (per model, scoring settings and
    call settings); a cache that cannot be written only costs a warning."""
    from ..data import generic_captions, generic_captions_id

    prompts = AUTO_VERIFICATION_PROMPTS if prompts is None else prompts
    measurement = scorer.measurement()
    steps, guidance, shape, extra = generation_settings(generate)
    call = f"{steps}s-{guidance:g}g-{'x'.join(map(str, shape))}"
    if extra is not None:
        call += "-" + hashlib.sha256(repr(extra).encode()).hexdigest()[:12]
    probes = f"{settings.probes}x{settings.probe_steps}"
    key = f"v2-{measurement.fingerprint}-{probes}-{call}-{generic_captions_id()}-{prompts}"
    path = calibration_cache_dir() / "verification" / f"{key}.json"
    if path.exists():
        try:
            return VerificationCalibration.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
    captions = generic_captions()[:prompts]
    cost = verification_cost(len(captions), settings, generate.steps)
    warnings.warn(
        f"memguard: measuring this model's verification calibration for rewrites, once per model and call settings "
        f"({len(captions)} generic captions: {cost}; minutes on a full-size model); it is cached under "
        f"{path.parent}. Precompute it with `memguard calibrate --model DIR --nmem PROMPTS --verification 64 --out "
        "PROFILE` and name the profile in the policy.", RuntimeWarning, stacklevel=2)
    log_event("verification_calibration_started", prompts=len(captions), fingerprint=measurement.fingerprint,
              steps=generate.steps, guidance_scale=generate.guidance_scale, cost=cost)
    verification = measure_verification(generate, scorer.encode(captions), settings, seed=scorer.seed,
                                        source=generic_captions_id())
    log_event("verification_calibration_finished", prompts=len(captions), fingerprint=measurement.fingerprint)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(verification.model_dump_json(), encoding="utf-8")
    except OSError as error:
        warnings.warn(f"memguard: could not cache the verification calibration at {path} ({error})",
                      RuntimeWarning, stacklevel=2)
    return verification
