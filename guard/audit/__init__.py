"""memguard's audit trail: record schema, hash-chained JSONL sink with signed checkpoints (one file, or one
segment per writer in a trail directory), structlog logger, verification, and reading many writers as one.

Modules, bottom up (none imports one above it): ``chain`` (serialization, hashing, the write error), ``trail``
(segments, writer ids, reading merged by time), ``signing`` (keys, checkpoints), ``sink`` (writing), ``verify``
and ``trail_verify`` (checking), ``record``, ``logger``, ``drift``, ``review``, ``report``.
"""

from .chain import SINK_EVENTS
from .logger import (
    AUDIT_PATH_ENV,
    AuditLogger,
    AuditRecordError,
    audit_context,
    current_audit_context,
    resolve_audit_path,
)
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
from .signing import (
    SIGNING_KEY_ENV,
    CheckpointSigner,
    KeyFileError,
    KeyRing,
    SigningKeyError,
    generate_keypair,
    load_private_key,
    load_public_key,
)
from .sink import GENESIS_HASH, AuditLog, AuditWriteError, Signer, canonical_json, record_hash
from .trail import (
    TRAIL_ENV,
    WRITER_ENV,
    Segment,
    TrailStats,
    iter_trail,
    list_segments,
    read_trail,
    writer_id,
)
from .trail_verify import TrailProblem, TrailReport, load_trail_anchors, verify_trail
from .verify import VerifyReport, load_anchors, verify_log

__all__ = [
    "AUDIT_PATH_ENV",
    "GENESIS_HASH",
    "RECORD_MODELS",
    "SIGNING_KEY_ENV",
    "SINK_EVENTS",
    "TRAIL_ENV",
    "WRITER_ENV",
    "AuditLog",
    "AuditLogger",
    "AuditRecordError",
    "AuditWriteError",
    "CheckpointSigner",
    "DecisionOutcome",
    "DecisionRecord",
    "ErrorInfo",
    "KeyFileError",
    "KeyRing",
    "ModelRef",
    "Outcome",
    "OutcomeRecord",
    "PolicyRef",
    "PromptMode",
    "Segment",
    "Signer",
    "SigningKeyError",
    "TrailProblem",
    "TrailReport",
    "TrailStats",
    "VerifyReport",
    "audit_context",
    "canonical_json",
    "current_audit_context",
    "decision_fields",
    "generate_keypair",
    "iter_trail",
    "list_segments",
    "load_anchors",
    "load_private_key",
    "load_public_key",
    "load_trail_anchors",
    "new_request_id",
    "protect_prompt",
    "read_trail",
    "record_hash",
    "resolve_audit_path",
    "utc_timestamp",
    "verify_log",
    "verify_trail",
    "writer_id",
]
