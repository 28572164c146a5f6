"""Load test of ``memguard serve`` over loopback: latency p50/p99 and throughput, then the audit log verified.

    python benchmarks/service_load.py                  # tiny fixture model, 4 clients x 200 requests, 3 modes
    python benchmarks/service_load.py --model DIR --clients 4 --requests 200 --max-batch 16 --max-wait-ms 10
    python benchmarks/service_load.py --modes none     # without API keys only
    python benchmarks/service_load.py --engines        # in-process vs one process vs Ray Serve, 1 and 2 replicas

``--engines`` (see ``compare_engines``) measures what the service adds to the guard and what Ray Serve adds to
the service, side by side in one run; the rest of this docstring is about the auth modes.

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
import asyncio
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
    parser.add_argument("--engines", action="store_true",
                        help="compare in-process judging, the single-process service and Ray Serve (1 and 2 replicas)"
                             " instead of auth modes; --clients defaults to --max-batch there")
    parser.add_argument("--replicas", default="1,2", help="with --engines: Ray Serve replica counts to compare")
    parser.add_argument("--batches", type=int, default=40, help="with --engines: in-process batches per variant")
    parser.add_argument("--device", default="cpu", help="with --engines: torch device of every engine (cuda on GPUs)")
    parser.add_argument("--address", default=None,
                        help="with --engines: Ray cluster to join (default: a local one on this machine's CPUs)")
    parser.add_argument("--num-gpus-per-replica", type=float, default=0.0, help="with --engines: GPUs per replica")
    args = parser.parse_args()
    if args.engines:
        compare_engines(args)
        return
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


# ---------------------------------------------------------------------------------------------- --engines


def _fsync_policy(path: Path) -> Path:
    """The benchmark's policy: an absolute threshold (no calibration run), ``audit.fsync: true`` as in production."""
    path.write_text(json.dumps({"name": "load", "version": 1, "calibration": "off", "audit": {"fsync": True},
                                "rules": [{"when": {"score": {"gte": 1e6}}, "action": "block"}]}))
    return path


def _prompts(count: int, offset: int = 0) -> list[str]:
    from guard.testing import DEFAULT_WORDS

    return [" ".join(DEFAULT_WORDS[((offset + i) * 7 + k * 3) % len(DEFAULT_WORDS)] for k in range(6))
            for i in range(count)]


def in_process_rows(model: str, policy: Path, work: Path, batch: int, batches: int, rounds: int, device: str
                    ) -> list[dict]:
    """Prompts/s of the guard itself on ``batch`` prompts at a time, with fsync on: ``check_many`` (one request of
    ``batch`` prompts), ``judge_many`` of ``batch`` one-prompt requests as the service's micro-batch makes them (one
    fsync per micro-batch), and the same with one fsync per request (how ``judge_many`` wrote before; replayed here
    by writing each request's records on their own)."""
    import torch

    from guard.audit import sink as sink_module
    from guard.core import GuardCore, Submission
    from guard.guard import Guard
    from guard.loading import load_pipeline

    torch.set_num_threads(1)
    guard = Guard(load_pipeline(model, device=device), policy=str(policy), audit_path=str(work / "in-process") + "/")
    prompts = _prompts(batch)
    guard.check_many(prompts)  # warm: caches, the log opened
    fsyncs = [0]
    real = sink_module.os.fsync

    def counted(fd: int) -> None:
        fsyncs[0] += 1
        real(fd)

    def one_fsync_per_request(self: GuardCore, reports, texts) -> None:
        for report, each in zip(reports, texts):  # each request's records flushed on their own
            self._write_decisions(report, each)

    def micro_batch() -> None:
        guard.core.judge_many([Submission([p], context={"endpoint": "/v1/check"}) for p in prompts])

    def micro_batch_per_request_fsync() -> None:
        batched = GuardCore._write_all_decisions
        GuardCore._write_all_decisions = one_fsync_per_request
        try:
            micro_batch()
        finally:
            GuardCore._write_all_decisions = batched

    variants = {
        "check_many: one request of B prompts": lambda: guard.check_many(prompts),
        "judge_many: B one-prompt requests, one fsync per micro-batch (now)": micro_batch,
        "judge_many: B one-prompt requests, one fsync per request (before)": micro_batch_per_request_fsync,
    }
    totals = {name: [0.0, 0] for name in variants}
    sink_module.os.fsync = counted
    try:
        for _ in range(rounds):  # interleaved, so a busy stretch of a shared machine slows every variant alike
            for name, call in variants.items():
                before = fsyncs[0]
                started = time.perf_counter()
                for _ in range(batches // rounds):
                    call()
                totals[name][0] += time.perf_counter() - started
                totals[name][1] += fsyncs[0] - before
    finally:
        sink_module.os.fsync = real
        guard.close()
    done = rounds * (batches // rounds)
    return [{"variant": name, "prompts_s": done * batch / seconds, "ms_batch": seconds / done * 1e3,
             "fsyncs": count / done} for name, (seconds, count) in totals.items()]


async def _load(base: str, clients: int, requests: int, offset: int, server: dict, *, health: bool = False) -> None:
    """``clients`` concurrent keep-alive clients (asyncio), ``requests`` one-prompt checks each (``health``: as many
    ``GET /healthz``, the HTTP path without scoring, tallied apart)."""
    import httpx

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        for i in range(requests):
            started = time.perf_counter()
            if health:
                response = await http.get(f"{base}/healthz")
            else:
                prompt = _prompts(1, offset + worker * requests + i)[0]
                response = await http.post(f"{base}/v1/check", json={"prompt": prompt})
                server["latencies"].append(time.perf_counter() - started)
            if response.status_code != 200:
                server["errors"].append(f"{response.status_code}: {response.text[:200]}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(w, http) for w in range(clients)))
        server["health_wall" if health else "wall"] += time.perf_counter() - started
        if health:
            server["health"] += clients * requests


def _per_call(records: list[dict]) -> float:
    """Mean prompts per scoring call, read off the trail: the records of one ``judge_many`` call are consecutive in
    their writer's segment and share its ``latency_scoring_ms``."""
    import itertools

    in_segment_order = sorted(records, key=lambda r: str(r.get("writer")))  # stable: each segment's own order
    calls = [len(list(group)) for _, group in itertools.groupby(
        in_segment_order, key=lambda r: (r.get("writer"), r.get("latency_scoring_ms")))]
    return statistics.mean(calls) if calls else 0.0


def compare_engines(args: argparse.Namespace) -> None:
    """One run, one table each: the guard in process (what the service's batch costs without HTTP), then the same
    model behind ``memguard serve`` (one uvicorn process) and behind Ray Serve with 1 and 2 replicas (each with its
    own pipeline; one local Ray cluster, an application per replica count), loaded in rotating rounds by the same
    ``--max-batch`` concurrent clients. Every engine writes a trail with fsync on; afterwards each is verified and
    must hold one decision record per answered check."""
    import ray
    from ray import serve

    from guard.audit.trail import read_trail
    from guard.audit.trail_verify import verify_trail
    from guard.service.ray_serve import ServeArgs, build_app

    clients = args.clients if args.clients != 4 else args.max_batch
    replica_counts = [int(n) for n in args.replicas.split(",") if n.strip()]
    work = Path(tempfile.mkdtemp(prefix="memguard-engines-"))
    model = args.model
    if model is None:
        from guard.testing import tiny_sd_pipeline

        model = str(work / "tiny-sd")
        tiny_sd_pipeline("epsilon").save_pretrained(model)
    policy = _fsync_policy(work / "policy.json")
    print(f"model {model}, {os.cpu_count()} CPUs, max_batch {args.max_batch}, max_wait {args.max_wait_ms} ms, "
          f"{clients} clients, fsync on")

    rows = in_process_rows(model, policy, work, args.max_batch, args.batches, args.rounds, args.device)
    print(f"\nIn process, batches of B = {args.max_batch} prompts ({args.batches} batches per variant, "
          f"{args.rounds} interleaved rounds):\n")
    print("| in process | prompts/s | ms per batch | fsyncs per batch |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['prompts_s']:.1f} | {row['ms_batch']:.1f} | {row['fsyncs']:.1f} |")

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)}
    port = _free_port()
    single = subprocess.Popen(
        [sys.executable, "-c", "from guard.cli import main; main()", "serve", "--model", model, "--policy",
         str(policy), "--port", str(port), "--audit", str(work / "single") + "/", "--device", args.device,
         "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)], env=env)
    servers = [{"name": "single process (uvicorn)", "replicas": 1, "base": f"http://127.0.0.1:{port}",
                "trail": work / "single", "latencies": [], "errors": [], "wall": 0.0, "health": 0,
                "health_wall": 0.0}]
    started = time.perf_counter()
    runtime_env = {"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": env["PYTHONPATH"]}}
    if args.address:
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
    serve_port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    cpus = max(0.1, (os.cpu_count() or 1) / sum(replica_counts))
    for n in replica_counts:
        trail = work / f"ray{n}"
        serve.run(build_app(ServeArgs(model=model, audit=str(trail) + "/", policy=str(policy), device=args.device,
                                      replicas=n, num_cpus_per_replica=cpus, max_batch=args.max_batch,
                                      num_gpus_per_replica=args.num_gpus_per_replica,
                                      max_wait_ms=args.max_wait_ms, max_ongoing_requests=max(2 * args.max_batch,
                                                                                              clients))),
                  name=f"ray{n}", route_prefix=f"/ray{n}")
        servers.append({"name": "Ray Serve", "replicas": n, "base": f"http://127.0.0.1:{serve_port}/ray{n}",
                        "trail": trail, "latencies": [], "errors": [], "wall": 0.0, "health": 0,
                        "health_wall": 0.0})
    print(f"\nRay cluster and applications up in {time.perf_counter() - started:.1f} s (not included below)")
    try:
        _wait_ready(single, servers[0]["base"])
        for server in servers:  # untimed warm-up: every replica gets requests before the clock starts
            asyncio.run(_load(server["base"], clients, 2, -1000, server))
            server["latencies"].clear()
            server["errors"].clear()
            server["wall"] = 0.0
        per_round = args.requests // args.rounds
        for round_no in range(args.rounds):
            order = servers[round_no % len(servers):] + servers[:round_no % len(servers)]
            for server in order:
                asyncio.run(_load(server["base"], clients, per_round, round_no * clients * per_round, server))
                asyncio.run(_load(server["base"], clients, max(1, per_round // 4), 0, server, health=True))
    finally:
        single.terminate()
        single.wait(timeout=60)
        for n in replica_counts:
            serve.delete(f"ray{n}")
        serve.shutdown()
        ray.shutdown()

    print(f"\nOver HTTP, {clients} concurrent clients x {args.requests} one-prompt checks per engine, "
          f"{args.rounds} rotating rounds:\n")
    print("| engine | replicas | requests | errors | wall s | req/s | req/s per replica | p50 ms | p99 ms | "
          "prompts per scoring call | GET /healthz req/s | decision records | writers | trail | "
          "req/s vs single process |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base_rate = None
    failed = False
    for server in servers:
        latencies = sorted(server["latencies"])
        rate = len(latencies) / server["wall"]
        base_rate = base_rate or rate
        p99 = latencies[min(len(latencies) - 1, int(round(0.99 * len(latencies))) - 1)]
        records = [r for r in read_trail(server["trail"]) if r.get("event") == "decision"]
        report = verify_trail(server["trail"])
        writers = len({r.get("writer") for r in records})
        expected = len(latencies) + 2 * clients
        print(f"| {server['name']} | {server['replicas']} | {len(latencies)} | {len(server['errors'])} | "
              f"{server['wall']:.1f} | {rate:.1f} | {rate / server['replicas']:.1f} | "
              f"{statistics.median(latencies) * 1e3:.1f} | {p99 * 1e3:.1f} | {_per_call(records):.1f} | "
              f"{server['health'] / server['health_wall']:.0f} | {len(records)} | {writers} | "
              f"{'intact' if report else 'BROKEN'} | {rate / base_rate:.2f} |")
        failed |= bool(server["errors"]) or not report or len(records) != expected
        if server["errors"]:
            print(f"  first error ({server['name']} x{server['replicas']}): {server['errors'][0]}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
