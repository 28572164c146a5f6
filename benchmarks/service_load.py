"""Load test of ``memguard serve`` over loopback: latency p50/p99 and throughput, then the audit log verified.

    python benchmarks/service_load.py                  # tiny fixture model, 4 clients x 200 requests, 3 modes
    python benchmarks/service_load.py --model DIR --clients 4 --requests 200 --max-batch 16 --max-wait-ms 10
    python benchmarks/service_load.py --modes none     # without API keys only

Starts a real uvicorn process on 127.0.0.1 (a free port) per mode, drives POST /v1/check from concurrent
clients (each one request at a time, keep-alive), and afterwards checks the hash chain of each audit
log and that it holds one decision record per checked prompt. Each client's first request is a warm-up,
timed on its own (with API keys it includes the key's one scrypt check; later requests cost an HMAC).
Modes, all served at once and loaded in rotating rounds so that a busy shared machine slows each alike:
``none`` (no authentication), ``api-keys`` (``--api-keys``, one key per client, scrypt hashes at the
default cost) and ``api-keys+signed`` (also ``MEMGUARD_AUDIT_SIGNING_KEY``; the log is then verified
with the public key, ``--strict``). The last column compares each mode's throughput with ``none``.
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


MODES = ("none", "api-keys", "api-keys+signed")


def start_server(args: argparse.Namespace, model: str, policy: Path, work: Path, mode: str) -> dict:
    """A ``memguard serve`` process in ``mode``, with its own audit log (and keys)."""
    from guard.audit import generate_keypair
    from guard.service.keys import new_api_key

    folder = work / mode
    folder.mkdir()
    audit = folder / "audit.jsonl"
    port = _free_port()
    command = [sys.executable, "-c", "from guard.cli import main; main()", "serve", "--model", model,
               "--policy", str(policy), "--port", str(port), "--audit", str(audit),
               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    env = {k: v for k, v in os.environ.items() if k != "MEMGUARD_AUDIT_SIGNING_KEY"}
    tokens: list[dict[str, str]] = [{} for _ in range(args.clients)]
    if mode != "none":
        entries = []
        for worker in range(args.clients):
            token, hashed = new_api_key(f"client-{worker}")
            tokens[worker] = {"Authorization": f"Bearer {token}"}
            entries.append({"id": f"client-{worker}", "secret_hash": hashed})
        (folder / "keys.json").write_text(json.dumps({"keys": entries}))
        command += ["--api-keys", str(folder / "keys.json")]
    public = None
    if mode == "api-keys+signed":
        private, public = generate_keypair(folder / "signing")
        env["MEMGUARD_AUDIT_SIGNING_KEY"] = str(private)
    process = subprocess.Popen(command, env=env)
    return {"mode": mode, "process": process, "base": f"http://127.0.0.1:{port}", "tokens": tokens, "audit": audit,
            "public": public, "latencies": [], "wall": 0.0, "errors": []}


def drive(server: dict, clients: int, requests: int, offset: int) -> None:
    """``clients`` concurrent keep-alive clients, ``requests`` POST /v1/check each; adds to the server's tallies."""
    import httpx

    from guard.testing import DEFAULT_WORDS

    lock = threading.Lock()

    def client(worker: int) -> None:
        mine: list[float] = []
        with httpx.Client(base_url=server["base"], timeout=60, headers=server["tokens"][worker]) as http:
            for i in range(offset, offset + requests):
                words = [DEFAULT_WORDS[(worker * 7 + i * 3 + k) % len(DEFAULT_WORDS)] for k in range(6)]
                started = time.perf_counter()
                response = http.post("/v1/check", json={"prompt": " ".join(words)})
                mine.append(time.perf_counter() - started)
                if response.status_code != 200:
                    server["errors"].append(f"{response.status_code}: {response.text[:200]}")
        with lock:
            server["latencies"].extend(mine)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    server["wall"] += time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="diffusers pipeline dir (default: the tiny fixture, saved to a temp dir)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=200, help="requests per client (and mode)")
    parser.add_argument("--rounds", type=int, default=4, help="the load is split into rounds that rotate the modes")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        parser.error(f"--modes: unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if args.rounds < 1 or args.requests % args.rounds:
        parser.error("--requests must be a multiple of --rounds")

    from guard.audit import verify_log

    work = Path(tempfile.mkdtemp(prefix="memguard-load-"))
    model = args.model
    if model is None:
        from guard.testing import tiny_sd_pipeline

        model = str(work / "tiny-sd")
        tiny_sd_pipeline("epsilon").save_pretrained(model)
    policy = work / "policy.yaml"  # absolute threshold: no calibration run inside the benchmark
    policy.write_text(json.dumps({"name": "load", "version": 1, "calibration": "off",
                                  "rules": [{"when": {"score": {"gte": 1e6}}, "action": "block"}]}))
    servers = [start_server(args, model, policy, work, mode) for mode in modes]
    try:
        for server in servers:
            _wait_ready(server["process"], server["base"])
        for server in servers:  # untimed: each client's first request (with keys: the one scrypt check per key)
            started = time.perf_counter()
            drive(server, args.clients, 1, -1)
            server["warmup"] = time.perf_counter() - started
            server["latencies"].clear()
            server["wall"] = 0.0
        per_round = args.requests // args.rounds
        for round_no in range(args.rounds):  # rotate, so a busier stretch of a shared machine hits every mode
            order = servers[round_no % len(servers):] + servers[:round_no % len(servers)]
            for server in order:
                drive(server, args.clients, per_round, round_no * per_round)
    finally:
        for server in servers:
            server["process"].terminate()
        for server in servers:
            server["process"].wait(timeout=60)

    total = args.clients * args.requests
    rates = {s["mode"]: len(s["latencies"]) / s["wall"] for s in servers}
    base = rates.get("none")
    print(f"{args.clients} clients x {args.requests} requests per mode in {args.rounds} rotating rounds, "
          f"max_batch {args.max_batch}, max_wait {args.max_wait_ms} ms, {os.cpu_count()} CPUs, model {model}")
    print("| mode | requests | errors | wall s | req/s | p50 ms | p99 ms | first request ms | decision records "
          "| checkpoints | audit log | req/s vs none |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    failed = False
    for server in servers:
        latencies = sorted(server["latencies"])
        p99 = latencies[min(len(latencies) - 1, int(round(0.99 * len(latencies))) - 1)]
        public = server["public"]
        report = verify_log(server["audit"], public_keys=public, strict=public is not None)
        records = [json.loads(line) for line in server["audit"].open(encoding="utf-8")]
        decided = sum(r["event"] == "decision" for r in records)
        state = ("signed, verified" if report.key_checked else "intact") if report else "BROKEN: " + str(report)
        ratio = f"{rates[server['mode']] / base:.3f}" if base else "-"
        print(f"| {server['mode']} | {total} | {len(server['errors'])} | {server['wall']:.1f} | "
              f"{rates[server['mode']]:.1f} | {statistics.median(latencies) * 1e3:.1f} | {p99 * 1e3:.1f} | "
              f"{server['warmup'] * 1e3:.0f} | {decided} "
              f"| {sum(r['event'] == 'checkpoint' for r in records)} | {state} | {ratio} |")
        failed |= bool(server["errors"]) or not report or decided != total + args.clients
        if server["errors"]:
            print(f"  first error ({server['mode']}): {server['errors'][0]}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
