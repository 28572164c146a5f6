"""The local engine: one process, one pipeline, batches scored in input order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..events import log_event
from ..loading import load_pipeline
from .base import OrderedRowWriter, ScanJob, format_row, prepare


def scan_local(job: ScanJob, *, loader: Callable[..., Any] = load_pipeline) -> int:
    """Score the job's prompts into its JSONL file; returns how many prompts were scored in this run."""
    from tqdm import tqdm

    from ..scoring import make_scorer

    prompts, done, measured = prepare(job)
    log_event("scan_started", engine="local", prompts=len(prompts), already_done=done, out=job.out_path)
    scorer = make_scorer(loader(job.model, device=job.device, dtype=job.dtype), **job.scorer_settings())
    with open(job.out_path, "a" if job.resume else "w", encoding="utf-8") as out, tqdm(
        total=len(prompts), initial=done, unit="prompt", desc="scan", disable=None
    ) as progress:
        writer = OrderedRowWriter(out, done, measured=measured, out_path=job.out_path)
        for start in range(done, len(prompts), job.batch_size):
            chunk = prompts[start : start + job.batch_size]
            progress.update(writer.add((start + offset, format_row(start + offset, prompt, result))
                                       for offset, (prompt, result) in enumerate(zip(chunk, scorer.score(chunk)))))
    log_event("scan_finished", engine="local", scored=len(prompts) - done, out=job.out_path)
    return len(prompts) - done
