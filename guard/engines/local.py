"""The local engine: one process, one pipeline, batches scored in input order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..loading import load_pipeline
from .base import ScanJob, format_row, prepare


def scan_local(job: ScanJob, *, loader: Callable[..., Any] = load_pipeline) -> int:
    """Score the job's prompts into its JSONL file; returns how many prompts were scored in this run."""
    from tqdm import tqdm

    from ..scoring import Scorer

    prompts, done = prepare(job)
    scorer = Scorer(loader(job.model, device=job.device, dtype=job.dtype), **job.scorer_settings())
    with open(job.out_path, "a" if job.resume else "w", encoding="utf-8") as out, tqdm(
        total=len(prompts), initial=done, unit="prompt", desc="scan", disable=None
    ) as progress:
        for start in range(done, len(prompts), job.batch_size):
            chunk = prompts[start : start + job.batch_size]
            for offset, result in enumerate(scorer.score(chunk)):
                out.write(format_row(start + offset, result) + "\n")
            out.flush()
            progress.update(len(chunk))
    return len(prompts) - done
