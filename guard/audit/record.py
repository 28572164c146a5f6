"""The audit record: one JSON object per decision."""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from guard.policy.decision import Decision
from guard.policy.schema import Action, Policy

__all__ = [
    "AuditRecord",
    "ErrorInfo",
    "ModelRef",
    "Outcome",
    "PolicyRef",
    "PromptMode",
    "build_record",
    "decision_fields",
    "new_request_id",
    "protect_prompt",
    "utc_timestamp",
]

PromptMode = Literal["hash", "redact", "plain"]
Outcome = Literal["generated", "blocked", "withheld", "rewritten", "dropped", "checked", "error"]
REDACTED = "[redacted]"
_Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PolicyRef(_Model):
    name: str
    version: str
    hash: str

    @classmethod
    def of(cls, policy: Policy) -> PolicyRef:
        return cls(name=policy.name, version=policy.version, hash=policy.content_hash)


class ModelRef(_Model):
    id: str | None = None
    class_: str | None = Field(default=None, alias="class")


class ErrorInfo(_Model):
    type: str
    message: str


class AuditRecord(_Model):
    """What one audit line says (the sink adds ``seq``, ``prev_hash`` and ``hash``).

    ``prompt`` is stored as ``prompt_mode`` says: a SHA-256 hex digest, ``[redacted]``, or the text.
    ``extras`` carries fields added by later features (e.g. mitigation before/after scores).
    """

    timestamp: str
    request_id: str = Field(min_length=1)
    event: Literal["decision", "error"]
    policy: PolicyRef
    model: ModelRef = ModelRef()
    prompt: str | None = None
    prompt_mode: PromptMode
    prompt_index: int | None = Field(default=None, ge=0)
    norm: _Finite | None = None
    cos: _Finite | None = None
    score: _Finite | None = None
    profile: str | None = None
    calibration: str | None = None
    rule: str | None = None
    action: Action
    outcome: Outcome
    reason: str | None = None
    thresholds: tuple[dict[str, Any], ...] = ()
    latency_scoring_ms: _Finite | None = Field(default=None, ge=0)
    latency_generation_ms: _Finite | None = Field(default=None, ge=0)
    error: ErrorInfo | None = None
    extras: dict[str, Any] = Field(default_factory=dict)

    @field_validator("timestamp")
    @classmethod
    def _utc_z(cls, value: str) -> str:
        if not value.endswith("Z"):
            raise ValueError("timestamp must be UTC ISO 8601 ending in Z")
        datetime.fromisoformat(value[:-1] + "+00:00")
        return value

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def utc_timestamp() -> str:
    """Now, as UTC ISO 8601 with microseconds and a ``Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_request_id() -> str:
    return uuid.uuid4().hex


def protect_prompt(prompt: str | None, mode: PromptMode, salt: str | None = None) -> str | None:
    """The prompt as stored: SHA-256 of ``salt + prompt`` (UTF-8), ``[redacted]``, or as is."""
    if prompt is None:
        return None
    if mode == "plain":
        return prompt
    if mode == "redact":
        return REDACTED
    return hashlib.sha256(((salt or "") + prompt).encode("utf-8")).hexdigest()


def _finite(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def decision_fields(
    decision: Decision,
    *,
    prompt: str | None,
    outcome: Outcome,
    latency_scoring_ms: float | None = None,
    latency_generation_ms: float | None = None,
    error: BaseException | Mapping[str, str] | None = None,
    extras: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The record fields a decision contributes, prompt still in plain text (processors protect it).

    Non-finite measurements are stored as null; the error says what they were.
    """
    score = decision.score
    if isinstance(error, BaseException):
        err: dict[str, str] | None = {"type": type(error).__name__, "message": str(error)}
    elif error is not None:
        err = dict(error)
    elif decision.error is not None:
        err = {"type": "DecisionError", "message": decision.error}
    else:
        err = None
    return {
        "event": "error" if err is not None else "decision",
        "prompt": prompt,
        "prompt_index": decision.prompt_index,
        "norm": _finite(score.norm) if score else None,
        "cos": _finite(score.cos) if score else None,
        "score": _finite(score.score) if score else None,
        "profile": score.profile if score else None,
        "calibration": decision.calibration_id,
        "rule": decision.rule,
        "action": decision.action,
        "outcome": outcome,
        "reason": decision.reason,
        "thresholds": [t.to_dict() for t in decision.thresholds],
        "latency_scoring_ms": latency_scoring_ms,
        "latency_generation_ms": latency_generation_ms,
        "error": err,
        "extras": dict(extras or {}),
    }


def build_record(
    decision: Decision,
    *,
    policy: Policy,
    request_id: str,
    prompt: str | None,
    outcome: Outcome,
    model_id: str | None = None,
    model_class: str | None = None,
    latency_scoring_ms: float | None = None,
    latency_generation_ms: float | None = None,
    error: BaseException | Mapping[str, str] | None = None,
    extras: Mapping[str, Any] | None = None,
    timestamp: str | None = None,
) -> AuditRecord:
    """A validated record for one decision, prompt protected as the policy's audit settings say."""
    fields = decision_fields(
        decision,
        prompt=prompt,
        outcome=outcome,
        latency_scoring_ms=latency_scoring_ms,
        latency_generation_ms=latency_generation_ms,
        error=error,
        extras=extras,
    )
    mode = policy.audit.prompt
    fields["prompt"] = protect_prompt(prompt, mode, policy.audit.hash_salt)
    return AuditRecord(
        timestamp=timestamp or utc_timestamp(),
        request_id=request_id,
        policy=PolicyRef.of(policy),
        model=ModelRef(id=model_id, class_=model_class),
        prompt_mode=mode,
        **fields,
    )
