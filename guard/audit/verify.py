"""Verifying an audit log's hash chain, streaming (constant memory)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .sink import GENESIS_HASH, record_hash

__all__ = ["VerifyReport", "verify_log"]


@dataclass(frozen=True)
class VerifyReport:
    """The result of checking a log: ``ok``, or the first bad line (1-based) and why.

    ``n_records`` counts the records verified intact before the first bad line.
    """

    path: str
    ok: bool
    n_records: int
    first_bad_line: int | None = None
    reason: str | None = None
    last_hash: str | None = None

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if self.ok:
            return f"{self.path}: intact, {self.n_records} records"
        return f"{self.path}: line {self.first_bad_line}: {self.reason}"


def verify_log(path: str | os.PathLike[str]) -> VerifyReport:
    """Check every line of a log: complete, JSON, its own hash, and chained to the line before.

    Detects edited records (hash mismatch), deleted, reordered or inserted records (seq or
    prev_hash mismatch), a line cut off mid-write (no final newline) and garbage lines.
    Raises ``OSError`` if the file cannot be read.
    """
    name = str(path)
    prev_hash, prev_seq, count = GENESIS_HASH, 0, 0

    def bad(line_no: int, reason: str) -> VerifyReport:
        return VerifyReport(name, False, count, line_no, reason, prev_hash if count else None)

    with Path(path).open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                return bad(line_no, "incomplete last line (no newline): truncated mid-write")
            if not raw.strip():
                return bad(line_no, "empty line")
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return bad(line_no, "not valid JSON")
            if not isinstance(record, dict):
                return bad(line_no, "not a JSON object")
            missing = [k for k in ("seq", "prev_hash", "hash") if k not in record]
            if missing:
                return bad(line_no, f"missing chain field(s) {', '.join(missing)}")
            if record_hash(record) != record["hash"]:
                return bad(line_no, "hash mismatch: record edited")
            seq = record["seq"]
            if seq != prev_seq + 1:
                what = (
                    "record(s) deleted"
                    if isinstance(seq, int) and seq > prev_seq + 1
                    else "records reordered"
                )
                return bad(line_no, f"seq {seq} follows seq {prev_seq}: {what}")
            if record["prev_hash"] != prev_hash:
                where = "the genesis hash" if line_no == 1 else f"the hash of line {line_no - 1}"
                return bad(line_no, f"prev_hash is not {where}: records deleted, reordered or inserted")
            prev_hash, prev_seq, count = record["hash"], seq, count + 1
    return VerifyReport(name, True, count, None, None, prev_hash if count else None)
