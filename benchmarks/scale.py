"""Prompts/s of ``memguard scan``: local engine vs the Ray engine, on this machine.

    python benchmarks/scale.py                         # tiny random-weight SD fixture, 512 prompts
    python benchmarks/scale.py --model DIR --prompts FILE --workers 1 2

Each engine scores the same prompts with the same seed; the script checks that the rows agree
to 1e-5 and prints a table (model load and actor start-up are included: they are part of a scan).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def _same(a: list[dict], b: list[dict]) -> float:
    assert [r["index"] for r in a] == [r["index"] for r in b]
    return max(abs(x[k] - y[k]) for x, y in zip(a, b) for k in ("norm", "cos", "score"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers pipeline dir (default: the tiny fixture, saved to a temp dir)")
    parser.add_argument("--prompts", help="prompt file (default: N random captions from the fixture vocabulary)")
    parser.add_argument("-n", type=int, default=512, help="number of generated prompts")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-gpus-per-worker", type=float, default=0.0)
    args = parser.parse_args()

    import ray

    from guard.engines import ScanJob, scan_local
    from guard.engines.ray_engine import scan_ray

    work = Path(tempfile.mkdtemp(prefix="memguard-scale-"))
    model = args.model
    if model is None:
        from guard.testing import tiny_sd_pipeline

        model = str(work / "tiny-sd")
        tiny_sd_pipeline("epsilon").save_pretrained(model)
    prompts = args.prompts
    if prompts is None:
        from guard.testing import DEFAULT_WORDS

        rng = random.Random(0)
        prompts = str(work / "prompts.txt")
        Path(prompts).write_text("\n".join(" ".join(rng.choices(DEFAULT_WORDS, k=8)) for _ in range(args.n)) + "\n")
    count = sum(1 for line in open(prompts, encoding="utf-8") if line.strip())
    print(f"{count} prompts, batch {args.batch_size}, {os.cpu_count()} CPUs, model {model}")

    def job(name: str) -> ScanJob:
        return ScanJob(model, prompts, str(work / f"{name}.jsonl"), scoring={"batch_size": args.batch_size},
                       device=None)

    results = []
    started = time.perf_counter()
    scan_local(job("local"))
    results.append(("local", 1, time.perf_counter() - started, 0.0))
    reference = _rows(work / "local.jsonl")

    started = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    init_s = time.perf_counter() - started
    for workers in args.workers:
        started = time.perf_counter()
        scan_ray(job(f"ray{workers}"), workers=workers, num_gpus_per_worker=args.num_gpus_per_worker)
        elapsed = time.perf_counter() - started
        results.append(("ray", workers, elapsed, _same(_rows(work / f"ray{workers}.jsonl"), reference)))
    ray.shutdown()

    print(f"ray.init: {init_s:.1f} s (once per cluster session, not included below)")
    print("| engine | workers | wall s | prompts/s | max abs diff vs local |")
    print("|---|---|---|---|---|")
    for engine, workers, elapsed, diff in results:
        print(f"| {engine} | {workers} | {elapsed:.1f} | {count / elapsed:.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
