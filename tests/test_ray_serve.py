"""``memguard serve --engine ray`` on a local Ray cluster (2 CPUs, no dashboard): two replicas of the tiny fixture
model, API keys, a signing key and one audit trail; the same requests through the single-process app.

One deployment serves the whole module (starting it costs about 30 s on two shared cores); the tests run in file
order and the last one kills a replica and ends the deployment.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray engine is an optional extra: pip install 'memguard[ray]'")
serve = pytest.importorskip("ray.serve", reason="memguard serve --engine ray needs Ray Serve: pip install "
                                                "'memguard[ray]' (ray[serve])")
pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'memguard[serve]'")
httpx = pytest.importorskip("httpx", reason="the clients of these tests use httpx")

from click.testing import CliRunner  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from guard.audit import generate_keypair  # noqa: E402
from guard.audit.trail import read_trail  # noqa: E402
from guard.audit.trail_verify import verify_trail  # noqa: E402
from guard.cli import main  # noqa: E402
from guard.guard import Guard  # noqa: E402
from guard.loading import load_pipeline  # noqa: E402
from guard.scoring import Scorer  # noqa: E402
from guard.service import create_app  # noqa: E402
from guard.service.keys import hash_secret, load_api_keys  # noqa: E402
from guard.service.ray_serve import APP_NAME, REPLICA_HEADER, ServeArgs, build_app  # noqa: E402
from guard.service.routing import ServiceAccess  # noqa: E402
from guard.testing import DEFAULT_WORDS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECRETS = {name: f"{name}-secret-0123456789abcdef" for name in ("alice", "carol")}
PROMPTS = [" ".join(DEFAULT_WORDS[(i * 7 + k * 3) % len(DEFAULT_WORDS)] for k in range(5)) for i in range(12)]


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {name}.{SECRETS[name]}"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _split_threshold(scores: list[float]) -> float:
    """Midway across the widest gap near the median: some prompts are blocked, some allowed, none close to the line."""
    ordered = sorted(scores)
    middle = range(len(ordered) // 4, 3 * len(ordered) // 4)
    i = max(middle, key=lambda j: ordered[j + 1] - ordered[j])
    return (ordered[i] + ordered[i + 1]) / 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The model, the policy (an absolute threshold that splits PROMPTS), the key file and a signing key pair."""
    from guard.testing import tiny_sd_pipeline

    work = tmp_path_factory.mktemp("ray-serve")
    model = work / "model"
    tiny_sd_pipeline("epsilon").save_pretrained(model)
    pipe = load_pipeline(str(model), device="cpu")
    threshold = _split_threshold([s.score for s in Scorer(pipe).score(PROMPTS)])
    policy = work / "policy.json"
    policy.write_text(json.dumps({"name": "split", "version": 1, "calibration": "off", "audit": {"fsync": True},
                                  "rules": [{"name": "high", "when": {"score": {"gte": threshold}},
                                             "action": "block"}]}))
    keys = work / "keys.yaml"
    keys.write_text(
        "keys:\n"
        f"  - {{id: alice, secret_hash: '{hash_secret(SECRETS['alice'], log_n=10, r=8, p=1)}'}}\n"
        f"  - {{id: carol, secret_hash: '{hash_secret(SECRETS['carol'], log_n=10, r=8, p=1)}', "
        "rate_limit: {per_second: 0.001, burst: 3}}\n")
    private, public = generate_keypair(work / "signing")
    return {"work": work, "model": model, "pipe": pipe, "policy": policy, "keys": keys, "private": private,
            "public": public, "trail": work / "trail"}


@pytest.fixture(scope="module")
def deployment(setup):
    """Two replicas on a local 2-CPU Ray cluster, serving on a free port; yields the base URL."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                                       "PYTHONPATH": pythonpath}})
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = ServeArgs(model=str(setup["model"]), audit=str(setup["trail"]) + "/", policy=str(setup["policy"]),
                         api_keys=str(setup["keys"]), device="cpu", replicas=2, num_cpus_per_replica=0.5,
                         max_wait_ms=20, metrics_push_s=0.5, bind=f"127.0.0.1:{port}",
                         env={"MEMGUARD_AUDIT_SIGNING_KEY": str(setup["private"])})
        serve.run(build_app(args), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def decision_records(trail: Path) -> list[dict]:
    return [r for r in read_trail(trail) if r.get("event") == "decision"]


def single_process_answers(setup, bodies: list[dict], audit: Path, generate: list[dict] = ()) -> tuple[list, list]:
    """The same requests through the single-process app (same model files, policy and key file): the checks' bodies,
    and each generation's status and body."""
    def make(spec, lock=None):
        return Guard(setup["pipe"], policy=spec, audit_path=audit, source="service", lock=lock)

    default = make(str(setup["policy"]))
    access = ServiceAccess.build(load_api_keys(setup["keys"]), default, make)
    with TestClient(create_app(default, access=access, max_wait_ms=20)) as client:
        checks = [client.post("/v1/check", json=body, headers=bearer("alice")).json() for body in bodies]
        generated = [client.post("/v1/generate", json=body, headers=bearer("alice")) for body in generate]
        return checks, [(r.status_code, r.json()) for r in generated]


def test_two_replicas_decide_and_score_as_the_single_process_service(setup, deployment, tmp_path):
    bodies = [{"prompt": p} for p in PROMPTS] + [{"prompts": PROMPTS[:5]}, {"prompts": PROMPTS[5:]}]
    answers: dict[int, dict] = {}
    replicas: list[str] = []
    lock = threading.Lock()

    def client(indices: list[int]) -> None:
        with httpx.Client(base_url=deployment, timeout=60, headers=bearer("alice")) as http:
            for i in indices:
                response = http.post("/v1/check", json=bodies[i])
                assert response.status_code == 200, response.text
                with lock:
                    answers[i] = response.json()
                    replicas.append(response.headers[REPLICA_HEADER])

    for _ in range(5):  # concurrent clients: the replicas batch them (serve.batch); repeat until both answered
        threads = [threading.Thread(target=client, args=(list(range(w, len(bodies), 4)),)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if len(set(replicas)) == 2:
            break
    assert len(set(replicas)) == 2, Counter(replicas)
    by_action = {answers[i]["decisions"][0]["action"]: prompt for i, prompt in enumerate(PROMPTS)}
    allowed, blocked = by_action["allow"], by_action["block"]
    generate = [{"prompt": allowed, "num_inference_steps": 2, "seed": 7}, {"prompt": blocked, "num_inference_steps": 2}]
    with httpx.Client(base_url=deployment, timeout=120, headers=bearer("alice")) as http:
        served = [http.post("/v1/generate", json=body) for body in generate]
    expected, generated = single_process_answers(setup, bodies, tmp_path / "single.jsonl", generate)
    assert [r.status_code for r in served] == [status for status, _ in generated] == [200, 403]
    assert served[0].json()["images"] == generated[0][1]["images"]  # the same PNG, byte for byte
    assert served[1].json()["decisions"][0]["rule"] == generated[1][1]["decisions"][0]["rule"] == "high"
    actions = Counter()
    for i, want in enumerate(expected):
        got = answers[i]["decisions"]
        assert [(d["prompt_index"], d["action"], d["rule"]) for d in got] == [
            (d["prompt_index"], d["action"], d["rule"]) for d in want["decisions"]], bodies[i]
        for a, b in zip(got, want["decisions"]):
            for field in ("norm", "cos", "score"):
                assert a["score"][field] == pytest.approx(b["score"][field], abs=1e-5)
            actions[a["action"]] += 1
        assert answers[i]["blocked"] == want["blocked"]
    assert actions["allow"] and actions["block"]  # the policy splits the prompts: both verdicts were compared
    recorded = decision_records(setup["trail"])
    assert {r["writer"] for r in recorded} == set(replicas)  # each replica wrote its own segment
    assert all(r["context"]["key_id"] == "alice" for r in recorded)
    outcomes = [r for r in read_trail(setup["trail"]) if r.get("event") == "outcome"]
    assert sorted(r["outcome"] for r in outcomes) == ["blocked", "generated"]  # each chained to its decision


def test_a_keys_rate_limit_holds_across_replicas(deployment):
    """carol may make 3 requests (burst 3, refilled once in 1000 s): per-replica buckets would let up to 6 through."""
    statuses, replicas = [], set()
    with httpx.Client(base_url=deployment, timeout=60, headers=bearer("carol")) as http:
        for _ in range(10):
            response = http.post("/v1/check", json={"prompt": PROMPTS[0]})
            statuses.append(response.status_code)
            replicas.add(response.headers[REPLICA_HEADER])
            if response.status_code == 429:
                assert response.json()["error"] == "rate_limited" and int(response.headers["retry-after"]) >= 1
    assert len(replicas) == 2, "both replicas must have answered for this test to tell shared from local buckets"
    assert Counter(statuses) == {200: 3, 429: 7}


def test_metrics_answer_for_every_replica(setup, deployment):
    time.sleep(1.5)  # every replica pushed its counters since the last request (metrics_push_s = 0.5)
    body = httpx.get(f"{deployment}/metrics", headers=bearer("alice"), timeout=30).text
    per_replica = Counter()
    for replica, value in re.findall(r'^memguard_decisions_total\{[^}]*replica="([^"]+)"[^}]*\} (\S+)$', body, re.M):
        per_replica[replica] += float(value)
    recorded = Counter(r["writer"] for r in decision_records(setup["trail"]))
    assert per_replica == recorded and len(recorded) == 2


def test_a_replica_killed_mid_load_loses_no_record(setup, deployment, tmp_path):
    """SIGKILL one replica under load: Ray starts a new one; every request gets an answer (after retries of 5xx and
    dropped connections), every answered decision is in the trail, and the trail verifies with the public key."""
    trail = setup["trail"]
    victim = json.loads(sorted(trail.glob("*.jsonl"))[0].open().readline())
    assert victim["event"] == "segment"
    os.kill(victim["process"]["pid"], 0)  # the replica's process runs on this machine (the local cluster's)
    answered: list[tuple[str, str, int]] = []  # (request id, replica, prompts)
    retried: Counter = Counter()
    unanswered: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client(worker: int) -> None:
        with httpx.Client(base_url=deployment, timeout=60, headers=bearer("alice")) as http:
            i = 0
            while not stop.is_set():
                i += 1
                body = {"prompt": PROMPTS[(worker + i) % len(PROMPTS)]} if i % 3 else {"prompts": PROMPTS[:3]}
                for _attempt in range(20):
                    try:
                        response = http.post("/v1/check", json=body)
                    except httpx.TransportError as error:
                        with lock:
                            retried[type(error).__name__] += 1
                        time.sleep(0.25)
                        continue
                    if response.status_code >= 500:
                        with lock:
                            retried[response.status_code] += 1
                        time.sleep(0.25)
                        continue
                    assert response.status_code == 200, response.text
                    with lock:
                        answered.append((response.json()["request_id"], response.headers[REPLICA_HEADER],
                                         len(response.json()["decisions"])))
                    break
                else:
                    unanswered.append(json.dumps(body))

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        before = len(answered)
        os.kill(victim["process"]["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        deadline = killed_at + 120
        while time.monotonic() < deadline:  # until a replacement replica has answered requests
            writers = {w for _, w, _ in answered[before:]}
            if len(writers - {victim["writer"]}) >= 2:
                break
            time.sleep(0.5)
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    writers = Counter(w for _, w, _ in answered)
    assert not unanswered
    assert writers[victim["writer"]] > 0 and len(writers) == 3, writers  # the dead one, the survivor, its successor
    recorded = Counter(r["request_id"] for r in decision_records(trail))
    assert [a for a in answered if recorded[a[0]] != a[2]] == []  # every answer's decisions are on disk, whole
    serve.delete(APP_NAME)  # the surviving replicas close their segments (a last signed checkpoint each)

    report = verify_trail(trail, public_keys=[setup["public"]])
    assert report, str(report)
    runner = CliRunner()
    verified = runner.invoke(main, ["audit", "verify", str(trail), "--public-key", str(setup["public"])])
    assert verified.exit_code == 0, verified.output
    summary = json.loads(runner.invoke(main, ["audit", "summary", str(trail), "--json"]).output)
    assert {w["writer"] for w in summary["writers"]} == set(writers)
    out = tmp_path / "report.html"
    html = runner.invoke(main, ["audit", "report", str(trail), "--out", str(out), "--public-key", str(setup["public"])])
    assert html.exit_code == 0, html.output
    assert all(writer in out.read_text() for writer in writers)
