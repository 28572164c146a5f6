"""What both scan engines share: the job, the JSONL row format, resuming and in-order writing."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from ..errors import MemguardError
from ..prompts_io import completed_rows, read_prompts, truncate_to_complete_rows
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


#: What a scan row says of how it was measured; a resumed scan must measure every new row the same way.
MEASURED = ("seed", "sampling", "samples", "max_samples", "prediction_space", "profile", "g_norm", "g_cos", "t_hi",
            "t_lo")


def prepare(job: ScanJob) -> tuple[list[str], int, dict[str, Any] | None]:
    """The prompts, how many of them OUT already holds (0 unless resuming; a torn last row is cut), and how OUT's
    rows were measured (None unless resuming).

    Resuming refuses an OUT that is not a scan of these prompts, row for row: mixing two runs' rows in one file
    would look like one scan and be none."""
    prompts = read_prompts(job.prompts_path)
    if not job.resume:
        return prompts, 0, None
    done = truncate_to_complete_rows(job.out_path)
    if done > len(prompts):
        raise ScanError(f"cannot resume: {job.out_path} has {done} rows but {job.prompts_path} only {len(prompts)} "
                        "prompts; rerun without --resume (it overwrites OUT)")
    measured: dict[str, Any] | None = None
    for position, row in enumerate(completed_rows(job.out_path)):
        if row.get("index") != position or row.get("prompt") != prompts[position]:
            raise ScanError(
                f"cannot resume: row {position + 1} of {job.out_path} was scored for another prompt than line "
                f"{position + 1} of {job.prompts_path} ({row.get('prompt')!r} vs {prompts[position]!r}): another "
                "prompt file; rerun without --resume (it overwrites OUT) or resume with the original prompt file")
        if measured is None:
            adaptive = row.get("sampling") == "adaptive"  # adaptive rows differ in draws by design
            measured = {name: row.get(name) for name in MEASURED if not (adaptive and name == "samples")}
    return prompts, done, measured


def check_same_measurement(measured: Mapping[str, Any] | None, row: Mapping[str, Any], out_path: str) -> None:
    """Raise ``ScanError`` naming the first setting in which ``row`` is measured differently from OUT's rows."""
    if measured is None:
        return
    for name, before in measured.items():
        now = row.get(name)
        same = (abs(before - now) <= 1e-9 if isinstance(before, float) and isinstance(now, float) else before == now)
        if not same:
            raise ScanError(
                f"cannot resume: the rows already in {out_path} were scored with {name} {before!r}, this run scores "
                f"with {name} {now!r}; rerun without --resume (it overwrites OUT) or with the first run's settings")


class OrderedRowWriter:
    """Writes rows strictly in index order, holding back rows that arrive early.

    Engines that finish batches out of order still leave a file that is a prefix of the input, which is what makes
    ``--resume`` a simple row count. When resuming, the first new row is checked against how OUT's rows were
    measured (``measured``) before anything is written.
    """

    def __init__(self, out: IO[str], next_index: int, *, measured: Mapping[str, Any] | None = None,
                 out_path: str = "OUT") -> None:
        self._out = out
        self.next_index = next_index
        self._pending: dict[int, str] = {}
        self._measured = measured
        self._out_path = out_path

    def add(self, rows: Iterable[tuple[int, str]]) -> int:
        """Queue rows; write and flush every row that is now in order. Returns how many were written."""
        for index, line in rows:
            if self._measured is not None:
                check_same_measurement(self._measured, json.loads(line), self._out_path)
                self._measured = None
            self._pending[int(index)] = line
        written = 0
        while self.next_index in self._pending:
            self._out.write(self._pending.pop(self.next_index) + "\n")
            self.next_index += 1
            written += 1
        if written:
            self._out.flush()
        return written
