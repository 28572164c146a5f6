"""Load test of ``memguard serve`` over loopback: latency p50/p99 and throughput, then the audit log verified.

    python benchmarks/service_load.py                  # tiny fixture model, 4 clients x 200 requests
    python benchmarks/service_load.py --model DIR --clients 4 --requests 200 --max-batch 16 --max-wait-ms 10

Starts a real uvicorn process on 127.0.0.1 (a free port), drives POST /v1/check from concurrent
clients (each one request at a time, keep-alive), and afterwards checks the hash chain of the audit
log and that it holds one record per checked prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(server: subprocess.Popen, base: str, timeout: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError("server did not become healthy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers pipeline dir (default: the tiny fixture, saved to a temp dir)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    args = parser.parse_args()

    import httpx

    from guard.audit import verify_log
    from guard.testing import DEFAULT_WORDS

    work = Path(tempfile.mkdtemp(prefix="memguard-load-"))
    model = args.model
    if model is None:
        from guard.testing import tiny_sd_pipeline

        model = str(work / "tiny-sd")
        tiny_sd_pipeline("epsilon").save_pretrained(model)
    policy = work / "policy.yaml"  # absolute threshold: no calibration run inside the benchmark
    policy.write_text(json.dumps({"name": "load", "version": 1, "calibration": "off",
                                  "rules": [{"when": {"score": {"gte": 1e6}}, "action": "block"}]}))
    audit = work / "audit.jsonl"
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", "from guard.cli import main; main()", "serve", "--model", model,
               "--policy", str(policy), "--port", str(port), "--audit", str(audit),
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    server = subprocess.Popen(command, env={**os.environ})
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    try:
        _wait_ready(server, base)

        def client(worker: int) -> None:
            mine: list[float] = []
            with httpx.Client(base_url=base, timeout=60) as http:
                for i in range(args.requests):
                    words = [DEFAULT_WORDS[(worker * 7 + i * 3 + k) % len(DEFAULT_WORDS)] for k in range(6)]
                    started = time.perf_counter()
                    response = http.post("/v1/check", json={"prompt": " ".join(words)})
                    mine.append(time.perf_counter() - started)
                    if response.status_code != 200:
                        errors.append(f"{response.status_code}: {response.text[:200]}")
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=client, args=(w,)) for w in range(args.clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=60)

    total = args.clients * args.requests
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * len(latencies))) - 1)]
    report = verify_log(audit)
    records = sum(1 for _ in audit.open(encoding="utf-8"))
    print(f"{args.clients} clients x {args.requests} requests, max_batch {args.max_batch}, "
          f"max_wait {args.max_wait_ms} ms, {os.cpu_count()} CPUs, model {model}")
    print("| requests | errors | wall s | req/s | p50 ms | p99 ms | audit records | audit chain |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {total} | {len(errors)} | {wall:.1f} | {total / wall:.1f} | {statistics.median(latencies) * 1e3:.1f} "
          f"| {p99 * 1e3:.1f} | {records} | {'intact' if report else 'BROKEN: ' + str(report)} |")
    if errors or not report or records != total:
        sys.exit(1)


if __name__ == "__main__":
    main()
