"""Benchmark: audit records per second with ``audit.fsync`` on, one fsync per record vs one per batch.

    python benchmarks/audit_fsync.py                          # 2000 decision records, batches of 16
    python benchmarks/audit_fsync.py --records 5000 --batch 32 --dir /var/log/memguard-bench
    python benchmarks/audit_fsync.py --guard                  # also Guard.check_many on the tiny fixture model

Writes decision records through ``AuditLogger.log_decision`` (the record the guard writes per prompt) three
ways: without fsync, with one fsync per record (what a guard does today with ``audit.fsync: true``), and with
``with logger.batch():`` around each batch (one fsync per batch, after which every record is on disk).
fsync cost depends on the disk: run it on the file system the audit log lives on (``--dir``).

``--guard`` measures the same on a whole guard: ``Guard.check_many`` of batches of prompts on the tiny
fixture pipeline, with fsync off, per record, and per batch (``with guard.audit.batch(): guard.check_many``),
to show what share of a request the per-record fsyncs are.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class FsyncCounter:
    """Counts ``os.fsync`` calls while installed."""

    def __init__(self) -> None:
        self.count = 0
        self._real = os.fsync

    def __enter__(self) -> FsyncCounter:
        def counted(fd: int) -> None:
            self.count += 1
            self._real(fd)

        os.fsync = counted
        return self

    def __exit__(self, *exc: object) -> None:
        os.fsync = self._real


def _policy(fsync: bool):
    from guard.policy import load_policy

    return load_policy({"name": "bench", "audit": {"fsync": fsync},
                        "rules": [{"name": "hi", "when": {"score": {"gte": 5}}, "action": "block"}]})


def bench_logger(folder: Path, records: int, batch: int) -> list[tuple[str, float, int, int, float]]:
    from guard.audit import AuditLogger, verify_log
    from guard.policy import decide
    from guard.scoring.result import MemorizationScore

    score = MemorizationScore(prompt="p", norm=1.0, cos=0.2, score=1.0, g_norm=1.0, g_cos=2.0, profile="sd1",
                              t_hi=981, t_lo=41, samples=1, seed=51, prediction_space="eps")
    rows = []
    for mode in ("no-fsync", "per-record", "per-batch"):
        policy = _policy(mode != "no-fsync")
        path = folder / f"{mode}.jsonl"
        logger = AuditLogger.for_policy(policy, path=path, model_id="bench", model_class="Bench")
        decision = decide(policy, score, "a prompt")
        with FsyncCounter() as fsyncs:
            started = time.perf_counter()
            for start in range(0, records, batch):
                if mode == "per-batch":
                    with logger.batch():
                        for i in range(start, min(start + batch, records)):
                            logger.log_decision(decision, prompt=f"prompt {i}", outcome="pending", request_id=str(i))
                else:
                    for i in range(start, min(start + batch, records)):
                        logger.log_decision(decision, prompt=f"prompt {i}", outcome="pending", request_id=str(i))
            seconds = time.perf_counter() - started
        logger.close()
        assert verify_log(path).n_records == records
        rows.append((mode, records / seconds, fsyncs.count, records, seconds))
    return rows


def bench_guard(folder: Path, prompts: int, batch: int) -> list[tuple[str, float, int, int, float]]:
    import torch

    torch.set_num_threads(int(os.environ.get("MEMGUARD_TEST_THREADS") or 1))
    import guard
    from guard.testing import DEFAULT_WORDS, tiny_sd_pipeline

    pipe = tiny_sd_pipeline("epsilon")
    texts = [" ".join(DEFAULT_WORDS[(i * 3 + k) % len(DEFAULT_WORDS)] for k in range(5)) for i in range(prompts)]
    rows = []
    for mode in ("no-fsync", "per-record", "per-batch"):
        g = guard.Guard(pipe, policy=_policy(mode != "no-fsync"), audit_path=folder / f"guard-{mode}.jsonl")
        g.check_many(texts[:batch])  # warm-up: first scoring pass
        with FsyncCounter() as fsyncs:
            started = time.perf_counter()
            for start in range(0, prompts, batch):
                chunk = texts[start:start + batch]
                if mode == "per-batch":
                    with g.audit.batch():
                        g.check_many(chunk)
                else:
                    g.check_many(chunk)
            seconds = time.perf_counter() - started
        g.close()
        rows.append((mode, prompts / seconds, fsyncs.count, prompts, seconds))
    return rows


def show(title: str, unit: str, rows: list[tuple[str, float, int, int, float]]) -> None:
    print(title)
    print(f"{'mode':<12}{unit + '/s':>12}{'fsyncs':>9}{unit:>10}{'seconds':>10}")
    base = rows[0][1]
    for mode, rate, fsyncs, count, seconds in rows:
        print(f"{mode:<12}{rate:>12.0f}{fsyncs:>9}{count:>10}{seconds:>10.3f}   {rate / base:.2f}x of no-fsync")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=2000, help="decision records per mode")
    parser.add_argument("--batch", type=int, default=16, help="records (prompts) per batch, like a micro-batch")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the logs (the disk to measure)")
    parser.add_argument("--guard", action="store_true", help="also time Guard.check_many on the tiny fixture model")
    parser.add_argument("--prompts", type=int, default=256, help="prompts per mode with --guard")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        show(f"AuditLogger.log_decision, batches of {args.batch} ({folder})", "records",
             bench_logger(folder, args.records, args.batch))
        if args.guard:
            print()
            show(f"Guard.check_many, batches of {args.batch} prompts, tiny fixture model", "prompts",
                 bench_guard(folder, args.prompts, args.batch))


if __name__ == "__main__":
    main()
