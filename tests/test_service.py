"""The HTTP service: endpoints through FastAPI's test client, and one real uvicorn process under concurrent load."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'memguard[serve]'")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx")

from fastapi.testclient import TestClient  # noqa: E402

from guard.audit import verify_log  # noqa: E402
from guard.guard import Guard  # noqa: E402
from guard.scoring import Scorer  # noqa: E402
from guard.service import create_app  # noqa: E402

PROMPT_A, PROMPT_B = "a photo of a cat", "red car on a street"


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def threshold_policy(threshold: float, on_error: str = "block") -> dict:
    """Blocks scores >= threshold; absolute, so no calibration is needed."""
    return {"name": "t", "version": 1, "calibration": "off", "on_error": on_error,
            "rules": [{"name": "too-high", "when": {"score": {"gte": threshold}}, "action": "block"}],
            "default": "allow", "audit": {"prompt": "hash"}}


@pytest.fixture(scope="module")
def pipe():
    from guard.testing import tiny_sd_pipeline

    return tiny_sd_pipeline("epsilon")


@pytest.fixture(scope="module")
def prompts(pipe) -> tuple[str, str, float]:
    """(safe prompt, risky prompt, threshold midway between their scores): the random model decides which is which."""
    low, high = sorted(Scorer(pipe).score([PROMPT_A, PROMPT_B]), key=lambda s: s.score)
    assert high.score > low.score
    return low.prompt, high.prompt, (low.score + high.score) / 2


@pytest.fixture
def client(pipe, prompts, tmp_path):
    guard = Guard(pipe, policy=threshold_policy(prompts[2]), audit_path=tmp_path / "audit.jsonl")
    with TestClient(create_app(guard, max_body_bytes=2048)) as test_client:
        test_client.audit_path = tmp_path / "audit.jsonl"
        yield test_client


def test_check_scores_and_decides(client, prompts):
    safe, risky, _ = prompts
    response = client.post("/v1/check", json={"prompts": [safe, risky]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [d["action"] for d in body["decisions"]] == ["allow", "block"]
    assert body["blocked"] == [1]
    for decision in body["decisions"]:
        score = decision["score"]
        assert score["score"] == pytest.approx(score["g_norm"] * score["norm"] + score["g_cos"] * score["cos"])
        assert "prompt" not in score  # the service does not echo prompts back
    single = client.post("/v1/check", json={"prompt": safe}).json()
    assert single["decisions"][0]["prompt_index"] == 0 and single["decisions"][0]["action"] == "allow"
    assert verify_log(client.audit_path)  # one record per decision, chained
    assert [r["event"] for r in records(client.audit_path)] == ["policy_loaded", "service_started"] + ["decision"] * 3


def test_generate_returns_png_and_blocks_with_403(client, prompts):
    safe, risky, _ = prompts
    response = client.post("/v1/generate", json={"prompt": safe, "num_inference_steps": 2, "seed": 1})
    assert response.status_code == 200, response.text
    assert base64.b64decode(response.json()["images"][0]).startswith(b"\x89PNG")
    blocked = client.post("/v1/generate", json={"prompt": risky, "num_inference_steps": 2})
    assert blocked.status_code == 403
    body = blocked.json()
    assert body["error"] == "blocked" and body["decisions"][0]["rule"] == "too-high"
    assert "images" not in body
    assert verify_log(client.audit_path)


def test_malformed_json_is_422_with_a_clear_message(client):
    response = client.post("/v1/check", content=b'{"prompt": "a cat",', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"] == "malformed_json"
    assert "malformed JSON body" in response.json()["detail"]
    both = client.post("/v1/check", json={"prompt": "a", "prompts": ["b"]})
    assert both.status_code == 422 and "exactly one of" in both.json()["detail"]
    wrong_type = client.post("/v1/generate", json={"prompt": "a", "num_inference_steps": "many"})
    assert wrong_type.status_code == 422 and "num_inference_steps" in wrong_type.json()["detail"]


def test_oversized_body_is_413(client):
    assert client.post("/v1/check", json={"prompt": "x" * 4096}).status_code == 413

    def stream():  # no Content-Length: the limit is enforced on the bytes actually received
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 512
        yield b'"}'

    streamed = client.post("/v1/check", content=stream(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["error"] == "payload_too_large"


def test_scorer_failure_fails_closed(pipe, prompts, tmp_path, monkeypatch):
    safe, risky, _ = prompts
    guard = Guard(pipe, policy=threshold_policy(1e9), audit_path=tmp_path / "audit.jsonl")  # would allow all

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(guard.scorer, "score_conditioning", broken)
    with TestClient(create_app(guard)) as test_client:
        body = test_client.post("/v1/check", json={"prompts": [safe, risky]}).json()
        assert [d["action"] for d in body["decisions"]] == ["block", "block"]
        assert all(d["rule"] == "on_error" and d["score"] is None and "simulated" in d["error"]
                   for d in body["decisions"])
        generated = test_client.post("/v1/generate", json={"prompt": safe, "num_inference_steps": 2})
        assert generated.status_code == 403 and generated.json()["decisions"][0]["rule"] == "on_error"
    assert verify_log(tmp_path / "audit.jsonl")


def test_healthz_and_openapi(client):
    from guard import __version__

    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["policy"] == "t"
    assert [g["policy"] for g in health.json()["guards"]] == ["t"] and health.json()["guards"][0]["audit_writable"]
    schema = client.get("/openapi.json").json()
    assert {"/v1/check", "/v1/generate", "/healthz"} <= set(schema["paths"])
    assert schema["info"]["version"] == __version__


def test_docs_page_loads_its_assets_from_this_server(client):
    """Offline, a page that loads Swagger UI from a CDN is blank: every asset /docs names must be served here."""
    import re

    page = client.get("/docs")
    assert page.status_code == 200 and "swagger" in page.text.lower()
    assets = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert assets and not [a for a in assets if a.startswith(("http://", "https://", "//"))], assets
    for asset in assets:
        fetched = client.get(asset)
        assert fetched.status_code == 200 and len(fetched.content) > 100, asset
    bundle = next(a for a in assets if a.endswith("swagger-ui-bundle.js"))
    assert "SwaggerUIBundle" in client.get(bundle).text


def test_healthz_is_degraded_when_a_guard_cannot_write_its_log(pipe, prompts, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.warns(UserWarning, match="requests will follow on_error"):
        guard = Guard(pipe, policy=threshold_policy(prompts[2]), audit_path=blocker / "audit.jsonl")
    with TestClient(create_app(guard)) as test_client:
        health = test_client.get("/healthz")
    assert health.status_code == 503 and health.json()["status"] == "degraded"
    assert not health.json()["guards"][0]["audit_writable"] and "not writable" in health.json()["detail"]


def test_concurrent_checks_are_micro_batched(pipe, prompts, tmp_path):
    safe, risky, threshold = prompts
    guard = Guard(pipe, policy=threshold_policy(threshold), audit_path=tmp_path / "audit.jsonl")
    app = create_app(guard, max_batch=16, max_wait_ms=50)
    results: list = []
    with TestClient(app) as test_client:

        def call(prompt):
            results.append((prompt, test_client.post("/v1/check", json={"prompt": prompt}).json()))

        threads = [threading.Thread(target=call, args=(p,)) for p in [safe, risky] * 4]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(results) == 8
    for prompt, body in results:
        assert body["decisions"][0]["action"] == ("block" if prompt == risky else "allow")
    assert app.state.batcher.batches < 8  # requests shared scoring calls
    assert verify_log(tmp_path / "audit.jsonl")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_real_uvicorn_process_under_concurrent_clients(pipe, prompts, tmp_path):
    import httpx

    safe, risky, threshold = prompts
    model_dir = tmp_path / "model"
    pipe.save_pretrained(model_dir)
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(json.dumps(threshold_policy(threshold)))  # JSON is YAML
    audit_path = tmp_path / "audit.jsonl"
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "from guard.cli import main; main()", "serve", "--model", str(model_dir),
         "--policy", str(policy_path), "--port", str(port), "--audit", str(audit_path), "--device", "cpu"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    failures: list = []
    try:
        deadline = time.monotonic() + 90
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.25)

        def client(worker: int) -> None:
            with httpx.Client(base_url=base, timeout=30) as http:
                for i in range(10):
                    prompt = risky if (worker + i) % 2 else safe
                    response = http.post("/v1/check", json={"prompt": prompt})
                    if response.json()["decisions"][0]["action"] != ("block" if prompt == risky else "allow"):
                        failures.append(response.text)

        threads = [threading.Thread(target=client, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert not failures
    report = verify_log(audit_path)
    assert report, str(report)
    assert sum(r["event"] == "decision" for r in records(audit_path)) == 40


def test_a_micro_batch_pays_one_fsync_and_fails_closed_when_it_cannot(pipe, prompts, tmp_path, monkeypatch):
    """With ``audit.fsync``, the records of every request of a micro-batch reach the disk with one fsync (not one per
    request) before any answer is sent; a failed flush answers every request of the batch with ``on_error``."""
    from guard.audit import sink as sink_module
    from guard.core import Submission

    safe, risky, threshold = prompts
    policy = {**threshold_policy(threshold), "audit": {"prompt": "hash", "fsync": True}}
    guard = Guard(pipe, policy=policy, audit_path=tmp_path / "audit.jsonl")
    guard.check(safe)  # opens the log (policy_loaded) outside the counted batch
    synced: list[int] = []
    real = os.fsync
    failing = {"on": False}

    def fsync(fd: int) -> None:
        if failing["on"]:
            raise OSError(5, "Input/output error")
        synced.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(sink_module.os, "fsync", fsync)
    batch = [Submission([p], context={"endpoint": "/v1/check"}) for p in [safe, risky] * 4]
    reports, _ = guard.core.judge_many(batch, mode="check")
    assert len(synced) == 1 and synced[0] == (tmp_path / "audit.jsonl").stat().st_size  # covers all 8 requests
    assert [r.decisions[0].action for r in reports] == ["allow", "block"] * 4
    assert all(len(r.records) == 1 and r.audit_error is None for r in reports)
    failing["on"] = True
    with pytest.warns(UserWarning, match="not audited"):
        reports, _ = guard.core.judge_many(batch, mode="check")
    assert all(r.decisions[0].rule == "on_error" and r.decisions[0].action == "block" for r in reports)
    assert all(r.audit_error and "cannot flush" in r.audit_error and not r.records for r in reports)
