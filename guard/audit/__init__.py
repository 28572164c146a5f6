"""memguard's audit trail: record schema, hash-chained JSONL sink, structlog logger, verification."""

from .logger import AUDIT_PATH_ENV, AuditLogger, AuditRecordError, open_audit, resolve_audit_path
from .record import (
    AuditRecord,
    ErrorInfo,
    ModelRef,
    Outcome,
    PolicyRef,
    PromptMode,
    build_record,
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
    "AuditLog",
    "AuditLogger",
    "AuditRecord",
    "AuditRecordError",
    "AuditWriteError",
    "ErrorInfo",
    "ModelRef",
    "Outcome",
    "PolicyRef",
    "PromptMode",
    "VerifyReport",
    "build_record",
    "canonical_json",
    "decision_fields",
    "new_request_id",
    "open_audit",
    "protect_prompt",
    "record_hash",
    "resolve_audit_path",
    "utc_timestamp",
    "verify_log",
]
