"""memguard's own structlog logger for audit records.

Built with ``structlog.wrap_logger`` and an explicit processor chain, wrapper and context class, and
materialized at once, so neither the application's ``structlog.configure`` nor its ``logging`` setup
can filter, reformat or redirect audit records, and memguard never changes them either.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType
from typing import Any

import structlog
from pydantic import ValidationError

from guard.errors import MemguardError
from guard.policy.decision import Decision
from guard.policy.schema import Policy

from .chain import SINK_EVENTS
from .record import (
    RECORD_MODELS,
    DecisionOutcome,
    ModelRef,
    Outcome,
    PolicyRef,
    PromptMode,
    current_actor,
    decision_fields,
    error_info,
    new_request_id,
    protect_prompt,
    utc_timestamp,
)
from .signing import resolve_signer
from .sink import AuditLog

__all__ = [
    "AUDIT_PATH_ENV",
    "AuditLogger",
    "AuditRecordError",
    "audit_context",
    "current_audit_context",
    "resolve_audit_path",
]

AUDIT_PATH_ENV = "MEMGUARD_AUDIT_PATH"
EventDict = MutableMapping[str, Any]
_AUDIT_CONTEXT: ContextVar[Mapping[str, Any]] = ContextVar(
    "memguard_audit_context", default=MappingProxyType({})
)


class AuditRecordError(MemguardError, ValueError):
    """An event does not fit the audit record schema (a bug in the caller, not in the log)."""


@contextmanager
def audit_context(**fields: Any) -> Iterator[None]:
    """Adds ``fields`` to the ``context`` of every record written in this context (thread or task).

    How a caller's identity reaches records written deep inside a guard call: the HTTP service wraps each
    request in ``audit_context(key_id=..., endpoint=...)``. Fields a record sets itself win.
    """
    token = _AUDIT_CONTEXT.set({**_AUDIT_CONTEXT.get(), **fields})
    try:
        yield
    finally:
        _AUDIT_CONTEXT.reset(token)


def current_audit_context() -> Mapping[str, Any]:
    """The fields ``audit_context`` added in the current context."""
    return _AUDIT_CONTEXT.get()


def add_audit_context(_: Any, __: str, event: EventDict) -> EventDict:
    extra = _AUDIT_CONTEXT.get()
    if extra:
        event["context"] = {**extra, **(event.get("context") or {})}
    return event


def add_timestamp(_: Any, __: str, event: EventDict) -> EventDict:
    event.setdefault("timestamp", utc_timestamp())
    return event


def add_request_id(_: Any, __: str, event: EventDict) -> EventDict:
    if not event.get("request_id"):
        event["request_id"] = new_request_id()
    return event


class ProtectPrompt:
    """Replaces the plain prompt by its hash or ``[redacted]`` (and drops the explanation's words and the words a
    rewrite deleted), unless the event says how it is stored."""

    def __init__(self, mode: PromptMode, salt: str | None = None):
        self.mode = mode
        self.salt = salt

    def __call__(self, _: Any, __: str, event: EventDict) -> EventDict:
        if event.get("event") in ("decision", "error") and "prompt_mode" not in event:
            event["prompt"] = protect_prompt(event.get("prompt"), self.mode, self.salt)
            event["prompt_mode"] = self.mode
            explanation = event.get("explanation")
            if isinstance(explanation, dict) and self.mode != "plain":  # the words are prompt text
                event["explanation"] = {**explanation, "words": [
                    {k: v for k, v in item.items() if k != "word"} for item in explanation.get("words") or ()]}
        elif event.get("event") == "outcome" and self.mode != "plain":
            extras = event.get("extras")
            mitigation = extras.get("mitigation") if isinstance(extras, dict) else None
            if isinstance(mitigation, dict) and any(rung.get("edits") for rung in mitigation.get("rungs") or ()):
                event["extras"] = {**extras, "mitigation": {**mitigation, "rungs": [  # deleted words: prompt text
                    {**rung, "edits": {k: v for k, v in rung["edits"].items() if k != "words"}} if rung.get("edits")
                    else rung for rung in mitigation["rungs"]]}}
        return event


def validate_record(_: Any, __: str, event: EventDict) -> dict[str, Any]:
    if event.get("event") in SINK_EVENTS:
        raise AuditRecordError(f"invalid audit record: {event.get('event')} records are written by the sink only")
    model = RECORD_MODELS.get(str(event.get("event")))
    if model is None:
        raise AuditRecordError(f"invalid audit record: unknown event {event.get('event')!r}")
    try:
        return model.model_validate(dict(event)).to_json_dict()
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise AuditRecordError(f"invalid audit record: {where}: {first['msg']}") from None


def to_sink(_: Any, __: str, event: EventDict) -> tuple[tuple[dict[str, Any]], dict[str, Any]]:
    return (dict(event),), {}


class _SinkLogger:
    """The wrapped 'logger': hands each validated record to the hash-chaining sink."""

    def __init__(self, sink: AuditLog):
        self.sink = sink

    def msg(self, record: dict[str, Any]) -> dict[str, Any]:
        return self.sink.append(record)

    info = warning = error = critical = debug = msg


class AuditLogger:
    """Writes audit records through memguard's own structlog processor chain into an ``AuditLog``.

    Processors: add a UTC timestamp, add a request id, add the ``audit_context`` fields to ``context``,
    protect the prompt (hash, redact or plain), validate against the event's record model; the sink then
    chains and writes the canonical JSON line (and signs checkpoints, with a signing key).
    Context bound with ``bind`` (request id, policy, model) goes into every record.
    """

    def __init__(
        self,
        sink: AuditLog,
        *,
        prompt_mode: PromptMode = "hash",
        hash_salt: str | None = None,
        context: Mapping[str, Any] | None = None,
    ):
        self.sink = sink
        self.prompt_mode = prompt_mode
        self.hash_salt = hash_salt
        processors = [
            add_timestamp,
            add_request_id,
            add_audit_context,
            ProtectPrompt(prompt_mode, hash_salt),
            validate_record,
            to_sink,
        ]
        self._log = structlog.wrap_logger(
            _SinkLogger(sink),
            processors=processors,
            wrapper_class=structlog.BoundLogger,
            context_class=dict,
            cache_logger_on_first_use=False,
        ).bind(**dict(context or {}))

    @classmethod
    def for_policy(
        cls,
        policy: Policy,
        *,
        path: str | os.PathLike[str] | None = None,
        model_id: str | None = None,
        model_class: str | None = None,
    ) -> AuditLogger:
        """A logger as ``policy.audit`` says; ``path``, then ``$MEMGUARD_AUDIT_PATH``, override its path, and
        ``$MEMGUARD_AUDIT_SIGNING_KEY`` its ``signing_key``. An unusable signing key raises ``SigningKeyError``.

        A path that is a directory, or ends with ``/``, is a trail: this process writes its own segment in it
        (``guard.audit.trail``), named by ``$MEMGUARD_AUDIT_WRITER`` or host, pid and a random part."""
        settings = policy.audit
        sink = AuditLog(
            _audit_target(policy, path),
            fsync=settings.fsync,
            signer=resolve_signer(settings.signing_key),
            checkpoint_every=settings.checkpoint_every,
            checkpoint_seconds=settings.checkpoint_seconds,
            checkpoint_copy=settings.checkpoint_copy,
        )
        context = {
            "policy": PolicyRef.of(policy).model_dump(),
            "model": ModelRef(id=model_id, class_=model_class).model_dump(by_alias=True),
        }
        return cls(sink, prompt_mode=policy.audit.prompt, hash_salt=policy.audit.hash_salt, context=context)

    def bind(self, **context: Any) -> AuditLogger:
        """A logger on the same sink with more context (e.g. ``request_id``) in every record."""
        clone = object.__new__(AuditLogger)
        clone.sink, clone.prompt_mode, clone.hash_salt = self.sink, self.prompt_mode, self.hash_salt
        clone._log = self._log.bind(**context)
        return clone

    def batch(self) -> AbstractContextManager[None]:
        """Write several records with one ``fsync`` at the end (``AuditLog.batch``)::

            with logger.batch():
                records = [logger.log_decision(d, ...) for d in decisions]
            act_on(records)   # only after the block: every record of the batch is on disk

        With ``audit.fsync`` off it changes nothing. A failed flush raises ``AuditWriteError`` when the block ends.
        """
        return self.sink.batch()

    def log(self, event: str, **fields: Any) -> dict[str, Any]:
        """Validate and write one record; returns it as written (with ``seq``, ``prev_hash``, ``hash``)."""
        return self._log.info(event, **fields)

    def log_decision(
        self,
        decision: Decision,
        *,
        prompt: str | None,
        outcome: DecisionOutcome,
        request_id: str,
        latency_scoring_ms: float | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Write the record of one decision (before anything is done with it); returns it as written."""
        record = decision_fields(decision, prompt=prompt, outcome=outcome)
        event = record.pop("event")
        return self.log(event, **record, request_id=request_id, latency_scoring_ms=latency_scoring_ms, **fields)

    def log_outcome(
        self,
        *,
        request_id: str,
        prompt_index: int,
        action: str,
        outcome: Outcome,
        decision_record: Mapping[str, Any] | None = None,
        reason: str | None = None,
        latency_generation_ms: float | None = None,
        error: BaseException | Mapping[str, str] | str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Write what was done with one prompt, chained to its decision record (as ``log_decision`` returned it)."""
        return self.log(
            "outcome",
            request_id=request_id,
            prompt_index=prompt_index,
            action=action,
            outcome=outcome,
            reason=reason,
            latency_generation_ms=latency_generation_ms,
            error=error_info(error),
            decision_seq=None if decision_record is None else decision_record.get("seq"),
            decision_hash=None if decision_record is None else decision_record.get("hash"),
            **fields,
        )

    def log_policy_loaded(self, policy: Policy, **fields: Any) -> dict[str, Any]:
        """Record that ``policy`` is in force from here on: its file, this writer's signing key, who started it."""
        signer = self.sink.signer
        return self.log(
            "policy_loaded",
            policy_path=str(policy.source) if policy.source is not None else None,
            signing_key_id=signer.key_id if signer is not None else None,
            actor=current_actor(current_audit_context().get("key_id")),
            **fields,
        )

    def log_calibration_loaded(
        self, calibration_id: str, *, origin: str, path: str | None = None, previous: str | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Record the calibration relative thresholds use from here on (and the one it replaced)."""
        return self.log(
            "calibration_loaded",
            calibration=calibration_id,
            calibration_path=path,
            origin=origin,
            previous=previous,
            actor=current_actor(current_audit_context().get("key_id")),
            **fields,
        )

    def close(self) -> None:
        self.sink.close()


def _audit_target(policy: Policy, override: str | os.PathLike[str] | None = None) -> str | os.PathLike[str]:
    """``resolve_audit_path`` as given (a trailing ``/``, which ``Path`` drops, says "a trail directory")."""
    if override is not None:
        return override
    return os.environ.get(AUDIT_PATH_ENV) or policy.audit.path


def resolve_audit_path(policy: Policy, override: str | os.PathLike[str] | None = None) -> Path:
    """Where records go: ``override`` (a Guard argument), else ``$MEMGUARD_AUDIT_PATH``, else the policy.

    A directory (or a path ending with ``/``) is a trail of segments, one per writer (``guard.audit.trail``)."""
    return Path(_audit_target(policy, override))
