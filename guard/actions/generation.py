"""The generator protocol: what a front end gives the core so that the core can generate.

The core owns a request from judgement to outcome record, and some of that needs images: the rewrite ladder's
candidates, the probes that verify them, the verification calibration, and the release the caller receives. A
front end (a diffusers pipeline, a ComfyUI sampler) supplies one ``Generator``: "generate this conditioning from
these initial latents, with these steps and this guidance schedule, at the call's size". Everything else, which
rows to generate, what to verify, what to release, which outcome to record, is the core's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from ..policy import GuidanceStage
from ..scoring import TextConditioning

__all__ = ["GenerationJob", "GenerationResult", "Generator", "JobKind", "generation_settings"]

#: ``release``: images the caller may receive (the caller's own generator, callbacks and output type);
#: ``internal``: final latents only, from a private generator, nothing of the caller's is touched.
JobKind = Literal["release", "internal"]


@dataclass(frozen=True)
class GenerationJob:
    """One generation the core asks a front end for.

    ``cond`` has one row per prompt; None asks for the caller's own prompts (``prompts``) as the front end would
    encode them itself (a prompt the model could not be scored for, generated under ``on_error: allow``).
    ``latents`` are unpacked initial noises ``[rows * images_per_prompt, C, h,
    w]`` in prompt order; None asks for the call's own noise, drawn exactly as the unguarded call would draw it
    (what keeps an allowed prompt's image bit-identical). ``prompts`` names the caller's prompt (its index in the
    call) behind each row, so that per-prompt arguments of the call (negative prompts) follow it; None means the
    rows are not the caller's prompts (a calibration), which then get the front end's defaults. ``guidance`` maps
    image rows to the guidance stages they follow instead of the call's scale. ``steps`` overrides the call's
    step count (short probes). ``keep_latents``: whether the result must carry the final latents (verification
    needs them; an ordinary release does not, and then nothing is hooked into the front end's sampling).
    """

    cond: TextConditioning | None
    latents: torch.Tensor | None = None
    images_per_prompt: int = 1
    prompts: Sequence[int] | None = None
    guidance: Mapping[int, Sequence[GuidanceStage]] = field(default_factory=dict)
    steps: int | None = None
    kind: JobKind = "internal"
    keep_latents: bool = True

    def __post_init__(self) -> None:
        if self.cond is None and self.prompts is None:
            raise ValueError("a job needs conditioning or the caller's prompts")
        rows = len(self.cond) if self.cond is not None else len(self.prompts)
        if self.prompts is not None and len(self.prompts) != rows:
            raise ValueError(f"a job names {len(self.prompts)} caller prompts for {rows} rows")
        if self.latents is not None and self.latents.shape[0] != rows * self.images_per_prompt:
            raise ValueError(f"a job has {self.latents.shape[0]} initial latents for {rows} rows x "
                             f"{self.images_per_prompt} images")

    @property
    def rows(self) -> int:
        """How many prompts the job generates."""
        return len(self.cond) if self.cond is not None else len(self.prompts or ())


@dataclass
class GenerationResult:
    """What a job produced: the front end's own output (None for internal jobs) and the final latents, unpacked,
    float32 on the CPU, one row per image in the job's order (None when the job did not keep them)."""

    output: Any
    latents: torch.Tensor | None


@runtime_checkable
class Generator(Protocol):
    """A front end's generation, at the settings of the call it serves.

    ``steps`` and ``guidance_scale`` are the call's; ``latent_shape`` is the unpacked ``(C, h, w)`` of its images
    (the size the caller asked for). ``guidance_unavailable`` says why a guidance schedule cannot run on this
    front end's calls (None when it can). ``initial_noise`` returns the call's own initial noise for every prompt
    of the call (``[prompts * images_per_prompt, C, h, w]``, unpacked), as the call would draw it. A generator may
    also name other settings its images depend on (``settings_key``: a sampler, a scheduler), so that a
    verification calibration measured at one is not used for another (``generation_settings``).
    """

    steps: int
    guidance_scale: float
    latent_shape: tuple[int, int, int]
    guidance_unavailable: str | None

    def initial_noise(self) -> torch.Tensor: ...

    def __call__(self, job: GenerationJob) -> GenerationResult: ...


def generation_settings(generator: Any) -> tuple:
    """What a generator's images depend on besides the conditioning and the noise: the key a verification
    calibration measured with it is kept under (steps, guidance, image size and the generator's own
    ``settings_key``, if it has one)."""
    if generator is None:
        return (None,)
    return (generator.steps, float(generator.guidance_scale), tuple(int(v) for v in generator.latent_shape),
            getattr(generator, "settings_key", None))
