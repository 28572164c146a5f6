"""An audit trail of many writers: one directory, one segment (its own hash chain) per writer.

Many guard processes (service replicas, Celery or Ray workers, machines) cannot safely append to one shared
file on a network file system, where ``flock`` and ``O_APPEND`` cannot be trusted. In a trail each writer
appends only to ``<dir>/<writer-id>.jsonl``, a hash chain of its own with its own signed checkpoints, and
every record carries ``writer``. The first record of each segment (``event: "segment"``) names the trail
and the writer, and it and every checkpoint **witness** the other segments: the ``[seq, hash]`` of the last
whole record each other segment had at that moment. A witness signed by a checkpoint fixes that segment's
records up to that point, so ``verify_trail`` can say that a segment is missing or was cut back or rewritten
(``docs/audit.md`` says against whom that holds).

Readers treat the segments as one trail: ``read_trail`` yields the records of any number of directories
and files merged by time, each segment in its own order.
"""

from __future__ import annotations

import errno
import heapq
import json
import os
import re
import secrets
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chain import last_complete_line, utc_timestamp

__all__ = [
    "SEGMENT_EVENT",
    "SEGMENT_SUFFIX",
    "TRAIL_ENV",
    "WRITER_ENV",
    "Segment",
    "SegmentTally",
    "TrailPaths",
    "TrailSegment",
    "TrailStats",
    "check_writer_id",
    "is_trail_path",
    "iter_trail",
    "list_segments",
    "read_trail",
    "writer_id",
    "writer_of",
]

#: The writer id of this process (a template: ``{host}``, ``{pid}`` and ``{random}`` are filled in).
WRITER_ENV = "MEMGUARD_AUDIT_WRITER"
#: The trail's name in segment headers and checkpoints (default: the trail directory's name).
TRAIL_ENV = "MEMGUARD_AUDIT_TRAIL"
DEFAULT_WRITER = "{host}-{pid}-{random}"
SEGMENT_SUFFIX = ".jsonl"
SEGMENT_EVENT = "segment"
SEGMENT_VERSION = 1
_WRITER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_IDS: dict[tuple[int, str], str] = {}

#: What readers take: a trail directory, a segment or log file, or several of either.
TrailPaths = str | os.PathLike[str] | Iterable[str | os.PathLike[str]]


def check_writer_id(text: str) -> str:
    """``text`` if it can name a segment file, else ``ValueError`` saying what a writer id may contain."""
    if not isinstance(text, str) or not _WRITER_RE.fullmatch(text):
        raise ValueError(f"not an audit writer id: {text!r} (1 to 128 letters, digits, '.', '_' or '-', not "
                         f"starting with '.' or '-')")
    return text


def writer_id(template: str | None = None) -> str:
    """This process's writer id: ``template``, else ``$MEMGUARD_AUDIT_WRITER``, else ``{host}-{pid}-{random}``.

    The same for every call in one process (so all of its guards share one segment), and a new one in a forked
    child when the template has ``{pid}`` or ``{random}`` (a worker pool's children each get their own). A
    fixed id (``MEMGUARD_AUDIT_WRITER=replica-3``) continues the same segment across restarts.
    """
    template = template or os.environ.get(WRITER_ENV) or DEFAULT_WRITER
    key = (os.getpid(), template)
    known = _IDS.get(key)
    if known is None:
        host = _UNSAFE.sub("-", socket.gethostname()).strip(".-") or "host"
        try:
            text = template.format(host=host, pid=os.getpid(), random=secrets.token_hex(3))
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"audit writer id template {template!r} ({WRITER_ENV}): {error!r}; it may use "
                             "{host}, {pid} and {random}") from None
        known = _IDS[key] = check_writer_id(text)
    return known


def is_trail_path(path: str | os.PathLike[str]) -> bool:
    """Whether an audit path names a trail directory: it ends with a path separator, or is a directory."""
    text = os.fspath(path)
    return text.endswith(("/", os.sep)) or os.path.isdir(text)


def trail_name(directory: Path) -> str:
    """The name segment headers and checkpoints give the trail: ``$MEMGUARD_AUDIT_TRAIL``, else the folder name."""
    name = os.environ.get(TRAIL_ENV) or directory.resolve().name or "trail"
    return name


@dataclass(frozen=True)
class Segment:
    """One file of a trail: a hash chain of its own, written by the writer its name says."""

    path: Path
    writer: str

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> Segment:
        path = Path(path)
        name = path.name
        return cls(path, name[: -len(SEGMENT_SUFFIX)] if name.endswith(SEGMENT_SUFFIX) else path.stem)

    def __str__(self) -> str:
        return str(self.path)


def _each(paths: TrailPaths) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def list_segments(paths: TrailPaths) -> list[Segment]:
    """The segments that directories (their ``*.jsonl`` files) and files name, each once, in the order given.

    Raises ``FileNotFoundError`` (naming it) for a path that does not exist or a directory without segments.
    """
    found: list[Segment] = []
    seen: set[Path] = set()
    for path in _each(paths):
        if path.is_dir():
            members = sorted(p for p in path.iterdir() if p.name.endswith(SEGMENT_SUFFIX) and
                             not p.name.startswith(".") and p.is_file())
            if not members:
                raise FileNotFoundError(errno.ENOENT, f"no audit segments (*{SEGMENT_SUFFIX}) in directory",
                                        str(path))
        elif path.exists():
            members = [path]
        else:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        for member in members:
            key = member.resolve()
            if key not in seen:
                seen.add(key)
                found.append(Segment.of(member))
    return found


def writer_of(record: dict[str, Any], segment: Segment | None = None) -> str | None:
    """Who wrote ``record``: its ``writer`` (trail segments), else the file it came from (single-file logs, whose
    names need not differ: two hosts' ``audit.jsonl``)."""
    writer = record.get("writer")
    if isinstance(writer, str):
        return writer
    return str(segment.path) if segment is not None else None


# ---------------------------------------------------------------------------------------------------- writing


class TrailSegment:
    """The segment this process appends to in a trail directory, and what it witnesses of the other segments.

    The sink asks it for three things: the fields every record carries (``stamp``), the first record of a new
    segment (``header``) and the fields a checkpoint adds (``checkpoint_fields``): trail, writer and the heads of
    the segments that changed since this writer last witnessed them.
    """

    def __init__(self, directory: str | os.PathLike[str], writer: str | None = None,
                 trail: str | None = None) -> None:
        self.directory = Path(directory)
        self.writer = check_writer_id(writer) if writer is not None else writer_id()
        self.trail = trail or trail_name(self.directory)
        self.path = self.directory / f"{self.writer}{SEGMENT_SUFFIX}"
        self._stat: dict[str, tuple[int, int, int]] = {}
        self._head: dict[str, list[Any]] = {}
        self._witnessed: dict[str, list[Any]] = {}

    def stamp(self) -> dict[str, Any]:
        """What the sink adds to every record of this segment."""
        return {"writer": self.writer}

    def header(self) -> dict[str, Any]:
        """The first record of a new segment: the trail, the writer, its process, and every other segment's head."""
        heads = self.heads(changed_only=False)
        record = {"event": SEGMENT_EVENT, "v": SEGMENT_VERSION, "timestamp": utc_timestamp(), "trail": self.trail,
                  "process": {"pid": os.getpid(), "host": socket.gethostname()}, "witness": heads}
        return record

    def checkpoint_fields(self) -> dict[str, Any]:
        """Signed into each checkpoint: the trail, the writer, and the heads that changed since the last witness."""
        return {"trail": self.trail, "writer": self.writer, "witness": self.heads(changed_only=True)}

    def witnessed(self, claims: dict[str, list[Any]]) -> None:
        """The sink wrote ``claims``: later witnesses leave out heads that have not moved since."""
        self._witnessed.update(claims)

    def heads(self, *, changed_only: bool) -> dict[str, list[Any]]:
        """``{writer: [seq, hash]}`` of the last whole record of every other segment in the directory (only those
        not yet witnessed as they are now, with ``changed_only``). Unreadable segments are left out: the verifier
        reports them."""
        out: dict[str, list[Any]] = {}
        try:
            entries = sorted((e for e in os.scandir(self.directory) if e.name.endswith(SEGMENT_SUFFIX)
                              and not e.name.startswith(".")), key=lambda e: e.name)
        except OSError:
            return out
        for entry in entries:
            writer = entry.name[: -len(SEGMENT_SUFFIX)]
            if writer == self.writer:
                continue
            head = self._read_head(entry, writer)
            if head is not None and (not changed_only or self._witnessed.get(writer) != head):
                out[writer] = head
        return out

    def _read_head(self, entry: os.DirEntry[str], writer: str) -> list[Any] | None:
        """``[seq, hash]`` of a segment's last whole record; re-read only when its size or time changed."""
        try:
            stat = entry.stat()
            key = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if self._stat.get(writer) == key:
                return self._head.get(writer)
            with open(entry.path, "rb") as handle:
                line = last_complete_line(handle, stat.st_size)
        except OSError:
            return None
        head = None
        if line:
            try:
                data = json.loads(line)
                if isinstance(data, dict) and isinstance(data.get("seq"), int) and isinstance(data.get("hash"), str):
                    head = [data["seq"], data["hash"]]
            except ValueError:
                head = None
        self._stat[writer] = key
        if head is None:
            self._head.pop(writer, None)
        else:
            self._head[writer] = head
        return head

    def __repr__(self) -> str:
        return f"TrailSegment({str(self.path)!r}, trail={self.trail!r})"


# ---------------------------------------------------------------------------------------------------- reading


@dataclass
class SegmentTally:
    """What reading one segment saw: lines, records, unreadable lines, first and last time."""

    lines: int = 0
    records: int = 0
    unreadable: int = 0
    first: str | None = None
    last: str | None = None


@dataclass
class TrailStats:
    """What ``read_trail`` saw, per segment and in all (filled in as records are read)."""

    segments: list[Segment] = field(default_factory=list)
    per_segment: dict[Path, SegmentTally] = field(default_factory=dict)

    @property
    def lines(self) -> int:
        return sum(t.lines for t in self.per_segment.values())

    @property
    def records(self) -> int:
        return sum(t.records for t in self.per_segment.values())

    @property
    def unreadable(self) -> int:
        return sum(t.unreadable for t in self.per_segment.values())


def _records(segment: Segment, tally: SegmentTally) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(time, record)`` for each readable line; a record without a time sorts with the record before it."""
    stamp = ""
    loads = json.loads
    with segment.path.open("rb") as handle:
        for raw in handle:
            tally.lines += 1
            try:
                record = loads(raw)
            except ValueError:
                tally.unreadable += 1
                continue
            if not isinstance(record, dict):
                tally.unreadable += 1
                continue
            tally.records += 1
            value = record.get("timestamp")
            if isinstance(value, str) and value:
                stamp = value
                if tally.first is None or value < tally.first:
                    tally.first = value
                if tally.last is None or value > tally.last:
                    tally.last = value
            yield stamp, record


def _first_time(segment: Segment) -> str:
    """The time of a segment's first record ("" when it has none): when the merge needs to open it."""
    try:
        with segment.path.open("rb") as handle:
            record = json.loads(handle.readline())
        value = record.get("timestamp") if isinstance(record, dict) else None
    except (OSError, ValueError):
        return ""
    return value if isinstance(value, str) else ""


def iter_trail(paths: TrailPaths, *, stats: TrailStats | None = None) -> Iterator[tuple[Segment, dict[str, Any]]]:
    """``(segment, record)`` for every readable record of the trail, merged by ``timestamp``.

    Each segment keeps its own order; between segments the earlier time comes first (timestamps are the writers'
    clocks). Memory and open files grow with the number of segments whose time spans overlap, not with records:
    a segment is opened when the merge reaches its first record and closed when it is read. Lines that are not
    JSON objects are counted in ``stats`` (per segment), not raised. Raises ``OSError`` for an unreadable path.
    """
    stats = stats if stats is not None else TrailStats()
    segments = list_segments(paths)
    stats.segments = segments
    for segment in segments:
        stats.per_segment[segment.path] = SegmentTally()
    if len(segments) == 1:
        only = segments[0]
        for _, record in _records(only, stats.per_segment[only.path]):
            yield only, record
        return
    waiting = sorted(((_first_time(s), order, s) for order, s in enumerate(segments)), key=lambda t: (t[0], t[1]))
    waiting.reverse()  # pop() takes the earliest
    heap: list[tuple[str, int, int, dict[str, Any], Iterator[tuple[str, dict[str, Any]]], Segment]] = []
    counter = 0

    def advance(order: int, segment: Segment, source: Iterator[tuple[str, dict[str, Any]]]) -> None:
        nonlocal counter
        for stamp, record in source:
            counter += 1
            heapq.heappush(heap, (stamp, order, counter, record, source, segment))
            return

    while heap or waiting:
        while waiting and (not heap or waiting[-1][0] <= heap[0][0]):
            _, order, segment = waiting.pop()
            advance(order, segment, _records(segment, stats.per_segment[segment.path]))
        if not heap:
            continue
        _, order, _, record, source, segment = heapq.heappop(heap)
        yield segment, record
        advance(order, segment, source)


def read_trail(paths: TrailPaths, *, stats: TrailStats | None = None) -> Iterator[dict[str, Any]]:
    """The records of a trail (directories and/or files) merged by time: ``iter_trail`` without the segments.

    What ``memguard calibrate --from-audit`` and other readers of many writers' logs iterate over; pass a
    ``TrailStats`` to learn how many lines were unreadable.
    """
    for _, record in iter_trail(paths, stats=stats):
        yield record
