"""The append-only, hash-chained JSONL audit sink, with signed checkpoints when given a signing key."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guard.errors import MemguardError

if TYPE_CHECKING:
    from .signing import CheckpointSigner

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: thread safety only
    fcntl = None  # type: ignore[assignment]

__all__ = ["GENESIS_HASH", "AuditLog", "AuditWriteError", "canonical_json", "record_hash"]

GENESIS_HASH = "0" * 64
_CHAIN_FIELDS = ("seq", "prev_hash", "hash")
_TAIL_CHUNK = 64 * 1024
_SCAN_CHUNK = 1024 * 1024
#: How a checkpoint line starts its ``event`` field in canonical JSON (a cheap filter before parsing).
_CHECKPOINT_MARK = b'"event":"checkpoint"'
#: Signing sinks with records not yet covered by a checkpoint: signed at interpreter exit.
_PENDING: set[AuditLog] = set()


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

    With a ``signer``, the sink also appends signed checkpoint records (``docs/audit.md``): after every
    ``checkpoint_every`` records, ``checkpoint_seconds`` after a record that is not yet signed, on
    ``close()`` and at interpreter exit; and on opening a log whose last record is not a checkpoint, one
    that signs the head it found. Checkpoints chain to the previous checkpoint in the *file* (found by
    scanning what other writers appended), so any number of signing processes keep one signature chain.
    ``checkpoint_copy`` names a second file every checkpoint is also appended to (best effort), to keep
    them somewhere an editor of the log cannot reach.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = False,
        signer: CheckpointSigner | None = None,
        checkpoint_every: int = 100,
        checkpoint_seconds: float = 60.0,
        checkpoint_copy: str | os.PathLike[str] | None = None,
    ):
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if not checkpoint_seconds > 0:
            raise ValueError(f"checkpoint_seconds must be > 0, got {checkpoint_seconds}")
        self.path = Path(path)
        self.fsync = fsync
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = float(checkpoint_seconds)
        self.checkpoint_copy = Path(checkpoint_copy) if checkpoint_copy is not None else None
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._ino: int | None = None
        self._state: tuple[int, int] | None = None
        self._seq = 0
        self._prev = GENESIS_HASH
        self._cp_seq = 0
        self._cp_sig: str | None = None
        self._scanned: tuple[int, int] | None = None
        self._unsigned_since: float | None = None
        self._timer_pid: int | None = None
        self._timer_generation = 0
        self._wake = threading.Event()
        with self._lock:
            self._open()
            if self.signer is not None:
                try:
                    self._checkpoint_head("open")
                except BaseException:
                    self._close_fd()
                    raise

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
        if record.get("event") == "checkpoint":
            raise ValueError("checkpoint records are written by the sink itself, from its signing key")
        with self._lock:
            if self._fd is None:
                self._open()
            self._reopen_if_replaced()
            fd = self._fd
            assert fd is not None
            with self._flocked(fd):
                self._sync(fd)
                chained = self._write(fd, record)
                if self.signer is not None:
                    self._checkpoint_if_needed(fd)
                return chained

    @contextmanager
    def _flocked(self, fd: int) -> Iterator[None]:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _sync(self, fd: int) -> None:
        """Catch up with what other writers appended since this one's last write (under the flock)."""
        stat = os.fstat(fd)
        if self._state == (stat.st_size, stat.st_ino):
            return
        self._seq, self._prev = self._read_tail(fd, stat.st_size)
        if self.signer is not None:
            self._sync_checkpoints(stat.st_size, stat.st_ino)
        self._state = (stat.st_size, stat.st_ino)

    def _write(self, fd: int, record: Mapping[str, Any]) -> dict[str, Any]:
        assert self._state is not None
        size, ino = self._state
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
        self._state = (size + len(line), ino)
        if self._scanned == (ino, size):
            self._scanned = (ino, size + len(line))
        return chained

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_if_needed(self, fd: int) -> None:
        """After a record is on disk: sign now if due, else make sure the timer will. A checkpoint that cannot
        be written does not fail the record (it is written); it is retried with the next record or tick."""
        unsigned = self._seq - self._cp_seq
        if unsigned <= 0:
            return
        now = time.monotonic()
        if self._unsigned_since is None:
            self._unsigned_since = now
        _PENDING.add(self)
        self._arm_timer()
        due = now - self._unsigned_since >= self.checkpoint_seconds
        if unsigned < self.checkpoint_every and not due:
            return
        try:
            self._write_checkpoint(fd, "count" if unsigned >= self.checkpoint_every else "interval")
        except (AuditWriteError, OSError) as err:
            from guard.events import log_event

            warnings.warn(f"memguard: audit log {self.path}: checkpoint not written, records after seq "
                          f"{self._cp_seq} stay unsigned for now: {err}", stacklevel=3)
            log_event("audit_checkpoint_failed", level="error", path=str(self.path), error=str(err))

    def _write_checkpoint(self, fd: int, reason: str) -> dict[str, Any]:
        assert self.signer is not None
        record = self.signer.checkpoint(signed_seq=self._seq, signed_hash=self._prev,
                                        prev_checkpoint_seq=self._cp_seq, prev_signature=self._cp_sig, reason=reason)
        chained = self._write(fd, record)
        self._cp_seq, self._cp_sig, self._unsigned_since = chained["seq"], record["signature"], None
        _PENDING.discard(self)
        if self.checkpoint_copy is not None:
            self._copy_checkpoint(chained)
        return chained

    def _checkpoint_head(self, reason: str) -> dict[str, Any] | None:
        """Sign the head now if it is not already a checkpoint (the caller holds the thread lock)."""
        fd = self._fd
        if fd is None:
            return None
        with self._flocked(fd):
            self._sync(fd)
            if self._seq > self._cp_seq:
                return self._write_checkpoint(fd, reason)
        return None

    def checkpoint(self, reason: str = "close") -> dict[str, Any] | None:
        """Sign the head now unless it is a checkpoint already; returns the checkpoint written, if any."""
        if self.signer is None:
            raise ValueError("this audit log has no signing key")
        with self._lock:
            if self._fd is None:
                self._open()
            self._reopen_if_replaced()
            return self._checkpoint_head(reason)

    def _copy_checkpoint(self, chained: Mapping[str, Any]) -> None:
        assert self.checkpoint_copy is not None
        try:
            fd = os.open(self.checkpoint_copy, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0),
                         0o644)
            try:
                os.write(fd, (canonical_json(chained) + "\n").encode("utf-8"))
            finally:
                os.close(fd)
        except OSError as err:
            from guard.events import log_event

            warnings.warn(f"memguard: checkpoint seq {chained['seq']} not copied to {self.checkpoint_copy}: {err}",
                          stacklevel=2)
            log_event("audit_checkpoint_copy_failed", level="error", path=str(self.checkpoint_copy), error=str(err))

    def _due_in(self) -> float | None:
        since = self._unsigned_since
        return None if since is None else since + self.checkpoint_seconds - time.monotonic()

    def _interval_checkpoint(self) -> None:
        """The timer's turn: sign the head if a record has waited ``checkpoint_seconds`` unsigned."""
        with self._lock:
            fd = self._fd
            due = self._due_in()
            if fd is None or due is None or due > 0:
                return
            try:
                with self._flocked(fd):
                    self._sync(fd)
                    due = self._due_in()
                    if self._seq > self._cp_seq and due is not None and due <= 0:
                        self._write_checkpoint(fd, "interval")
            except (AuditWriteError, OSError) as err:
                from guard.events import log_event

                self._unsigned_since = time.monotonic()  # try again one interval later
                log_event("audit_checkpoint_failed", level="error", path=str(self.path), error=str(err))

    def _arm_timer(self) -> None:
        if self._timer_pid == os.getpid():
            return
        self._timer_pid = os.getpid()
        self._wake.clear()
        thread = threading.Thread(target=_interval_loop, args=(weakref.ref(self), self._timer_generation),
                                  name="memguard-audit-checkpoint", daemon=True)
        thread.start()

    def _stop_timer(self) -> None:
        self._timer_generation += 1
        self._timer_pid = None
        self._wake.set()

    def _sync_checkpoints(self, size: int, ino: int) -> None:
        """Find the file's last checkpoint: in what was appended since the last scan, else from the end back."""
        previous = self._scanned
        if previous is not None and previous[0] == ino and previous[1] <= size:
            found = self._scan_forward(previous[1], size)
        else:
            found = self._scan_backward(size)
            if found is None:
                self._cp_seq, self._cp_sig = 0, None
        if found is not None:
            self._cp_seq, self._cp_sig = found
        self._scanned = (ino, size)
        if self._seq <= self._cp_seq:
            self._unsigned_since = None
        elif self._unsigned_since is None:
            self._unsigned_since = time.monotonic()

    def _scan_forward(self, start: int, end: int) -> tuple[int, str] | None:
        found = None
        with self._reader() as handle:
            handle.seek(start)
            carry, position = b"", start
            while position < end:
                chunk = handle.read(min(_SCAN_CHUNK, end - position))
                if not chunk:
                    break
                position += len(chunk)
                lines = (carry + chunk).split(b"\n")
                carry = lines.pop()
                for line in lines:
                    found = _checkpoint_of(line) or found
        return found

    def _scan_backward(self, end: int) -> tuple[int, str] | None:
        with self._reader() as handle:
            carry, position = b"", end
            while position > 0:
                start = max(0, position - _SCAN_CHUNK)
                handle.seek(start)
                lines = (handle.read(position - start) + carry).split(b"\n")
                position = start
                carry = lines.pop(0) if start > 0 else b""
                for line in reversed(lines):
                    found = _checkpoint_of(line)
                    if found is not None:
                        return found
        return None

    @contextmanager
    def _reader(self) -> Iterator[Any]:
        try:
            with open(self.path, "rb") as handle:
                yield handle
        except OSError as err:
            if isinstance(err, AuditWriteError):
                raise
            raise AuditWriteError(f"cannot read audit log {self.path} for its last checkpoint: {err}") from err

    # ------------------------------------------------------------------ files

    def _reopen_if_replaced(self) -> None:
        try:
            same = os.stat(self.path).st_ino == self._ino
        except FileNotFoundError:
            same = False
        except OSError as err:
            raise AuditWriteError(f"cannot stat audit log {self.path}: {err}") from err
        if not same:
            self._sign_replaced_file()
            self._close_fd()
            self._open()

    def _sign_replaced_file(self) -> None:
        """Before following a rotated (renamed) log to its new file, sign what this writer left in the old one."""
        fd = self._fd
        if self.signer is None or fd is None or self._seq <= self._cp_seq:
            return
        try:
            with self._flocked(fd):
                stat = os.fstat(fd)
                if self._state == (stat.st_size, stat.st_ino):
                    self._write_checkpoint(fd, "close")
        except (AuditWriteError, OSError) as err:
            warnings.warn(f"memguard: the replaced audit log was not signed at its end: {err}", stacklevel=3)

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

    def close(self, *, reason: str = "close") -> None:
        """Sign the head (with a signing key) and close the file; appending again reopens it.

        A checkpoint that cannot be written is a warning, not an error: the records stay on disk, unsigned.
        """
        with self._lock:
            if self.signer is not None and self._fd is not None:
                try:
                    self._reopen_if_replaced()
                    self._checkpoint_head(reason)
                except (AuditWriteError, OSError) as err:
                    warnings.warn(f"memguard: audit log {self.path} closed without a final checkpoint: {err}",
                                  stacklevel=2)
            self._stop_timer()
            self._close_fd()
            _PENDING.discard(self)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        signed = f", signer={self.signer.key_id!r}" if self.signer is not None else ""
        return f"AuditLog({str(self.path)!r}, fsync={self.fsync}{signed})"


def _checkpoint_of(line: bytes) -> tuple[int, str] | None:
    """``(seq, signature)`` if ``line`` is a checkpoint record."""
    if _CHECKPOINT_MARK not in line:
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("event") != "checkpoint":
        return None
    seq, signature = data.get("seq"), data.get("signature")
    if not isinstance(seq, int) or not isinstance(signature, str):
        return None
    return seq, signature


def _interval_loop(ref: weakref.ref[AuditLog], generation: int) -> None:
    """One per signing sink and process: wakes when the oldest unsigned record is due to be signed."""
    while True:
        sink = ref()
        if sink is None or sink._timer_generation != generation:
            return
        due, wake, period = sink._due_in(), sink._wake, sink.checkpoint_seconds
        del sink
        wake.wait(period if due is None else max(due, 0.0) + 0.001)
        sink = ref()
        if sink is None or sink._timer_generation != generation:
            return
        sink._interval_checkpoint()
        del sink


def _checkpoint_at_exit() -> None:
    for sink in list(_PENDING):
        if not sink._lock.acquire(timeout=5):
            continue
        try:
            if sink._fd is not None:
                sink._checkpoint_head("exit")
        except (AuditWriteError, OSError) as err:
            warnings.warn(f"memguard: audit log {sink.path} left unsigned at exit: {err}", stacklevel=1)
        finally:
            sink._lock.release()
        _PENDING.discard(sink)


atexit.register(_checkpoint_at_exit)
