"""The hash chain every audit file is: how a record is serialized and hashed, and the error a write raises.

The bottom of ``guard.audit``: the sink (writing), the signer (checkpoints), the trail (segments) and the
verifier (reading) all build on these, and this module imports none of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, BinaryIO

from guard.errors import MemguardError

__all__ = [
    "CHAIN_FIELDS",
    "GENESIS_HASH",
    "SINK_EVENTS",
    "AuditWriteError",
    "canonical_json",
    "last_complete_line",
    "record_hash",
    "utc_timestamp",
]

GENESIS_HASH = "0" * 64
#: The fields the sink adds to every record (callers must not set them).
CHAIN_FIELDS = ("seq", "prev_hash", "hash")
#: Events only a sink writes: its signer's checkpoints and, in a trail, each segment's first record.
SINK_EVENTS = frozenset({"checkpoint", "segment"})
_TAIL_CHUNK = 64 * 1024


class AuditWriteError(MemguardError, OSError):
    """The audit log could not be written; the guard then applies the policy's ``on_error``."""


def canonical_json(data: Mapping[str, Any]) -> str:
    """The one serialization records are hashed and written in (sorted keys, no spaces, UTF-8)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 of a record's canonical JSON without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def last_complete_line(handle: BinaryIO, size: int) -> bytes | None:
    """The last newline-terminated line among the first ``size`` bytes of ``handle`` (without its newline).

    None when there is none. Bytes after the last newline (a line still being written by another process, or
    cut off) are ignored: what callers want is the last record that is whole.
    """
    end = size
    while end > 0:  # find the last newline at or before ``size``
        start = max(0, end - _TAIL_CHUNK)
        handle.seek(start)
        chunk = handle.read(end - start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            end = start + cut
            break
        end = start
    else:
        return None
    pieces: list[bytes] = []
    position = end
    while position > 0:  # back from that newline to the one before it
        start = max(0, position - _TAIL_CHUNK)
        handle.seek(start)
        chunk = handle.read(position - start)
        cut = chunk.rfind(b"\n")
        if cut >= 0:
            pieces.append(chunk[cut + 1:])
            break
        pieces.append(chunk)
        position = start
    return b"".join(reversed(pieces))


def utc_timestamp() -> str:
    """Now, as UTC ISO 8601 with microseconds and a ``Z``: every record's ``timestamp`` (sorts as text)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
