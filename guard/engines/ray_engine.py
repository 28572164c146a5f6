"""The Ray engine: prompts scored by an actor pool on a Ray cluster, written as the local engine writes them.

Each actor loads the pipeline once and scores whole batches; Ray restarts crashed actors and retries
the batch they held. The driver keeps the output file a prefix of the input (rows are written in
index order as batches come back), so an interrupted run resumes exactly like a local one.

Prompt indices are assigned on the driver with the local engine's own reader, so both engines skip the
same blank lines and number prompts identically; Ray Data then carries ``(index, prompt)`` blocks to the
actors and the rows back. Batch boundaries are the local engine's too, so each UNet call sees the same
prompts and scores agree to floating-point noise.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

from ..events import log_event
from ..loading import load_pipeline
from .base import OrderedRowWriter, ScanError, ScanJob, format_row, prepare

#: Largest block in batches: bounds the work lost when a worker dies and the rows held back for ordering.
MAX_BATCHES_PER_BLOCK = 64


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise ScanError(
            "the Ray engine needs Ray Data: pip install 'memguard[ray]' (or pip install 'ray[data]')"
        ) from error
    return ray


class _ScoreBatches:
    """Ray Data actor UDF: loads the pipeline once per actor, then scores ``{"index", "prompt"}`` batches."""

    def __init__(self, job: ScanJob, loader: Callable[..., Any]) -> None:
        from ..scoring import make_scorer

        self._scorer = make_scorer(loader(job.model, device=job.device, dtype=job.dtype), **job.scorer_settings())

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        indices = [int(i) for i in batch["index"]]
        prompts = [str(p) for p in batch["prompt"]]
        rows = [format_row(i, p, score) for i, p, score in zip(indices, prompts, self._scorer.score(prompts))]
        return {"index": np.asarray(indices, dtype=np.int64), "row": np.asarray(rows, dtype=object)}


def block_rows(remaining: int, batch_size: int, workers: int) -> int:
    """Rows per Ray Data block: whole batches, about four blocks per worker, at most 64 batches."""
    batches = math.ceil(remaining / (batch_size * max(1, workers) * 4))
    return batch_size * min(max(1, batches), MAX_BATCHES_PER_BLOCK)


def scan_ray(
    job: ScanJob,
    *,
    address: str | None = None,
    workers: int = 1,
    num_gpus_per_worker: float = 0.0,
    num_cpus_per_worker: float = 1.0,
    max_retries: int = 3,
    loader: Callable[..., Any] = load_pipeline,
) -> int:
    """Score the job's prompts on Ray into its JSONL file; returns how many prompts were scored in this run.

    Args:
        address: Ray cluster to join (``auto``, ``ray://host:10001``...); default: the already
            initialised Ray, else a new local one.
        workers: actors in the pool, each holding one copy of the pipeline.
        num_gpus_per_worker: GPUs reserved per actor (0 scores on CPU); the actor's pipeline goes to
            CUDA when Ray gives it a GPU.
        max_retries: times a batch is retried, and a dead actor restarted, before the scan fails.
        loader: builds the pipeline inside each actor (``load_pipeline(model, device=, dtype=)``);
            it must be importable or picklable on the workers. The model path must be readable there.
    """
    if workers < 1:
        raise ScanError(f"workers must be >= 1, got {workers}")
    if num_gpus_per_worker < 0:
        raise ScanError(f"num_gpus_per_worker must be >= 0, got {num_gpus_per_worker}")
    prompts, done, measured = prepare(job)
    remaining = len(prompts) - done
    ray = _import_ray()
    started_here = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started_here = True
    elif address is not None:
        raise ScanError(f"Ray is already initialised in this process; cannot also connect to {address}")
    log_event("scan_started", engine="ray", prompts=len(prompts), already_done=done, workers=workers,
              out=job.out_path)
    try:
        _run(ray, job, prompts, done, remaining, workers, num_gpus_per_worker, num_cpus_per_worker,
             max_retries, loader, measured)
        log_event("scan_finished", engine="ray", scored=remaining, out=job.out_path)
    finally:
        if started_here:
            ray.shutdown()
    return remaining


def _run(ray, job, prompts, done, remaining, workers, num_gpus, num_cpus, max_retries, loader, measured) -> None:
    import pyarrow as pa
    from tqdm import tqdm

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # ours counts prompts; Ray's count blocks per operator
    context.actor_task_retry_on_errors = max_retries > 0  # application errors: retry the batch
    context.max_consecutive_actor_init_deaths = max_retries

    with open(job.out_path, "a" if job.resume else "w", encoding="utf-8") as out, tqdm(
        total=len(prompts), initial=done, unit="prompt", desc="scan[ray]", disable=None
    ) as progress:
        if remaining == 0:
            return
        step = block_rows(remaining, job.batch_size, workers)
        blocks = [
            pa.table({"index": pa.array(range(start, min(start + step, len(prompts))), pa.int64()),
                      "prompt": pa.array(prompts[start : start + step], pa.string())})
            for start in range(done, len(prompts), step)
        ]
        with warnings.catch_warnings():
            # Ray Data defaults to unbounded actor restarts and batch retries; a scan must fail eventually,
            # and max_restarts/max_task_retries have no named parameter yet (RayDeprecationWarning).
            warnings.simplefilter("ignore", DeprecationWarning)
            dataset = _score_dataset(ray, blocks, job, loader, workers, num_cpus, num_gpus, max_retries)
        writer = OrderedRowWriter(out, done, measured=measured, out_path=job.out_path)
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            progress.update(writer.add(zip(batch["index"], batch["row"])))
        if writer.next_index != len(prompts):
            raise ScanError(f"Ray returned rows up to {writer.next_index} of {len(prompts)} prompts")


def _score_dataset(ray, blocks, job, loader, workers, num_cpus, num_gpus, max_retries):
    return ray.data.from_arrow(blocks).map_batches(
        _ScoreBatches,
        fn_constructor_args=(job, loader),
        batch_size=job.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=num_cpus,
        num_gpus=num_gpus or None,
        max_restarts=max_retries,  # a crashed actor is replaced...
        max_task_retries=max_retries,  # ...and the batch it held is run again
    )
