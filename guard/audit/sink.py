"""The append-only, hash-chained JSONL audit sink."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from guard.errors import MemguardError

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: thread safety only
    fcntl = None  # type: ignore[assignment]

__all__ = ["GENESIS_HASH", "AuditLog", "AuditWriteError", "canonical_json", "record_hash"]

GENESIS_HASH = "0" * 64
_CHAIN_FIELDS = ("seq", "prev_hash", "hash")
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


class AuditLog:
    """Appends records to a JSONL file as a hash chain: ``seq``, ``prev_hash``, ``hash`` per line.

    Each record is one ``os.write`` of a whole line on an ``O_APPEND`` descriptor, under a thread
    lock and an exclusive ``flock``, so threads and processes sharing the file never interleave and
    the chain continues across writers and restarts (the tail is re-read whenever the file changed
    since this writer's last append). A log whose last line is incomplete is refused: its chain is
    broken and ``memguard audit verify`` reports where.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False):
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._ino: int | None = None
        self._state: tuple[int, int] | None = None
        self._seq = 0
        self._prev = GENESIS_HASH
        with self._lock:
            self._open()

    def _open(self) -> None:
        try:
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644
            )
        except OSError as err:
            raise AuditWriteError(
                err.errno, f"cannot open audit log {self.path}: {err.strerror or err}"
            ) from err
        self._fd = fd
        self._ino = os.fstat(fd).st_ino
        self._state = None

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Chain and write one record; returns it with ``seq``, ``prev_hash`` and ``hash`` filled in."""
        clash = [k for k in _CHAIN_FIELDS if k in record]
        if clash:
            raise ValueError(f"record must not set chain fields {clash}")
        with self._lock:
            if self._fd is None:
                self._open()
            self._reopen_if_replaced()
            fd = self._fd
            assert fd is not None
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                stat = os.fstat(fd)
                if self._state != (stat.st_size, stat.st_ino):
                    self._seq, self._prev = self._read_tail(fd, stat.st_size)
                chained = {**record, "seq": self._seq + 1, "prev_hash": self._prev}
                try:
                    chained["hash"] = record_hash(chained)
                    line = (canonical_json(chained) + "\n").encode("utf-8")
                except (TypeError, ValueError) as err:
                    raise ValueError(f"record is not JSON-serializable: {err}") from err
                try:
                    written = os.write(fd, line)
                    if written != len(line):
                        raise OSError(f"short write ({written} of {len(line)} bytes)")
                    if self.fsync:
                        os.fsync(fd)
                except OSError as err:
                    self._state = None
                    raise AuditWriteError(f"cannot write audit log {self.path}: {err}") from err
                self._seq, self._prev = chained["seq"], chained["hash"]
                self._state = (stat.st_size + len(line), stat.st_ino)
                return chained
            finally:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _reopen_if_replaced(self) -> None:
        try:
            same = os.stat(self.path).st_ino == self._ino
        except FileNotFoundError:
            same = False
        except OSError as err:
            raise AuditWriteError(f"cannot stat audit log {self.path}: {err}") from err
        if not same:
            self._close_fd()
            self._open()

    def _read_tail(self, fd: int, size: int) -> tuple[int, str]:
        """``(seq, hash)`` of the last record on disk; genesis for an empty file."""
        if size == 0:
            return 0, GENESIS_HASH
        try:
            with open(self.path, "rb") as handle:
                handle.seek(size - 1)
                if handle.read(1) != b"\n":
                    raise AuditWriteError(
                        f"audit log {self.path} ends with an incomplete line (truncated write?): chain "
                        f"is broken; run `memguard audit verify {self.path}` and rotate the log"
                    )
                end, start, buf = size - 1, size - 1, b""
                while start > 0 and b"\n" not in buf:
                    start = max(0, start - _TAIL_CHUNK)
                    handle.seek(start)
                    buf = handle.read(end - start)
                last = buf.rsplit(b"\n", 1)[-1]
        except OSError as err:
            if isinstance(err, AuditWriteError):
                raise
            raise AuditWriteError(f"cannot read the tail of audit log {self.path}: {err}") from err
        try:
            data = json.loads(last)
            seq, prev = data["seq"], data["hash"]
            if not isinstance(seq, int) or not (isinstance(prev, str) and len(prev) == 64):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise AuditWriteError(
                f"the last line of audit log {self.path} is not a chained record: the chain is broken; "
                f"run `memguard audit verify {self.path}`"
            ) from None
        return seq, prev

    def _close_fd(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            finally:
                self._fd = None
                self._state = None

    def close(self) -> None:
        with self._lock:
            self._close_fd()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AuditLog({str(self.path)!r}, fsync={self.fsync})"
