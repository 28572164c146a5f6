"""The append-only, hash-chained JSONL audit sink: one file, or one writer's segment of a trail directory.

It signs checkpoints through any ``Signer`` (``guard.audit.signing.CheckpointSigner`` is the one memguard
ships) and knows nothing of what a checkpoint holds: it decides when to sign and where the previous
checkpoint is, the signer makes the record.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
import warnings
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .chain import (
    CHAIN_FIELDS,
    GENESIS_HASH,
    SINK_EVENTS,
    AuditWriteError,
    canonical_json,
    last_complete_line,
    record_hash,
)
from .trail import TrailSegment, is_trail_path

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: thread safety only
    fcntl = None  # type: ignore[assignment]

__all__ = ["GENESIS_HASH", "AuditLog", "AuditWriteError", "Signer", "canonical_json", "record_hash"]

_SCAN_CHUNK = 1024 * 1024
#: Signing sinks with records not yet covered by a checkpoint: signed at interpreter exit.
_PENDING: set[AuditLog] = set()
#: Every sink of this process: a forked child drops what it inherited (descriptor, locks, writer id).
_SINKS: weakref.WeakSet[AuditLog] = weakref.WeakSet()
#: One lock per file for all sinks of this process: ``flock`` on a network file system is a POSIX lock, which
#: does not keep two descriptors of one process apart.
_FILE_LOCKS: dict[str, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()


@runtime_checkable
class Signer(Protocol):
    """What a sink needs from whoever signs its chain.

    The sink decides *when* to sign (``count``, ``interval``, ``open``, ``close``, ``exit``) and appends what
    ``seal`` returns as the next chained record; it never looks inside a checkpoint.
    """

    key_id: str
    #: Bytes every line holding one of this signer's checkpoints contains (a cheap filter while scanning).
    marker: bytes

    def is_checkpoint(self, record: Mapping[str, Any]) -> bool:
        """Whether ``record`` is a checkpoint the next one must chain to."""
        ...

    def seal(self, *, head_seq: int, head_hash: str, previous: Mapping[str, Any] | None, reason: str,
             fields: Mapping[str, Any]) -> dict[str, Any]:
        """A checkpoint signing the head ``(head_seq, head_hash)``, chained to ``previous`` (the file's last
        checkpoint as written, or None), with ``fields`` signed into it."""
        ...


def _file_lock(path: Path) -> threading.Lock:
    key = os.path.abspath(path)
    with _FILE_LOCKS_GUARD:
        lock = _FILE_LOCKS.get(key)
        if lock is None:
            lock = _FILE_LOCKS[key] = threading.Lock()
        return lock


class AuditLog:
    """Appends records to a JSONL file as a hash chain: ``seq``, ``prev_hash``, ``hash`` per line.

    Each record is one ``os.write`` of a whole line on an ``O_APPEND`` descriptor, under a thread lock and an
    exclusive ``flock``, so threads and processes sharing the file on one machine never interleave and the
    chain continues across writers and restarts. A log whose last line is incomplete is refused: its chain is
    broken and ``memguard audit verify`` reports where.

    ``path`` naming a directory (it exists, or ends with ``/``; or ``trail=True``) makes a **trail**
    (``guard.audit.trail``): this process appends to ``<dir>/<writer>.jsonl`` only, every record carries
    ``writer``, the segment starts with a ``segment`` record, and checkpoints witness the other segments. That
    is what many processes or machines sharing a network file system should use. ``writer`` fixes the writer
    id (else ``guard.audit.trail.writer_id()``). A forked child continues in its own segment: its writer id is
    new unless it is fixed (``writer``, or ``$MEMGUARD_AUDIT_WRITER`` without ``{pid}`` or ``{random}``), and a
    single file is reopened, so that ``flock`` keeps parent and child apart.

    With ``fsync``, each record is on disk before ``append`` returns; inside ``with log.batch():`` the records
    are written at once and flushed together when the block ends (one ``fsync``), before the caller acts on any.

    With a ``signer``, the sink also appends signed checkpoint records (``docs/audit.md``): after every
    ``checkpoint_every`` records, ``checkpoint_seconds`` after a record that is not yet signed, on ``close()``
    and at interpreter exit; and on opening a log whose last record is not a checkpoint, one that signs the
    head it found. Checkpoints chain to the previous checkpoint in the *file* (found by scanning what other
    writers appended), so any number of signing processes keep one signature chain. ``checkpoint_copy`` names
    a second file (or, for a trail, a directory: one file per writer) every checkpoint is also appended to
    (best effort), to keep them somewhere an editor of the log cannot reach.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        fsync: bool = False,
        signer: Signer | None = None,
        checkpoint_every: int = 100,
        checkpoint_seconds: float = 60.0,
        checkpoint_copy: str | os.PathLike[str] | None = None,
        trail: bool | None = None,
        writer: str | None = None,
    ):
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if not checkpoint_seconds > 0:
            raise ValueError(f"checkpoint_seconds must be > 0, got {checkpoint_seconds}")
        if signer is not None and not isinstance(signer, Signer):
            raise TypeError(f"signer must implement guard.audit.sink.Signer, got {type(signer).__name__}")
        self.fsync = fsync
        self.signer = signer
        self.checkpoint_every = checkpoint_every
        self.checkpoint_seconds = float(checkpoint_seconds)
        self._copy_target = os.fspath(checkpoint_copy) if checkpoint_copy is not None else None
        self.trail_dir = Path(path) if (is_trail_path(path) if trail is None else trail) else None
        self._writer_template = writer
        self.segment: TrailSegment | None = None
        self.path = Path(path)
        self.checkpoint_copy: Path | None = None
        self._reset_state()
        self._bind_segment()
        _SINKS.add(self)
        with self._lock:
            self._ensure_open()

    def _reset_state(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pid = os.getpid()
        self._fd: int | None = None
        self._ino: int | None = None
        self._state: tuple[int, int] | None = None
        self._seq = 0
        self._prev = GENESIS_HASH
        self._cp: dict[str, Any] | None = None
        self._sealed: tuple[int, str] | None = None  # (seq, reason) of the last checkpoint this sink wrote
        self._scanned: tuple[int, int] | None = None
        self._unsigned_since: float | None = None
        self._unsynced = False
        self._timer_pid: int | None = None
        self._timer_generation = getattr(self, "_timer_generation", 0) + 1
        self._wake = threading.Event()

    def _bind_segment(self) -> None:
        """In a trail: this process's segment (a new one after a fork unless the writer id is fixed)."""
        copy = self._copy_target
        if self.trail_dir is None:
            self.checkpoint_copy = Path(copy) if copy is not None else None
            return
        self.segment = TrailSegment(self.trail_dir, self._writer_template)
        self.path = self.segment.path
        if copy is not None and is_trail_path(copy):
            self.checkpoint_copy = Path(copy) / self.path.name
        else:
            self.checkpoint_copy = Path(copy) if copy is not None else None
        if self.checkpoint_copy is not None and \
                os.path.abspath(self.checkpoint_copy.parent) == os.path.abspath(self.trail_dir):
            raise ValueError(f"checkpoint_copy {copy} is inside the trail {self.trail_dir}: it would be read as a "
                             "segment, and it must be somewhere an editor of the trail cannot reach")

    @property
    def writer(self) -> str | None:
        """This sink's writer id in a trail (None for a single file)."""
        return self.segment.writer if self.segment is not None else None

    @property
    def _cp_seq(self) -> int:
        return int(self._cp["seq"]) if self._cp is not None else 0

    def _ensure_open(self) -> None:
        """Open the file if closed; a signing sink then signs the head it found if that is not a checkpoint."""
        if self._pid != os.getpid():  # pragma: no cover - the at-fork hook resets first; a safety net
            _after_fork_in_child()
        if self._fd is not None:
            return
        self._open()
        if self.signer is not None:
            try:
                self._checkpoint_head("open")
            except BaseException:
                self._close_fd()
                raise

    def _open(self) -> None:
        try:
            created = not self.path.parent.exists()
            if created:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644
            )
            if self.fsync and self.trail_dir is not None:
                _fsync_dir(self.path.parent)  # the new segment's name survives a crash too
        except OSError as err:
            raise AuditWriteError(
                err.errno, f"cannot open audit log {self.path}: {err.strerror or err}"
            ) from err
        self._fd = fd
        self._ino = os.fstat(fd).st_ino
        self._state = None

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Chain and write one record; returns it with ``seq``, ``prev_hash`` and ``hash`` filled in (and
        ``writer`` in a trail)."""
        clash = [k for k in (*CHAIN_FIELDS, *(self.segment.stamp() if self.segment else ())) if k in record]
        if clash:
            raise ValueError(f"record must not set fields the sink sets: {clash}")
        if record.get("event") in SINK_EVENTS:
            raise ValueError(f"{record.get('event')} records are written by the sink itself")
        with self._lock:
            self._ensure_open()
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
    def batch(self) -> Iterator[None]:
        """Records this thread appends inside the block are flushed to disk with one ``fsync`` when it ends.

        The write-ahead rule holds for the batch as a whole: act on none of its records before the block has
        ended without an error. Each record is written (``os.write``) at once, so other readers and writers see
        it immediately; only the ``fsync`` is deferred, and only with ``fsync`` on. A flush that fails raises
        ``AuditWriteError`` at the end of the block (then none of the batch's records may be relied on).
        Batches nest (the outermost flushes).
        """
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        try:
            yield
        except BaseException:
            self._local.depth = depth
            if depth == 0:
                try:
                    self.flush()
                except AuditWriteError:
                    pass  # the block's own error is the one to report
            raise
        self._local.depth = depth
        if depth == 0:
            self.flush()

    def flush(self) -> None:
        """``fsync`` what was written and not yet synced (records of a batch); a no-op when nothing waits."""
        with self._lock:
            fd = self._fd
            if not self._unsynced or fd is None:
                return
            self._sync_to_disk(fd)

    def _sync_to_disk(self, fd: int) -> None:
        try:
            os.fsync(fd)
        except OSError as err:
            raise AuditWriteError(f"cannot flush audit log {self.path} to disk: {err}") from err
        self._unsynced = False

    @contextmanager
    def _flocked(self, fd: int) -> Iterator[None]:
        lock = _file_lock(self.path)
        with lock:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _sync(self, fd: int) -> None:
        """Catch up with what other writers appended since this one's last write (under the flock); in a trail,
        an empty segment first gets its ``segment`` record."""
        stat = os.fstat(fd)
        if self._state == (stat.st_size, stat.st_ino):
            return
        self._seq, self._prev = self._read_tail(stat.st_size)
        if self.signer is not None:
            self._sync_checkpoints(stat.st_size, stat.st_ino)
        self._state = (stat.st_size, stat.st_ino)
        if self.segment is not None and self._seq == 0:
            self._write(fd, self.segment.header())

    def _write(self, fd: int, record: Mapping[str, Any]) -> dict[str, Any]:
        assert self._state is not None
        size, ino = self._state
        stamp = self.segment.stamp() if self.segment is not None else {}
        chained = {**record, **stamp, "seq": self._seq + 1, "prev_hash": self._prev}
        try:
            chained["hash"] = record_hash(chained)
            line = (canonical_json(chained) + "\n").encode("utf-8")
        except (TypeError, ValueError) as err:
            raise ValueError(f"record is not JSON-serializable: {err}") from err
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write ({written} of {len(line)} bytes)")
        except OSError as err:
            self._state = None
            raise AuditWriteError(f"cannot write audit log {self.path}: {err}") from err
        self._seq, self._prev = chained["seq"], chained["hash"]
        self._state = (size + len(line), ino)
        if self._scanned == (ino, size):
            self._scanned = (ino, size + len(line))
        if self.fsync:
            self._unsynced = True
            if not getattr(self._local, "depth", 0):
                self._sync_to_disk(fd)
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
        fields = self.segment.checkpoint_fields() if self.segment is not None else {}
        record = self.signer.seal(head_seq=self._seq, head_hash=self._prev, previous=self._cp, reason=reason,
                                  fields=fields)
        chained = self._write(fd, record)
        self._cp, self._unsigned_since, self._sealed = chained, None, (chained["seq"], reason)
        if self.segment is not None:
            self.segment.witnessed(fields.get("witness") or {})
        _PENDING.discard(self)
        if self.checkpoint_copy is not None:
            self._copy_checkpoint(chained)
        return chained

    def _checkpoint_head(self, reason: str) -> dict[str, Any] | None:
        """Sign the head now if it is not already a checkpoint (the caller holds the thread lock). A trail
        segment is always sealed on ``close`` and at ``exit``, even right after another checkpoint: its writer's
        signed word that the segment ends there (``memguard audit verify`` shows it as closed)."""
        fd = self._fd
        if fd is None:
            return None
        with self._flocked(fd):
            self._sync(fd)
            finishing = self.segment is not None and reason in ("close", "exit")
            if self._seq > self._cp_seq or (finishing and self._sealed not in ((self._seq, "close"),
                                                                             (self._seq, "exit"))):
                return self._write_checkpoint(fd, reason)
        return None

    def checkpoint(self, reason: str = "close") -> dict[str, Any] | None:
        """Sign the head now unless it is a checkpoint already; returns the checkpoint written, if any."""
        if self.signer is None:
            raise ValueError("this audit log has no signing key")
        with self._lock:
            self._ensure_open()
            self._reopen_if_replaced()
            return self._checkpoint_head(reason)

    def _copy_checkpoint(self, chained: Mapping[str, Any]) -> None:
        assert self.checkpoint_copy is not None
        try:
            self.checkpoint_copy.parent.mkdir(parents=True, exist_ok=True)
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
                self._cp = None
        if found is not None:
            self._cp = found
        self._scanned = (ino, size)
        if self._seq <= self._cp_seq:
            self._unsigned_since = None
        elif self._unsigned_since is None:
            self._unsigned_since = time.monotonic()

    def _checkpoint_of(self, line: bytes) -> dict[str, Any] | None:
        """The record on ``line`` if it is one of the signer's checkpoints with a chain position."""
        assert self.signer is not None
        if self.signer.marker not in line:
            return None
        try:
            data = json.loads(line)
        except ValueError:
            return None
        if not isinstance(data, dict) or not isinstance(data.get("seq"), int) or not self.signer.is_checkpoint(data):
            return None
        return data

    def _scan_forward(self, start: int, end: int) -> dict[str, Any] | None:
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
                    found = self._checkpoint_of(line) or found
        return found

    def _scan_backward(self, end: int) -> dict[str, Any] | None:
        with self._reader() as handle:
            carry, position = b"", end
            while position > 0:
                start = max(0, position - _SCAN_CHUNK)
                handle.seek(start)
                lines = (handle.read(position - start) + carry).split(b"\n")
                position = start
                carry = lines.pop(0) if start > 0 else b""
                for line in reversed(lines):
                    found = self._checkpoint_of(line)
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

    def _read_tail(self, size: int) -> tuple[int, str]:
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
                last = last_complete_line(handle, size) or b""
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
        """Close the descriptor; records written in a batch and not yet flushed are flushed first."""
        fd = self._fd
        if fd is None:
            return
        try:
            if self._unsynced:
                self._sync_to_disk(fd)
        finally:
            try:
                os.close(fd)
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
            try:
                self._close_fd()
            except AuditWriteError as err:
                warnings.warn(f"memguard: audit log {self.path}: {err}", stacklevel=2)
            _PENDING.discard(self)

    def _forget_after_fork(self) -> None:
        """In a forked child: drop the parent's descriptor, locks, timer and (unless fixed) segment."""
        fd = self._fd
        if fd is not None:
            try:
                os.close(fd)  # the parent's copy stays open; this one would share its flock
            except OSError:
                pass
        self._reset_state()
        self._bind_segment()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        signed = f", signer={self.signer.key_id!r}" if self.signer is not None else ""
        where = f", writer={self.writer!r}" if self.segment is not None else ""
        return f"AuditLog({str(self.path)!r}, fsync={self.fsync}{where}{signed})"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    """Sign what is unsigned, and seal every open signed trail segment, of this process."""
    segments = {s for s in list(_SINKS) if s.segment is not None and s.signer is not None and s._fd is not None}
    for sink in list(_PENDING | segments):
        if sink._pid != os.getpid() or not sink._lock.acquire(timeout=5):
            continue
        try:
            if sink._fd is not None:
                sink._checkpoint_head("exit")
                sink._close_fd()
        except (AuditWriteError, OSError) as err:
            warnings.warn(f"memguard: audit log {sink.path} left unsigned at exit: {err}", stacklevel=1)
        finally:
            sink._lock.release()
        _PENDING.discard(sink)


def _after_fork_in_child() -> None:
    global _FILE_LOCKS_GUARD
    _FILE_LOCKS_GUARD = threading.Lock()
    _FILE_LOCKS.clear()
    _PENDING.clear()
    for sink in list(_SINKS):
        sink._forget_after_fork()


atexit.register(_checkpoint_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
