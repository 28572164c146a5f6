"""What both scan engines share: the job, the JSONL row format, resuming and in-order writing."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from ..errors import MemguardError
from ..prompts_io import read_prompts, truncate_to_complete_rows
from ..scoring import MemorizationScore


class ScanError(MemguardError, ValueError):
    """A scan cannot start or continue (e.g. the output to resume does not fit the prompt file)."""


@dataclass(frozen=True)
class ScanJob:
    """One ``memguard scan``: which model scores which prompts into which file, measured how.

    ``scoring`` holds ``make_scorer`` keyword arguments (samples, max_samples, seed, inference_steps, batch_size,
    profile, prediction_space), identical on every engine, so scores are identical. A scan makes no decisions, so
    adaptive sampling scores every prompt on all its draws.
    """

    model: str
    prompts_path: str
    out_path: str
    scoring: Mapping[str, Any] = field(default_factory=dict)
    device: str | None = None
    dtype: str | None = None
    resume: bool = False

    @property
    def batch_size(self) -> int:
        return int(self.scoring.get("batch_size") or 16)

    def scorer_settings(self) -> dict[str, Any]:
        """Keyword arguments of ``make_scorer``."""
        return {**self.scoring, "batch_size": self.batch_size}


def format_row(index: int, prompt: str, score: MemorizationScore) -> str:
    """One output line (without its newline): ``{"index": i, "prompt": p, **score}``."""
    return json.dumps({"index": index, "prompt": prompt, **score.to_dict()}, ensure_ascii=False)


def prepare(job: ScanJob) -> tuple[list[str], int]:
    """The prompts and how many of them OUT already holds (0 unless resuming; a torn last row is cut)."""
    prompts = read_prompts(job.prompts_path)
    done = truncate_to_complete_rows(job.out_path) if job.resume else 0
    if done > len(prompts):
        raise ScanError(f"{job.out_path} has {done} rows but {job.prompts_path} only {len(prompts)} prompts")
    return prompts, done


class OrderedRowWriter:
    """Writes rows strictly in index order, holding back rows that arrive early.

    Engines that finish batches out of order still leave a file that is a prefix of the input,
    which is what makes ``--resume`` a simple row count.
    """

    def __init__(self, out: IO[str], next_index: int) -> None:
        self._out = out
        self.next_index = next_index
        self._pending: dict[int, str] = {}

    def add(self, rows: Iterable[tuple[int, str]]) -> int:
        """Queue rows; write and flush every row that is now in order. Returns how many were written."""
        for index, line in rows:
            self._pending[int(index)] = line
        written = 0
        while self.next_index in self._pending:
            self._out.write(self._pending.pop(self.next_index) + "\n")
            self.next_index += 1
            written += 1
        if written:
            self._out.flush()
        return written
