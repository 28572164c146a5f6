"""Model profiles: the score weights that belong to a model family, not to code."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelProfile:
    """Weights of ``score = g_norm * norm + g_cos * cos`` for one model family."""

    name: str
    g_norm: float
    g_cos: float
    description: str = ""

    def combine(self, norm: Any, cos: Any) -> Any:
        """``g_norm * norm + g_cos * cos``: the one place the score is formed (floats, arrays or tensors)."""
        return self.g_norm * norm + self.g_cos * cos


PROFILES: dict[str, ModelProfile] = {
    profile.name: profile
    for profile in (
        ModelProfile("sd1", 1.0, 2.0, "Stable Diffusion 1.x (epsilon); reference weights"),
        ModelProfile("sd2", 1.0, 0.1, "Stable Diffusion 2.x (v-prediction); reference weights"),
        ModelProfile("realistic-vision", 2.0, 1.0, "Realistic Vision (SD 1.5 fine-tune); reference weights"),
        ModelProfile(
            "sdxl",
            1.0,
            1.0,
            "Stable Diffusion XL; no published weights, equal weighting - calibrate before relying on it",
        ),
        # Flow models: norm alone. On the project's rectified-flow memorizer (benchmarks/memorizer/models/
        # flow-strong, SD3 architecture; README "Flow models") the guidance norm separates memorized from unseen
        # captions perfectly (AUROC 1.000, n=1 and n=4) while the cosine term is *inverted* in velocity space
        # (AUROC 0.06-0.12: memorized captions have the lower cosine), so a positive g_cos can only hurt and the
        # fitted negative weight adds nothing held out. FLUX shares the space and the choice (no FLUX memorizer).
        *(
            ModelProfile(
                name,
                1.0,
                0.0,
                f"{model} (velocity space); guidance norm alone: the cosine term was inverted on the project's "
                "flow memorizer - calibrate before relying on it",
            )
            for name, model in (("sd3", "Stable Diffusion 3 / 3.5"), ("flux", "FLUX.1 dev / schnell"))
        ),
        ModelProfile(
            "pixart",
            1.0,
            1.0,
            "PixArt-alpha / PixArt-Sigma (eps); provisional equal weighting: no published weights, to be replaced "
            "once the project's memorizer gives evidence - calibrate before relying on it",
        ),
    )
}

ProfileLike = str | ModelProfile | Mapping[str, Any] | tuple[float, float]


def get_profile(spec: ProfileLike) -> ModelProfile:
    """Resolve a profile given by name, object, ``{"g_norm": .., "g_cos": ..}`` or ``(g_norm, g_cos)``."""
    if isinstance(spec, ModelProfile):
        return spec
    if isinstance(spec, str):
        try:
            return PROFILES[spec]
        except KeyError:
            raise ValueError(f"unknown model profile {spec!r}; known profiles: {', '.join(PROFILES)}") from None
    if isinstance(spec, tuple):
        g_norm, g_cos = spec
        return ModelProfile("custom", float(g_norm), float(g_cos))
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"name", "g_norm", "g_cos", "description"}
        if unknown or not {"g_norm", "g_cos"} <= set(spec):
            raise ValueError(f"a profile mapping needs g_norm and g_cos (got keys {sorted(spec)})")
        return ModelProfile(
            str(spec.get("name", "custom")), float(spec["g_norm"]), float(spec["g_cos"]), spec.get("description", "")
        )
    raise TypeError(f"cannot use {type(spec).__name__} as a model profile")
