"""How a score is measured: the settings a policy (or the CLI) asks for, and the measurement a scorer reports.

One model each, used everywhere: ``ScoringSettings`` is a policy's ``scoring`` section, the CLI's scoring options
and the ComfyUI node's overrides, and turns into scorer arguments in one place (``scorer_kwargs``);
``Measurement`` is what a scorer reports, what a calibration profile and an audit record carry, and what decides
whether a calibration may judge a score (``differences``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .noise import DEFAULT_INFERENCE_STEPS, DEFAULT_SEED

__all__ = ["DEFAULT_BATCH_SIZE", "MEASUREMENT_FIELDS", "Measurement", "ScoringSettings"]

DEFAULT_BATCH_SIZE = 16
#: The measurement fields a calibration must share with the scores it judges, in the order mismatches are named.
MEASUREMENT_FIELDS = ("fingerprint", "steps", "seed", "samples", "sampling", "prediction_space", "g_norm", "g_cos")


class ScoringSettings(BaseModel):
    """How prompts are scored (docs/scoring.md); calibrations only apply to scores measured the same way.

    ``samples: adaptive`` (docs/adaptive.md) scores each prompt on one noise draw and adds draws, up to
    ``max_samples`` (default 4), only while its score lies within the calibrated band of a threshold the rules
    use; ``band_quantile`` (default 0.99) is the quantile of the calibration prompts' spread the band is read at.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    noise_seed: int = Field(default=DEFAULT_SEED, ge=0, lt=2**63)
    samples: int | Literal["adaptive"] = 1
    max_samples: int | None = Field(default=None, ge=2, le=64)
    band_quantile: float | None = Field(default=None, gt=0.5, le=1.0, allow_inf_nan=False)
    inference_steps: int = Field(default=DEFAULT_INFERENCE_STEPS, ge=3, le=1000)
    prediction_space: Literal["auto", "eps", "native"] = Field(
        default="auto", description="auto: eps for discrete-time models, velocity for flow models"
    )
    batch_size: int | None = Field(default=None, ge=1, description="prompts per model call; None: scorer default")

    @field_validator("samples", mode="before")
    @classmethod
    def _samples(cls, value: Any) -> Any:
        if isinstance(value, bool) or (isinstance(value, str) and value != "adaptive"):
            raise ValueError(f"samples must be a number of noise draws or 'adaptive', got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"samples must be a whole number of noise draws or 'adaptive', got {value!r}")
        if isinstance(value, (int, float)) and not 1 <= value <= 64:
            raise ValueError(f"input should be greater than or equal to 1 and at most 64, got {value}")
        return value

    @model_validator(mode="after")
    def _adaptive_only(self) -> ScoringSettings:
        if self.samples != "adaptive":
            given = [name for name in ("max_samples", "band_quantile") if getattr(self, name) is not None]
            if given:
                raise ValueError(f"{' and '.join(given)} only apply to samples: adaptive")
        return self

    @property
    def adaptive(self) -> bool:
        """Whether prompts get as many draws as their decision needs (``samples: adaptive``)."""
        return self.samples == "adaptive"

    @property
    def draws(self) -> int:
        """The most noise draws a prompt gets: ``samples``, or ``max_samples`` (default 4) when adaptive."""
        if isinstance(self.samples, int):
            return self.samples
        return self.max_samples or 4

    @property
    def quantile(self) -> float:
        """The band quantile of adaptive sampling (default 0.99)."""
        return self.band_quantile if self.band_quantile is not None else 0.99

    def scorer_kwargs(self, profile: Any = None) -> dict[str, Any]:
        """``make_scorer`` keyword arguments for these settings and score weights ``profile`` (None: the family's)."""
        return {
            "samples": self.samples,
            "max_samples": self.max_samples if self.adaptive else None,
            "seed": self.noise_seed,
            "inference_steps": self.inference_steps,
            "profile": profile,
            "prediction_space": self.prediction_space,
            "batch_size": self.batch_size or DEFAULT_BATCH_SIZE,
        }


class Measurement(BaseModel):
    """How a score was measured: by which model (``fingerprint``), with which settings and weights.

    A calibration only judges scores measured the same way in every ``MEASUREMENT_FIELDS`` field;
    ``model_class`` and ``profile`` (the weights' name) describe, and are not compared.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    fingerprint: str
    steps: int
    seed: int
    samples: int
    #: ``fixed`` (always ``samples`` draws) or ``adaptive`` (1 to ``samples``, as the decision needed).
    sampling: Literal["fixed", "adaptive"] = "fixed"
    prediction_space: str
    g_norm: float = Field(allow_inf_nan=False)
    g_cos: float = Field(allow_inf_nan=False)
    model_class: str | None = None
    profile: str | None = None

    def compared(self) -> dict[str, Any]:
        """The fields that must match for a calibration to judge this measurement."""
        return {name: getattr(self, name) for name in MEASUREMENT_FIELDS}
