"""Request and response bodies of the service (they are also its OpenAPI schema).

Verdicts are the core's own ``Decision`` model, so the API says exactly what the audit records say.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..policy import Decision

MAX_PROMPTS_PER_REQUEST = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CheckRequest(_Strict):
    """One prompt (``prompt``) or several (``prompts``): scored and decided, nothing generated."""

    prompt: str | None = Field(default=None, description="A single prompt.")
    prompts: list[str] | None = Field(
        default=None, min_length=1, max_length=MAX_PROMPTS_PER_REQUEST, description="Several prompts."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> CheckRequest:
        if (self.prompt is None) == (self.prompts is None):
            raise ValueError("give exactly one of 'prompt' (a string) or 'prompts' (a list of strings)")
        return self

    def as_list(self) -> list[str]:
        return [self.prompt] if self.prompt is not None else list(self.prompts or [])


class CheckResponse(BaseModel):
    request_id: str = Field(description="The id of this request in the audit log's records.")
    decisions: list[Decision] = Field(description="One verdict per prompt; prompt_index counts within the request.")
    blocked: list[int] = Field(description="Indices of the prompts the policy blocks.")


class GenerateRequest(_Strict):
    """A guarded text-to-image call: scored and decided first, generated only if the policy lets it through."""

    prompt: str = Field(min_length=1)
    negative_prompt: str | None = None
    num_inference_steps: int = Field(default=25, ge=1, le=200)
    guidance_scale: float = Field(default=7.5, ge=0.0, le=50.0)
    height: int | None = Field(default=None, ge=8, le=2048, multiple_of=8)
    width: int | None = Field(default=None, ge=8, le=2048, multiple_of=8)
    num_images: int = Field(default=1, ge=1, le=4)
    seed: int | None = Field(default=None, ge=0, lt=2**63, description="Seed of the generation (not of the guard).")


class GenerateResponse(BaseModel):
    request_id: str
    images: list[str] = Field(description="PNG images, base64-encoded.")
    decisions: list[Decision]
    latency_scoring_ms: float | None = None
    latency_generation_ms: float | None = None


class BlockedResponse(BaseModel):
    """HTTP 403: the policy blocked the request (or could not score it and fails closed)."""

    error: Literal["blocked"] = "blocked"
    detail: str
    request_id: str | None = None
    decisions: list[Decision]


class ErrorResponse(BaseModel):
    error: str
    detail: Any = None


class GuardHealth(BaseModel):
    """One guard the service runs (the default policy's, or an API key's policy)."""

    policy: str
    policy_version: str
    scorer_ready: bool
    audit_writable: bool
    detail: str | None = None


class Health(BaseModel):
    """``ok`` when every guard can score and record; ``degraded`` (HTTP 503) otherwise, with each guard's state.
    ``policy`` is the default policy's name; ``guards`` lists every guard, the default first."""

    status: Literal["ok", "degraded"]
    model: str
    policy: str
    policy_version: str
    scorer_ready: bool
    detail: str | None = None
    guards: list[GuardHealth] = Field(default_factory=list)
