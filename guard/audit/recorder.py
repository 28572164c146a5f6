"""The records of one guard's requests: every record the core writes goes through here.

A request leaves two records per prompt: its **decision** before anything acts on it (write-ahead: on disk, and
fsynced when the policy says so, before ``judge`` returns) and its **outcome** after (chained to the decision
record by its ``seq`` and ``hash``). The recorder also opens the log on first use (writing ``policy_loaded``),
and writes the calibration events of the guard's life. It never decides anything: a failure to write is
returned to the core as a message, and the core decides what that means (``on_error``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from guard.events import log_event
from guard.policy import Decision, Policy, RewriteResult
from guard.scoring import Measurement

from .logger import AuditLogger
from .record import DecisionOutcome, Outcome

__all__ = ["AuditUnavailable", "RequestRecorder"]


class AuditUnavailable(Exception):
    """The log could not take a record; ``str()`` says why (the core turns it into ``on_error``)."""


class RequestRecorder:
    """Writes one guard's records to its audit log (opened on first use, retried while it cannot be).

    Args:
        policy: the guard's policy (its ``audit`` settings; named in every record).
        path: the log's path, overriding ``$MEMGUARD_AUDIT_PATH`` and the policy's.
        model_id, model_class: the model's name in every record.
        source: the front end's name in every record (``python``, ``service``, ``comfyui``, ``cli``).
    """

    def __init__(self, policy: Policy, *, path: str | os.PathLike | None, model_id: str | None,
                 model_class: str | None, source: str) -> None:
        self.policy = policy
        self.path = path
        self.model_id = model_id
        self.model_class = model_class
        self.source = source
        self._logger: AuditLogger | None = None
        self._writer: str | None = None
        self._lock = threading.RLock()

    @property
    def logger(self) -> AuditLogger:
        """The audit logger; raises what opening it raises (``AuditWriteError``, ``SigningKeyError``, ...).

        A ``policy_loaded`` record opens every chain this guard writes to: the log itself, and in a trail each
        writer's segment (a forked worker writes a segment of its own, which then starts with it too)."""
        with self._lock:
            if self._logger is None:
                self._logger = AuditLogger.for_policy(self.policy, path=self.path, model_id=self.model_id,
                                                      model_class=self.model_class)
                self._writer = None
            writer = self._logger.sink.writer or ""
            if self._writer != writer:
                try:
                    self._logger.log_policy_loaded(self.policy, source=self.source)
                except BaseException:
                    self._logger.close()
                    self._logger = None
                    raise
                self._writer = writer
            return self._logger

    def decisions(
        self, request_id: str, decisions: Sequence[Decision], prompts: Sequence[str | None], *,
        outcome: DecisionOutcome, latency_scoring_ms: float | None, context: Mapping[str, Any],
        measurement: Measurement | None,
    ) -> dict[int, dict[str, Any]]:
        """One decision record per prompt, each as written (with ``seq`` and ``hash``), by prompt index.

        Raises ``AuditUnavailable`` when any record could not be written, whatever the cause (an unwritable
        file, a record the schema refuses, a signing failure): the records before it may be on disk, so the
        caller must not act on any of these decisions.
        """
        measured = measurement.compared() if measurement is not None else None
        written: dict[int, dict[str, Any]] = {}
        try:
            logger = self.logger
            with logger.batch():  # one fsync for the request's records, all on disk before any is acted on
                for decision in decisions:
                    written[decision.prompt_index] = logger.log_decision(
                        decision, prompt=prompts[decision.prompt_index], outcome=outcome, request_id=request_id,
                        latency_scoring_ms=latency_scoring_ms, source=self.source, context=dict(context),
                        measurement=measured if decision.score is not None else None,
                    )
        except Exception as error:
            raise AuditUnavailable(f"audit log not writable: {type(error).__name__}: {error}") from error
        return written

    def outcomes(
        self, request_id: str, decisions: Sequence[Decision], outcomes: Mapping[int, Outcome], *,
        written: Mapping[int, Mapping[str, Any]], rewrites: Mapping[int, RewriteResult],
        latency_generation_ms: float | None, errors: Mapping[int, Mapping[str, str]], context: Mapping[str, Any],
    ) -> None:
        """One outcome record per prompt, chained to its decision record (``written``). The action taken is the
        decision's as it stands now (a rewrite that fell back names its fallback, and says why); ``errors`` names
        what failed while acting on a prompt (``{type, message}``)."""
        try:
            logger = self.logger
            with logger.batch():
                for decision in decisions:
                    self._outcome(logger, request_id, decision, outcomes, written, rewrites, latency_generation_ms,
                                  errors, context)
        except Exception as failure:
            raise AuditUnavailable(f"outcome not audited: {type(failure).__name__}: {failure}") from failure

    def _outcome(self, logger: AuditLogger, request_id: str, decision: Decision, outcomes: Mapping[int, Outcome],
                 written: Mapping[int, Mapping[str, Any]], rewrites: Mapping[int, RewriteResult],
                 latency_generation_ms: float | None, errors: Mapping[int, Mapping[str, str]],
                 context: Mapping[str, Any]) -> None:
        index = decision.prompt_index
        record = written.get(index)
        changed = record is not None and record.get("action") != decision.action
        rewrite = rewrites.get(index)
        error = errors.get(index)
        logger.log_outcome(
            request_id=request_id, prompt_index=index, action=decision.action, outcome=outcomes[index],
            decision_record=record, reason=decision.reason if changed or error is not None else None,
            latency_generation_ms=latency_generation_ms, error=error, source=self.source,
            context=dict(context), extras={"mitigation": rewrite.to_dict()} if rewrite is not None else {},
        )

    def event(self, kind: str, fields: Mapping[str, Any]) -> None:
        """Any other record (the monitor's calibration findings); a failure is logged, never raised."""
        try:
            self.logger.log(kind, source=self.source, **fields)
        except Exception as error:
            log_event("audit_unwritable", level="error", event_kind=kind, error=f"{type(error).__name__}: {error}")

    def calibration_loaded(self, calibration_id: str, *, origin: str, path: str | None,
                           previous: str | None) -> None:
        """The calibration relative thresholds use from here on; a failure is logged, never raised (the decisions
        that follow report an unwritable log)."""
        try:
            self.logger.log_calibration_loaded(calibration_id, origin=origin, path=path, previous=previous,
                                               source=self.source)
        except Exception as error:
            log_event("audit_unwritable", level="error", event_kind="calibration_loaded",
                      error=f"{type(error).__name__}: {error}")

    def close(self) -> None:
        """Close the log (a signing log gets its final checkpoint); it reopens on the next record."""
        with self._lock:
            if self._logger is not None:
                self._logger.close()
                self._logger = None
