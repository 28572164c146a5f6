"""The audit records: one JSON object per line, of these kinds (``event``):

* ``decision`` (``error`` when the decision came from ``on_error``): the verdict on one prompt, written
  **before** anything is generated (write-ahead). ``outcome`` is ``pending`` when an outcome record is
  to follow, ``checked`` when the request only asked for a verdict.
* ``outcome``: what was done with the prompt (generated, withheld, blocked, rewritten, dropped, failed),
  with latencies, chained to its decision record by that record's ``seq`` and ``hash``.
* ``policy_loaded``, ``calibration_loaded``, ``service_started``: which rules and calibration were in
  force from then on, where they came from and who started them (process user; API key id in the service).
* ``checkpoint``: a signature over the chain so far (``guard.audit.signing``), written by the sink only.
* ``segment``: the first record of each writer's segment in a trail (``guard.audit.trail``), written by the
  sink only. In a trail the sink adds ``writer`` to every record.
* ``calibration``, ``calibration_mismatch``, ``drift``: the running guard's calibration findings
  (``guard.monitor``): a profile taken into use with its relative thresholds, a failed fit check, a rule whose
  observed rate left the calibration's promise.

Records never hold prompt text unless the policy says ``audit.prompt: plain``.
"""

from __future__ import annotations

import getpass
import hashlib
import math
import os
import socket
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from guard.policy import Action, Decision, Policy
from guard.scoring import Measurement

from .chain import utc_timestamp

__all__ = [
    "Actor",
    "CalibrationLoadedRecord",
    "CheckpointRecord",
    "DecisionOutcome",
    "CalibrationEventRecord",
    "DecisionRecord",
    "ErrorInfo",
    "MeasurementRef",
    "ModelRef",
    "Outcome",
    "OutcomeRecord",
    "PolicyLoadedRecord",
    "PolicyRef",
    "PromptMode",
    "RECORD_MODELS",
    "SegmentRecord",
    "ServiceStartedRecord",
    "current_actor",
    "decision_fields",
    "error_info",
    "new_request_id",
    "protect_prompt",
    "utc_timestamp",
]

PromptMode = Literal["hash", "redact", "plain"]
#: What a decision record says about its outcome: one follows (pending), or none will (checked).
DecisionOutcome = Literal["pending", "checked"]
#: What was done with a prompt. ``rewritten``: generated from a mitigated input that passed verification.
Outcome = Literal["generated", "withheld", "blocked", "rewritten", "dropped", "failed"]
REDACTED = "[redacted]"
_Finite = Annotated[float, Field(allow_inf_nan=False)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


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


class _Record(_Model):
    timestamp: str
    request_id: str = Field(min_length=1)
    policy: PolicyRef
    model: ModelRef = ModelRef()
    source: str | None = None
    context: dict[str, Any] = Field(default_factory=dict)
    prompt_index: int | None = Field(default=None, ge=0)
    error: ErrorInfo | None = None
    extras: dict[str, Any] = Field(default_factory=dict)

    @field_validator("timestamp")
    @classmethod
    def _utc_z(cls, value: str) -> str:
        if not value.endswith("Z"):
            raise ValueError("timestamp must be UTC ISO 8601 ending in Z")
        datetime.fromisoformat(value[:-1] + "+00:00")
        return value


#: How a decision's score was measured: the scorer's own ``Measurement`` (records of older versions lack
#: ``sampling``, read as ``fixed``). Kept under this name for readers of 0.2.
MeasurementRef = Measurement


class DecisionRecord(_Record):
    """The verdict on one prompt (the sink adds ``seq``, ``prev_hash`` and ``hash``).

    ``prompt`` is stored as ``prompt_mode`` says: a SHA-256 hex digest, ``[redacted]``, or the text.
    """

    event: Literal["decision", "error"]
    prompt: str | None = None
    prompt_mode: PromptMode
    norm: _Finite | None = None
    cos: _Finite | None = None
    score: _Finite | None = None
    profile: str | None = None
    calibration: str | None = None
    rule: str | None = None
    action: Action
    outcome: DecisionOutcome
    reason: str | None = None
    thresholds: tuple[dict[str, Any], ...] = ()
    latency_scoring_ms: _Finite | None = Field(default=None, ge=0)
    measurement: MeasurementRef | None = None
    #: Noise draws the score averages (under adaptive sampling, as many as the decision needed).
    samples: int | None = Field(default=None, ge=1)
    #: Which words drive the score (``guard.scoring.explain``): word indices, character spans and weights; the
    #: words themselves only when ``prompt_mode`` is ``plain``.
    explanation: dict[str, Any] | None = None


class OutcomeRecord(_Record):
    """What was done with one prompt, chained to its decision record by ``decision_seq``/``decision_hash``.

    ``action`` is the action finally taken, which differs from the decision's when a rewrite fell back.
    """

    event: Literal["outcome"]
    decision_seq: int | None = Field(default=None, ge=1)
    decision_hash: str | None = None
    action: Action
    outcome: Outcome
    reason: str | None = None
    latency_generation_ms: _Finite | None = Field(default=None, ge=0)


class Actor(_Model):
    """Who caused a provenance event: the process's user and, for a service call, the API key."""

    user: str | None = None
    uid: int | None = None
    pid: int
    host: str
    key_id: str | None = None


class PolicyLoadedRecord(_Record):
    """A guard started applying ``policy`` (also on reopening its log): the rules in force from here on.

    ``signing_key_id`` is the key this writer signs checkpoints with (None: this writer does not sign).
    """

    event: Literal["policy_loaded"]
    policy_path: str | None = None
    signing_key_id: str | None = None
    actor: Actor


class CalibrationLoadedRecord(_Record):
    """The calibration that relative thresholds use from here on (``previous``: the one it replaced)."""

    event: Literal["calibration_loaded"]
    calibration: str
    calibration_path: str | None = None
    origin: Literal["file", "auto", "object"]
    previous: str | None = None
    actor: Actor


class KeyGrant(_Model):
    """One API key of the service: its id, team, the policy its requests are judged by, its rate limit."""

    id: str
    team: str | None = None
    policy: PolicyRef
    policy_path: str | None = None
    rate_limit: dict[str, float] | None = None


class ServiceStartedRecord(_Record):
    """The HTTP service started: where it listens, how callers authenticate, and each key's policy."""

    event: Literal["service_started"]
    actor: Actor
    bind: str | None = None
    auth: Literal["api_keys", "none"]
    insecure_no_auth: bool = False
    api_keys_path: str | None = None
    api_keys_sha256: str | None = None
    keys: tuple[KeyGrant, ...] = ()


class CheckpointRecord(_Model):
    """A signed checkpoint (written by the sink, never through the logger); see ``guard.audit.signing``.

    Signs ``signed_seq``/``signed_hash`` (the record right before it), the previous checkpoint's ``seq``
    and ``signature`` (0 and null for the first), the time and every other field here but ``signature``.
    """

    event: Literal["checkpoint"]
    v: Literal[1]
    timestamp: str
    alg: Literal["ed25519"]
    key_id: str
    signed_seq: int = Field(ge=0)
    signed_hash: str = Field(min_length=64, max_length=64)
    prev_checkpoint_seq: int = Field(ge=0)
    prev_signature: str | None
    reason: Literal["count", "interval", "close", "exit", "open"]
    #: The process that signed (``pid``, ``host``); in a trail, the writer id (the process is then in ``process``).
    writer: dict[str, Any] | str = Field(default_factory=dict)
    process: dict[str, Any] | None = None
    #: In a trail: its name, and ``{writer: [seq, hash]}`` of the other segments' heads as this writer saw them.
    trail: str | None = None
    witness: dict[str, tuple[int, str]] | None = None
    signature: str


class SegmentRecord(_Model):
    """The first record of a writer's segment in a trail (written by the sink only; ``guard.audit.trail``): the
    trail it belongs to, the writer (added by the sink, like to every record of a trail), the process, and the
    head (``[seq, hash]``) of every other segment it found, which ``memguard audit verify`` holds them to."""

    event: Literal["segment"]
    v: Literal[1]
    timestamp: str
    trail: str
    writer: str
    process: dict[str, Any]
    witness: dict[str, tuple[int, str]] = Field(default_factory=dict)


#: The record model of each ``event``.
RECORD_MODELS: dict[str, type[_Model]] = {
    "decision": DecisionRecord,
    "error": DecisionRecord,
    "outcome": OutcomeRecord,
    "policy_loaded": PolicyLoadedRecord,
    "calibration_loaded": CalibrationLoadedRecord,
    "service_started": ServiceStartedRecord,
    "checkpoint": CheckpointRecord,
    "segment": SegmentRecord,
}


def current_actor(key_id: str | None = None) -> dict[str, Any]:
    """This process's user, uid, pid and host (and the calling API key, if any), as a record's ``actor``."""
    try:
        user: str | None = getpass.getuser()
    except Exception:  # no login name and no passwd entry (e.g. an arbitrary container uid)
        user = None
    uid = os.getuid() if hasattr(os, "getuid") else None
    return Actor(user=user, uid=uid, pid=os.getpid(), host=socket.gethostname(), key_id=key_id).model_dump()


# -- calibration checks and drift alarms (guard/monitor.py) --------------------------------------------------


class CalibrationEventRecord(_Record):
    """A calibration finding: ``calibration`` (a profile taken into use, with its relative thresholds),
    ``calibration_mismatch`` (a fit check failed) or ``drift`` (a rule's observed rate left its promise)."""

    event: Literal["calibration", "calibration_mismatch", "drift"]
    calibration: str | None = None
    check: str
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


RECORD_MODELS.update({kind: CalibrationEventRecord for kind in ("calibration", "calibration_mismatch", "drift")})


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


def error_info(error: BaseException | Mapping[str, str] | str | None) -> dict[str, str] | None:
    """An exception, a ``{type, message}`` mapping or a decision's error text as a record's ``error``."""
    if error is None:
        return None
    if isinstance(error, BaseException):
        return {"type": type(error).__name__, "message": str(error)}
    if isinstance(error, str):
        return {"type": "DecisionError", "message": error}
    return dict(error)


def decision_fields(decision: Decision, *, prompt: str | None, outcome: DecisionOutcome) -> dict[str, Any]:
    """The record fields a decision contributes, prompt still in plain text (a processor protects it).

    Non-finite measurements are stored as null; the error says what they were. The explanation's words are
    plain text here too; the logger's prompt processor removes them unless prompts are logged plain.
    """
    score = decision.score
    err = error_info(decision.error)
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
        "error": err,
        "samples": score.samples if score else None,
        "explanation": decision.explanation.to_dict(with_words=True) if decision.explanation is not None else None,
    }
