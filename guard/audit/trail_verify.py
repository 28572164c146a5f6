"""Verifying a trail: every segment on its own (``verify_log``), then the segments against each other.

Each segment's chain and checkpoints are checked as a single log's are. On top of that:

* a segment's records must name the writer its file is named after (a renamed or swapped file fails), and
  it must start with its ``segment`` record, the only one, and name one trail throughout;
* all segments must name the same trail, and no writer may have two segments;
* every **witness** (``[seq, hash]`` of another segment's head, in a ``segment`` record or a checkpoint) must
  hold: that segment exists (else *missing*), reaches that seq (else *cut back*), and has that hash there
  (else *rewritten*). A witness inside the signed part of its segment was signed with the writer's key, so an
  editor without the key can neither remove nor move it (``docs/audit.md``);
* shipped checkpoints (``--anchors``) are matched to their segment by ``writer``: a segment they name must
  exist and hold them.

Two streaming passes: one that only parses lines holding a witness, one that verifies. Memory grows with the
number of segments squared (the largest witness of each segment about each other), not with records.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .trail import SEGMENT_EVENT, Segment, TrailPaths, list_segments
from .verify import VerifyReport, _key_ring, load_anchors, verify_log

__all__ = ["SegmentReport", "TrailProblem", "TrailReport", "load_trail_anchors", "verify_trail"]

_WITNESS_MARK = b'"witness":{"'


@dataclass(frozen=True)
class TrailProblem:
    """One reason a trail does not verify: the segment (or where a missing one should be), the line, why."""

    segment: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        return f"{self.segment}: line {self.line}: {self.reason}" if self.line else f"{self.segment}: {self.reason}"


@dataclass(frozen=True)
class SegmentReport:
    """One segment's verification, its writer (as its records name it, else its file) and trail."""

    segment: Segment
    report: VerifyReport
    writer: str
    trail: str | None = None
    stamped: bool = False
    first: str | None = None
    last: str | None = None

    def describe(self) -> str:
        """One line: the segment, its writer and ``verify_log``'s verdict (without the path again)."""
        text = str(self.report)
        prefix = f"{self.report.path}: "
        verdict = text[len(prefix):] if text.startswith(prefix) else text
        if not self.report.checkpoints:
            return f"{self.segment.path.name} (writer {self.writer}): {verdict}"
        state = "closed" if self.report.closed else "open: writer running, crashed, or cut back"
        return f"{self.segment.path.name} (writer {self.writer}, {state}): {verdict}"


@dataclass(frozen=True)
class TrailReport:
    """The result of verifying a trail: each segment's report, and every problem (segment, line, reason).

    Has ``VerifyReport``'s summary attributes (``ok``, ``n_records``, ``key_checked``, ``checkpoints``,
    ``unsigned_tail``, ``signers``, ...), summed over the segments, so summaries and reports take either.
    """

    path: str
    segments: tuple[SegmentReport, ...]
    problems: tuple[TrailProblem, ...]
    key_checked: bool = False
    strict: bool = False
    trails: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    def __bool__(self) -> bool:
        return self.ok

    @property
    def writers(self) -> tuple[str, ...]:
        return tuple(s.writer for s in self.segments)

    @property
    def n_records(self) -> int:
        return sum(s.report.n_records for s in self.segments)

    @property
    def checkpoints(self) -> int:
        return sum(s.report.checkpoints for s in self.segments)

    @property
    def unsigned_tail(self) -> int:
        return sum(s.report.unsigned_tail for s in self.segments)

    @property
    def adopted(self) -> int:
        return sum(s.report.adopted for s in self.segments)

    @property
    def anchors(self) -> int:
        return sum(s.report.anchors for s in self.segments)

    @property
    def signed(self) -> bool:
        return self.key_checked and all(s.report.signed for s in self.segments)

    @property
    def signers(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for s in self.segments:
            seen.update(dict.fromkeys(s.report.signers))
        return tuple(seen)

    @property
    def first_bad_line(self) -> int | None:
        return self.problems[0].line if self.problems else None

    @property
    def reason(self) -> str | None:
        return str(self.problems[0]) if self.problems else None

    def headline(self) -> str:
        """One line: what was verified, the writers, records, and whether it holds."""
        trail = f"trail {', '.join(repr(t) for t in self.trails)}" if self.trails else "trail"
        what = (f"{self.path}: {trail}, {len(self.segments)} segment(s), {self.n_records} records; writers: "
                f"{', '.join(self.writers)}")
        if not self.ok:
            return f"{what}; FAILED: {len(self.problems)} problem(s)"
        if not self.key_checked:
            return (f"{what}; intact (integrity only: hash chains and witnesses checked, no signatures; pass "
                    f"--public-key to verify who wrote it)")
        return (f"{what}; intact, signed: {self.checkpoints} checkpoint(s) verified with key "
                f"{', '.join(self.signers)}; {self.unsigned_tail} record(s) after the last checkpoints not yet signed")

    def one_line(self) -> str:
        """The headline, and the first problem if any."""
        if self.ok:
            return self.headline()
        more = f" (and {len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"{self.problems[0]}{more}"

    def __str__(self) -> str:
        lines = [self.headline()] + [f"  {s.describe()}" for s in self.segments if s.report.ok]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "trails": list(self.trails), "writers": list(self.writers),
                "n_records": self.n_records, "key_checked": self.key_checked, "strict": self.strict,
                "problems": [{"segment": p.segment, "line": p.line, "reason": p.reason} for p in self.problems],
                "segments": [{"path": str(s.segment.path), "writer": s.writer, "trail": s.trail, "first": s.first,
                              "last": s.last, **s.report.to_dict()} for s in self.segments]}


def load_trail_anchors(paths: Iterable[str | os.PathLike[str]]) -> dict[str | None, dict[int, dict[str, Any]]]:
    """Shipped checkpoints (files, or directories of ``audit.checkpoint_copy`` files) by writer, then seq.

    Checkpoints of a single-file log carry no writer id: they are under None. Raises ``ValueError`` naming the
    file and line of anything that is not an intact checkpoint record.
    """
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        files += sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    out: dict[str | None, dict[int, dict[str, Any]]] = {}
    for file in files:
        for seq, record in load_anchors([file]).items():
            writer = record.get("writer")
            out.setdefault(writer if isinstance(writer, str) else None, {})[seq] = record
    return out


@dataclass
class _Claim:
    """The largest witness one segment holds about another: where it is, and what it says."""

    line: int
    seq: int
    hash: str


@dataclass
class _Watch:
    """The per-line checks of one segment during ``verify_log`` (its ``check``)."""

    segment: Segment
    targets: set[int]
    hashes: dict[int, str] = field(default_factory=dict)
    stamped: bool | None = None
    trail: str | None = None
    first: str | None = None
    last: str | None = None

    def __call__(self, line_no: int, record: dict[str, Any]) -> str | None:
        seq = record["seq"]
        if seq in self.targets:
            self.hashes[seq] = record["hash"]
        stamp = record.get("timestamp")
        if isinstance(stamp, str):
            self.first = stamp if self.first is None else min(self.first, stamp)
            self.last = stamp if self.last is None else max(self.last, stamp)
        writer = record.get("writer")
        stamped = isinstance(writer, str)
        if self.stamped is None:
            self.stamped = stamped
        elif stamped != self.stamped:
            return ("record carries no writer, but this segment's records do: records inserted from another log"
                    if not stamped else "record carries a writer, but this log's earlier records do not")
        event = record.get("event")
        if stamped and writer != self.segment.writer:
            return (f"record names writer {writer!r}, but the segment is {self.segment.writer!r}'s (its file name): "
                    f"segment renamed, swapped or records moved")
        if event == SEGMENT_EVENT and line_no != 1:
            return "a second segment record: segments were joined"
        if stamped and line_no == 1 and event != SEGMENT_EVENT:
            return "a trail segment must start with its segment record: its beginning was cut off"
        trail = record.get("trail") if event in (SEGMENT_EVENT, "checkpoint") else None
        if isinstance(trail, str):
            if self.trail is None:
                self.trail = trail
            elif trail != self.trail:
                return f"names trail {trail!r}, but the segment's earlier records name {self.trail!r}"
        return None


def _claims(segment: Segment) -> dict[str, _Claim]:
    """The largest witness this segment holds about each other writer (lines not parsed otherwise)."""
    found: dict[str, _Claim] = {}
    with segment.path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if _WITNESS_MARK not in raw:
                continue
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            witness = record.get("witness") if isinstance(record, dict) else None
            if record.get("event") not in (SEGMENT_EVENT, "checkpoint") or not isinstance(witness, dict):
                continue
            for writer, head in witness.items():
                if (isinstance(head, list) and len(head) == 2 and isinstance(head[0], int)
                        and isinstance(head[1], str)):
                    known = found.get(writer)
                    if known is None or head[0] >= known.seq:
                        found[writer] = _Claim(line_no, head[0], head[1])
    return found


def verify_trail(
    paths: TrailPaths,
    *,
    public_keys: Any = None,
    strict: bool = False,
    anchors: Mapping[str | None, Mapping[int, Mapping[str, Any]]] | None = None,
) -> TrailReport:
    """Verify a trail (directories and/or files) as one: each segment as ``verify_log`` does, and the segments
    against each other (writers, trail name, witnesses, shipped checkpoints): see the module's doc.

    ``anchors`` is ``load_trail_anchors``'s mapping. Raises ``OSError`` for an unreadable path or a directory
    without segments, ``KeyFileError`` for an unusable key file, ``ValueError`` for anchors that do not verify.
    """
    keys = _key_ring(public_keys)
    if not isinstance(paths, (str, os.PathLike)):
        paths = list(paths)
    segments = list_segments(paths)
    shown = os.fspath(paths) if isinstance(paths, (str, os.PathLike)) else ", ".join(os.fspath(p) for p in paths)
    shipped = {writer: dict(found) for writer, found in (anchors or {}).items()}
    loose = shipped.pop(None, None)
    if loose:
        if len(segments) != 1:
            raise ValueError(f"{len(loose)} shipped checkpoint(s) carry no writer (from a single-file log): they "
                             f"cannot be matched to one of {len(segments)} segments")
        shipped.setdefault(segments[0].writer, {}).update(loose)
    problems: list[TrailProblem] = []
    claims = [_claims(segment) for segment in segments]
    by_writer: dict[str, list[int]] = {}
    for index, segment in enumerate(segments):
        by_writer.setdefault(segment.writer, []).append(index)
    targets: dict[str, set[int]] = {}
    for found in claims:
        for writer, claim in found.items():
            targets.setdefault(writer, set()).add(claim.seq)
    results: list[SegmentReport] = []
    hashes: list[dict[int, str]] = []
    for segment in segments:
        watch = _Watch(segment, targets.get(segment.writer, set()))
        report = verify_log(segment.path, public_keys=keys, strict=strict, anchors=shipped.get(segment.writer),
                            check=watch)
        stamped = bool(watch.stamped)
        results.append(SegmentReport(segment, report, segment.writer if stamped else str(segment.path),
                                     watch.trail, stamped, watch.first, watch.last))
        if not report.ok:
            problems.append(TrailProblem(str(segment.path), report.first_bad_line, str(report.reason)))
        hashes.append(watch.hashes)
    for writer, indices in by_writer.items():
        stamped = [i for i in indices if results[i].stamped]
        if len(stamped) > 1:
            names = ", ".join(str(segments[i].path) for i in stamped)
            problems.append(TrailProblem(str(segments[stamped[1]].path), None,
                                         f"writer {writer!r} has {len(stamped)} segments ({names}): a writer appends "
                                         f"to one segment only"))
    trails: dict[str, list[str]] = {}
    for result in results:
        if result.trail is not None:
            trails.setdefault(result.trail, []).append(str(result.segment.path))
    main = max(trails, key=lambda t: (len(trails[t]), t)) if trails else None
    for name, members in trails.items():
        if name != main:
            for member in members:
                problems.append(TrailProblem(member, None, f"belongs to trail {name!r}, the other segments to "
                                                           f"{main!r}: segments of another trail mixed in"))
    foreign = {i for i, result in enumerate(results) if result.trail is not None and result.trail != main}
    problems += _witness_problems(segments, results, hashes, [{} if i in foreign else c for i, c in enumerate(claims)],
                                  by_writer)
    for writer, found in shipped.items():
        if writer not in by_writer:
            where = segments[0].path.parent / f"{writer}.jsonl"
            problems.append(TrailProblem(str(where), None, f"missing: {len(found)} shipped checkpoint(s) of writer "
                                                           f"{writer!r} (up to seq {max(found)}) name it"))
    return TrailReport(str(shown), tuple(results), tuple(problems), key_checked=keys is not None, strict=strict,
                       trails=tuple(trails))


def _witness_problems(segments: list[Segment], results: list[SegmentReport], hashes: list[dict[int, str]],
                      claims: list[dict[str, _Claim]], by_writer: dict[str, list[int]]) -> list[TrailProblem]:
    """What the witnesses say that the segments do not hold: one problem per segment, from its largest witness."""
    worst: dict[str, tuple[str, _Claim, Path]] = {}
    for index, found in enumerate(claims):
        source = results[index].report
        for writer, claim in found.items():
            if not source.ok and source.first_bad_line is not None and source.first_bad_line <= claim.line:
                continue  # the witness is on or after a bad line of its own segment: not to be relied on
            witnessed_by = f"{segments[index].path.name} line {claim.line} witnessed seq {claim.seq}"
            holders = by_writer.get(writer, [])
            if not holders:
                problem = "missing: " + witnessed_by + " of it"
            elif len(holders) > 1:
                continue  # reported as a writer with two segments
            else:
                target = results[holders[0]]
                held = hashes[holders[0]]
                if not target.report.complete and (target.report.first_bad_line or 0) <= claim.seq:
                    continue  # its chain broke before the witnessed record: that failure is reported
                if target.report.n_records < claim.seq:
                    problem = f"cut back: ends at seq {target.report.n_records}, but {witnessed_by}"
                elif held.get(claim.seq) != claim.hash:
                    problem = f"rewritten: its record seq {claim.seq} is not the one {witnessed_by}"
                else:
                    continue
            known = worst.get(writer)
            if known is None or claim.seq > known[1].seq:
                worst[writer] = (problem, claim, segments[index].path.parent)
    out = []
    for writer, (problem, _, folder) in sorted(worst.items()):
        holders = by_writer.get(writer)
        where = str(segments[holders[0]].path) if holders else str(folder / f"{writer}.jsonl")
        out.append(TrailProblem(where, None, problem))
    return out
