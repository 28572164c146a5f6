"""Per-step guidance for chosen images of a call: the ``guidance_schedule`` rung of the rewrite ladder.

Classifier-free guidance pulls a memorized prompt's trajectory into its training image's basin from the very
first steps; opposite (negative) or no guidance in the first part of sampling, then the usual guidance, lets
the trajectory settle elsewhere (after Jain et al., CVPR 2025). It costs no extra model evaluations.

Pipelines decide whether to run classifier-free guidance from their own ``guidance_scale`` at every step,
so changing that mid-call breaks their batch layout. Instead, a forward hook on the denoiser rewrites the
conditional half of its output for the chosen rows, ``e_c' = e_u + (s / g) (e_c - e_u)``, so that the
pipeline's own combination ``e_u + g (e_c' - e_u)`` equals ``e_u + s (e_c - e_u)`` for the stage's scale
``s``; every other row is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..policy import GuidanceStage

__all__ = ["scale_at", "scheduled_guidance"]


def scale_at(stages: Sequence[GuidanceStage], fraction: float) -> float | None:
    """The guidance scale of the stage ``fraction`` (0 = first step) falls in; None after the last stage."""
    for stage in stages:
        if fraction < stage.until:
            return stage.scale
    return None


def _timestep_of(args: tuple, kwargs: dict[str, Any]) -> float | None:
    value = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return float(value.reshape(-1)[0])
    return float(value)


@contextlib.contextmanager
def scheduled_guidance(
    denoiser: torch.nn.Module | None,
    *,
    rows: Mapping[int, Sequence[GuidanceStage]],
    images: int,
    guidance_scale: float,
    schedule: Callable[[], torch.Tensor | None],
) -> Iterator[None]:
    """While active, each image row in ``rows`` (of ``images`` per half of the guidance batch) follows its stages.

    ``schedule`` returns the call's timesteps (read when the denoiser runs, after the pipeline set them);
    the current step's position in it decides the stage. A call of the denoiser that is not a guidance
    batch of ``2 * images`` rows is left alone.
    """
    if not rows or guidance_scale <= 1.0:
        yield
        return
    if denoiser is None:
        raise ValueError("a guidance schedule needs the denoiser it is applied to")

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        if not isinstance(tensor, torch.Tensor) or tensor.shape[0] != 2 * images:
            return output
        timestep = _timestep_of(args, kwargs)
        timesteps = schedule()
        if timestep is None or timesteps is None or len(timesteps) == 0:
            return output
        position = int(torch.argmin((timesteps.float().cpu() - timestep).abs()))
        adjusted = None
        for row, stages in rows.items():
            scale = scale_at(stages, position / len(timesteps))
            if scale is None:
                continue
            if adjusted is None:
                adjusted = tensor.clone()
            uncond, cond = tensor[row], tensor[images + row]
            adjusted[images + row] = uncond + (scale / guidance_scale) * (cond - uncond)
        if adjusted is None:
            return output
        if isinstance(output, tuple):
            return (adjusted, *output[1:])
        if hasattr(output, "sample"):
            output.sample = adjusted
            return output
        return adjusted

    handle = denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
