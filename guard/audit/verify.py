"""Verifying an audit log, streaming (constant memory): the hash chain, and with public keys the signatures.

Without a key only the chain is checked: that proves the file is internally consistent, not who wrote
it (anyone who can write the file can recompute every hash). With the writers' public keys, every
checkpoint must carry a valid signature by one of them, sign the record right before it, and chain to
the previous checkpoint; every record before the last checkpoint is then as its signer wrote it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .chain import GENESIS_HASH, record_hash
from .signing import KeyRing, checkpoint_problem

__all__ = ["SignatureTally", "VerifyReport", "load_anchors", "verify_log"]

#: Called with (line number, record) for every record that passed the chain checks; a string fails that line.
LineCheck = Callable[[int, dict[str, Any]], "str | None"]


@dataclass(frozen=True)
class VerifyReport:
    """The result of checking a log: ``ok``, or the first bad line (1-based) and why.

    ``n_records`` counts the records verified intact before the first bad line. ``key_checked``: public
    keys were given, so checkpoint signatures were verified (``signed``: and at least one was valid).
    ``unsigned_tail`` counts the records after the last checkpoint; ``adopted`` those that were first
    signed by an ``open`` checkpoint of a later writer (the process that wrote them never signed them:
    it crashed, had no key, or was still writing).
    """

    path: str
    ok: bool
    n_records: int
    first_bad_line: int | None = None
    reason: str | None = None
    last_hash: str | None = None
    key_checked: bool = False
    signed: bool = False
    checkpoints: int = 0
    last_checkpoint_seq: int | None = None
    unsigned_tail: int = 0
    adopted: int = 0
    signers: tuple[str, ...] = ()
    anchors: int = 0
    strict: bool = False
    #: The log ends with a checkpoint written on ``close`` or at ``exit``: its writer finished it.
    closed: bool = False
    #: Every line passed the chain checks (a failure is then about signing, ``strict`` or shipped checkpoints).
    complete: bool = False

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        if not self.ok:
            return f"{self.path}: line {self.first_bad_line}: {self.reason}"
        head = f"{self.path}: intact, {self.n_records} records"
        if not self.key_checked:
            seen = f"; {self.checkpoints} checkpoint(s) present but not verified" if self.checkpoints else ""
            return (f"{head} (integrity only: hash chain checked, no signatures{seen}; "
                    f"pass --public-key to verify who wrote it)")
        parts = [f"{head}, signed: {self.checkpoints} checkpoint(s) verified with key {', '.join(self.signers)}"]
        if self.anchors:
            parts.append(f"{self.anchors} shipped checkpoint(s) matched")
        parts.append(f"{self.unsigned_tail} record(s) after the last checkpoint (seq {self.last_checkpoint_seq}) "
                     f"not yet signed")
        if self.adopted:
            parts.append(f"{self.adopted} record(s) first signed by a later writer's opening checkpoint")
        return "; ".join(parts)

    def one_line(self) -> str:
        return str(self)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"signers": list(self.signers)}


def load_anchors(paths: Iterable[str | os.PathLike[str]]) -> dict[int, dict[str, Any]]:
    """Checkpoint records kept elsewhere (``audit.checkpoint_copy``, or lines copied from the log), by seq.

    Raises ``ValueError`` naming the file and line of anything that is not a chained checkpoint record.
    """
    anchors: dict[int, dict[str, Any]] = {}
    for path in paths:
        with Path(path).open("rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError:
                    raise ValueError(f"{path}: line {line_no}: not valid JSON") from None
                if not isinstance(record, dict) or record.get("event") != "checkpoint" or not isinstance(
                        record.get("seq"), int) or record_hash(record) != record.get("hash"):
                    raise ValueError(f"{path}: line {line_no}: not an intact checkpoint record")
                anchors[record["seq"]] = record
    return anchors


def verify_log(
    path: str | os.PathLike[str],
    *,
    public_keys: Any = None,
    strict: bool = False,
    anchors: Mapping[int, Mapping[str, Any]] | None = None,
    check: LineCheck | None = None,
) -> VerifyReport:
    """Check every line of a log: complete, JSON, its own hash, and chained to the line before.

    Detects edited records (hash mismatch), deleted, reordered or inserted records (seq or
    prev_hash mismatch), a line cut off mid-write (no final newline) and garbage lines.

    ``public_keys`` (a ``KeyRing``, or public key files) also verifies every checkpoint: a valid signature by
    one of the keys, over the record right before it, chained to the previous checkpoint. That detects
    an edit anywhere before the last checkpoint even when the editor re-chained the hashes, and deleted,
    reordered or foreign checkpoints. A log without any checkpoint fails (nothing in it is signed).
    ``strict`` fails on records after the last checkpoint. ``anchors`` (``load_anchors``) are checkpoints
    kept elsewhere: each must be in the log, unchanged, so a cut-off log fails down to the last one shipped.
    ``check`` is called for every record that passed the chain checks, in order (``verify_trail`` checks a
    segment's writer and trail with it); a string it returns fails that line.
    Raises ``OSError`` if the file cannot be read, ``KeyFileError`` if a key file is unusable.
    """
    keys = _key_ring(public_keys)
    anchors = dict(anchors or {})
    if anchors and keys is not None:
        for seq, anchor in sorted(anchors.items()):
            problem = checkpoint_problem(anchor, keys)
            if problem is not None:
                raise ValueError(f"shipped checkpoint seq {seq} does not verify: {problem}")
    name = str(path)
    prev_hash, prev_seq, count = GENESIS_HASH, 0, 0
    checkpoints, cp_seq, cp_sig, cp_line, adopted, matched = 0, 0, None, 0, 0, 0
    signers: list[str] = []
    closed = complete = False
    first_event = None

    def report(ok: bool, line_no: int | None = None, reason: str | None = None) -> VerifyReport:
        return VerifyReport(
            name, ok, count, line_no, reason, prev_hash if count else None, key_checked=keys is not None,
            signed=keys is not None and checkpoints > 0, checkpoints=checkpoints,
            last_checkpoint_seq=cp_seq if checkpoints else None, unsigned_tail=count - cp_line if checkpoints
            else count, adopted=adopted, signers=tuple(signers), anchors=matched, strict=strict, closed=closed,
            complete=complete,
        )

    with Path(path).open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                return report(False, line_no, "incomplete last line (no newline): truncated mid-write")
            if not raw.strip():
                return report(False, line_no, "empty line")
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return report(False, line_no, "not valid JSON")
            if not isinstance(record, dict):
                return report(False, line_no, "not a JSON object")
            missing = [k for k in ("seq", "prev_hash", "hash") if k not in record]
            if missing:
                return report(False, line_no, f"missing chain field(s) {', '.join(missing)}")
            if record_hash(record) != record["hash"]:
                return report(False, line_no, "hash mismatch: record edited")
            seq = record["seq"]
            if seq != prev_seq + 1:
                what = (
                    "record(s) deleted"
                    if isinstance(seq, int) and seq > prev_seq + 1
                    else "records reordered"
                )
                return report(False, line_no, f"seq {seq} follows seq {prev_seq}: {what}")
            if record["prev_hash"] != prev_hash:
                where = "the genesis hash" if line_no == 1 else f"the hash of line {line_no - 1}"
                return report(False, line_no, f"prev_hash is not {where}: records deleted, reordered or inserted")
            if check is not None:
                problem = check(line_no, record)
                if problem is not None:
                    return report(False, line_no, problem)
            if line_no == 1:
                first_event = record.get("event")
            anchor = anchors.pop(seq, None)
            if anchor is not None:
                if anchor.get("hash") != record["hash"]:
                    return report(False, line_no, f"differs from the shipped checkpoint seq {seq}: the log was "
                                                  f"rewritten before it")
                matched += 1
            if record.get("event") == "checkpoint":
                if keys is not None:
                    problem = _checkpoint_problem(record, keys, cp_seq, cp_sig)
                    if problem is not None:
                        return report(False, line_no, problem)
                    if record["key_id"] not in signers:
                        signers.append(record["key_id"])
                if record.get("reason") == "open" and isinstance(record.get("signed_seq"), int):
                    # a trail segment's own first record, signed as the segment opens, was not left by anyone else
                    own = 1 if cp_seq == 0 and first_event == "segment" else 0
                    adopted += max(0, record["signed_seq"] - cp_seq - own)
                checkpoints, cp_seq, cp_sig, cp_line = checkpoints + 1, seq, record.get("signature"), count + 1
            closed = record.get("event") == "checkpoint" and record.get("reason") in ("close", "exit")
            prev_hash, prev_seq, count = record["hash"], seq, count + 1
    complete = True
    if anchors:
        first = min(anchors)
        return report(False, count + 1, f"the log ends at seq {prev_seq}, but a shipped checkpoint has seq {first}: "
                                        f"records were cut off the end")
    if keys is not None and checkpoints == 0:
        return report(False, 1 if count else None,
                      f"no checkpoint: none of the {count} record(s) is signed (was a signing key configured?)")
    if strict and count - cp_line:
        if not checkpoints:
            return report(False, 1, f"no checkpoint: none of the {count} record(s) is signed (--strict)")
        return report(False, cp_line + 1, f"{count - cp_line} record(s) after the last checkpoint (seq {cp_seq}) "
                                          f"are not signed (--strict)")
    return report(True)


def _key_ring(public_keys: Any) -> KeyRing | None:
    if public_keys is None:
        return None
    if isinstance(public_keys, KeyRing):
        return public_keys
    if isinstance(public_keys, (str, os.PathLike)):
        public_keys = [public_keys]
    items: Sequence[Any] = list(public_keys)
    if items and all(isinstance(item, (str, os.PathLike)) for item in items):
        return KeyRing.from_files(items)
    return KeyRing(items)


def _checkpoint_problem(record: Mapping[str, Any], keys: Any, cp_seq: int, cp_sig: str | None) -> str | None:
    """Why a checkpoint does not verify where it stands, or None."""
    seq = record["seq"]
    if record.get("prev_checkpoint_seq") != cp_seq or record.get("prev_signature") != cp_sig:
        before = f"the checkpoint at seq {cp_seq}" if cp_seq else "no checkpoint"
        return (f"checkpoint chains to seq {record.get('prev_checkpoint_seq')} but the log has {before} before it: "
                f"a checkpoint was deleted, reordered or inserted")
    if record.get("signed_seq") != seq - 1 or record.get("signed_hash") != record["prev_hash"]:
        return (f"checkpoint signs seq {record.get('signed_seq')} hash {str(record.get('signed_hash'))[:12]}..., "
                f"not the record before it (seq {seq - 1}): records before it were changed")
    return checkpoint_problem(record, keys)


class SignatureTally:
    """What a reading pass (``audit summary``) sees of signing, unverified: checkpoints, their key ids, and
    the records after the last one (of each segment, in a trail); with a ``VerifyReport`` (or a trail's
    ``TrailReport``) it also says whether a key verified them."""

    def __init__(self) -> None:
        self.checkpoints = 0
        self.last_checkpoint_seq: int | None = None
        self.signers: set[str] = set()
        self._after: dict[Any, int] = {}

    @property
    def after_checkpoint(self) -> int:
        """Records after the last checkpoint, summed over segments."""
        return sum(self._after.values())

    def note(self, record: Mapping[str, Any], segment: Any = None) -> None:
        """Count one record of ``segment`` (any key naming it; None for a single log)."""
        if record.get("event") != "checkpoint":
            self._after[segment] = self._after.get(segment, 0) + 1
            return
        self.checkpoints += 1
        self.last_checkpoint_seq = record.get("seq")
        self._after[segment] = 0
        if len(self.signers) < 100:
            self.signers.add(str(record.get("key_id")))

    def to_dict(self, verified: Any = None) -> dict[str, Any]:
        return {
            "checkpoints": self.checkpoints, "signers": sorted(self.signers),
            "last_checkpoint_seq": self.last_checkpoint_seq, "records_after_last_checkpoint": self.after_checkpoint,
            "verified": None if verified is None else {"ok": verified.ok, "with_key": verified.key_checked,
                                                       "summary": str(verified)},
        }

    def line(self, verified: Any = None) -> str:
        """One line: signed or not, and whether a key verified it (``verified``: a ``VerifyReport`` or
        ``TrailReport``)."""
        if verified is not None and not verified.ok:
            return f"signature: verification FAILED: {verified.one_line()}"
        if verified is not None and verified.key_checked:
            return (f"signature: verified with key {', '.join(verified.signers)}: {verified.checkpoints} "
                    f"checkpoint(s), {verified.unsigned_tail} record(s) after the last one not yet signed")
        if not self.checkpoints:
            return "signature: not signed (no checkpoints): the hash chain shows integrity only, not who wrote it"
        return (f"signature: {self.checkpoints} checkpoint(s) by key {', '.join(sorted(self.signers))}, "
                f"{self.after_checkpoint} record(s) after the last; NOT verified with a key (pass --public-key)")
