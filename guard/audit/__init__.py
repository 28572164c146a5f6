"""memguard's audit trail: record schema, hash-chained JSONL sink, structlog logger, verification."""

from .logger import AUDIT_PATH_ENV, AuditLogger, AuditRecordError, resolve_audit_path
from .record import (
    RECORD_MODELS,
    DecisionOutcome,
    DecisionRecord,
    ErrorInfo,
    ModelRef,
    Outcome,
    OutcomeRecord,
    PolicyRef,
    PromptMode,
    decision_fields,
    new_request_id,
    protect_prompt,
    utc_timestamp,
)
from .sink import GENESIS_HASH, AuditLog, AuditWriteError, canonical_json, record_hash
from .verify import VerifyReport, verify_log

__all__ = [
    "AUDIT_PATH_ENV",
    "GENESIS_HASH",
    "RECORD_MODELS",
    "AuditLog",
    "AuditLogger",
    "AuditRecordError",
    "AuditWriteError",
    "DecisionOutcome",
    "DecisionRecord",
    "ErrorInfo",
    "ModelRef",
    "Outcome",
    "OutcomeRecord",
    "PolicyRef",
    "PromptMode",
    "VerifyReport",
    "canonical_json",
    "decision_fields",
    "new_request_id",
    "protect_prompt",
    "record_hash",
    "resolve_audit_path",
    "utc_timestamp",
    "verify_log",
]
