"""API keys in the HTTP service: refused callers cause no work, each key gets its policy and rate limit, and every
record of a key's requests carries its id."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'memguard[serve]'")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx")

from fastapi.testclient import TestClient  # noqa: E402

from guard.audit import verify_log  # noqa: E402
from guard.cli import main  # noqa: E402
from guard.guard import Guard  # noqa: E402
from guard.service import create_app  # noqa: E402
from guard.service.keys import (  # noqa: E402
    ApiKeyFileError,
    Authenticator,
    hash_secret,
    load_api_keys,
    verify_secret,
)
from guard.service.routing import ServiceAccess, is_loopback  # noqa: E402

PROMPT = "a photo of a cat"
SECRETS = {name: f"{name}-secret-0123456789abcdef" for name in ("alice", "bob", "carol", "dave")}


def cheap_hash(secret: str) -> str:
    """Test keys use scrypt at its lowest accepted cost (the default's cost is tested once, below)."""
    return hash_secret(secret, log_n=10, r=8, p=1)


def bearer(name: str, secret: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {name}.{secret or SECRETS[name]}"}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def decisions(path: Path) -> list[dict]:
    return [r for r in records(path) if r["event"] in ("decision", "error")]


@pytest.fixture
def key_file(tmp_path) -> Path:
    """alice: her own policy (blocks everything); bob: his team's (allows everything); carol: the file's default
    policy (blocks) with a tight rate limit; dave: nothing anywhere, so the server's --policy."""
    block = {"name": "block-all", "calibration": "off", "rules": [{"name": "all", "when": {"score": {"gte": -1e9}},
                                                                      "action": "block"}]}
    allow = {"name": "allow-all", "calibration": "off", "default": "allow", "rules": []}
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "block.yaml").write_text(json.dumps(block))
    (tmp_path / "policies" / "allow.yaml").write_text(json.dumps(allow))
    path = tmp_path / "keys.yaml"
    path.write_text(textwrap.dedent(f"""
        teams:
          research: {{policy: policies/allow.yaml}}
          ops: {{rate_limit: {{per_second: 0.01, burst: 2}}}}
        keys:
          - {{id: alice, secret_hash: "{cheap_hash(SECRETS['alice'])}", policy: policies/block.yaml}}
          - {{id: bob, secret_hash: "{cheap_hash(SECRETS['bob'])}", team: research}}
          - {{id: carol, secret_hash: "{cheap_hash(SECRETS['carol'])}", team: ops, policy: policies/block.yaml}}
          - {{id: dave, secret_hash: "{cheap_hash(SECRETS['dave'])}"}}
    """))
    return path


def server_policy() -> dict:
    return {"name": "server", "calibration": "off", "default": "allow", "rules": []}


@pytest.fixture
def service(sd_pipe, key_file, tmp_path):
    audit = tmp_path / "audit.jsonl"

    def make(spec, lock=None):
        return Guard(sd_pipe, spec, audit_path=audit, source="service", lock=lock)

    default = make(server_policy())
    access = ServiceAccess.build(load_api_keys(key_file), default, make)
    app = create_app(default, access=access, bind="127.0.0.1:0")
    with TestClient(app) as client:
        client.audit_path, client.access = audit, access
        yield client


# ---------------------------------------------------------------- secrets and key files


def test_secrets_are_stored_as_scrypt_hashes():
    hashed = hash_secret(SECRETS["alice"])  # the default cost: OWASP's scrypt minimum
    assert hashed.startswith("scrypt$ln=14,r=8,p=5$")
    assert hashlib.sha256(SECRETS["alice"].encode()).hexdigest() not in hashed
    assert verify_secret(SECRETS["alice"], hashed) and not verify_secret(SECRETS["bob"], hashed)
    assert cheap_hash(SECRETS["alice"]) != cheap_hash(SECRETS["alice"])  # salted
    with pytest.raises(ValueError, match="at least 16 characters"):
        hash_secret("short")


@pytest.mark.parametrize("body,message", [
    ("keys: [{id: a, secret_hash: abc}]", "keys[0].secret_hash: not a memguard scrypt hash"),
    ("keys: [{id: a, secret_hash: HASH, polcy: strict}]", "keys[0].polcy: unknown field"),
    ("keys: [{id: a, secret_hash: HASH}, {id: a, secret_hash: HASH}]", "two keys have the id 'a'"),
    ("keys: [{id: a, secret_hash: HASH, team: nope}]", "team 'nope' is not under teams"),
    ("keys: [{id: 'a b', secret_hash: HASH}]", "keys[0].id: String should match pattern"),
    ("keys: [{id: a, secret_hash: HASH, rate_limit: {per_second: 0}}]", "rate_limit.per_second"),
    ("keys: []", "keys: Tuple should have at least 1 item"),
    ("just a string", "the top level must be a mapping with a 'keys' list, or a list of keys"),
    ("- just a list", "keys[0]: Input should be"),
    ("keys: [unclosed", "not valid YAML/JSON"),
])
def test_key_file_errors_name_the_field(tmp_path, body, message):
    path = tmp_path / "keys.yaml"
    path.write_text(body.replace("HASH", f"'{cheap_hash('x' * 16)}'"))
    with pytest.raises(ApiKeyFileError) as caught:
        load_api_keys(path)
    assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_policy_and_rate_limit_precedence(key_file):
    keys = load_api_keys(key_file).keys
    folder = key_file.parent
    assert keys["alice"].policy == str(folder / "policies/block.yaml")  # the key's own
    assert keys["bob"].policy == str(folder / "policies/allow.yaml")  # its team's
    assert keys["carol"].policy == str(folder / "policies/block.yaml") and keys["carol"].rate_limit.capacity == 2
    assert keys["dave"].policy is None and keys["dave"].rate_limit is None  # the server's --policy, unlimited
    key_file.write_text(key_file.read_text() + "defaults: {policy: monitor, rate_limit: {per_second: 5}}\n")
    keys = load_api_keys(key_file).keys
    assert keys["dave"].policy == "monitor" and keys["dave"].rate_limit.per_second == 5  # the file's defaults
    assert keys["alice"].policy == str(folder / "policies/block.yaml")  # a key's own still wins
    assert keys["carol"].rate_limit.per_second == 0.01  # and so does a team's


# ---------------------------------------------------------------- refused callers


@pytest.mark.parametrize("headers,detail", [
    ({}, "missing Authorization"),
    ({"Authorization": "Basic YWxpY2U6eA=="}, "must be 'Bearer <api key>'"),
    ({"Authorization": "Bearer mallory.guess-guess-guess-guess"}, "invalid API key"),
    ({"Authorization": "Bearer alice"}, "invalid API key"),
    (bearer("alice", "wrong-secret-but-long-enough"), "invalid API key"),
])
def test_unauthenticated_requests_get_401_and_no_work(service, monkeypatch, headers, detail):
    scored = []
    for guard in service.access.distinct_guards():
        original = guard.scorer.score_conditioning
        monkeypatch.setattr(guard.scorer, "score_conditioning",
                            lambda *a, _f=original, **k: scored.append(1) or _f(*a, **k))
    before = service.audit_path.read_text()
    for path, body in (("/v1/check", {"prompt": PROMPT}), ("/v1/generate", {"prompt": PROMPT})):
        response = service.post(path, json=body, headers=headers)
        assert response.status_code == 401, response.text
        assert response.json() == {"error": "unauthorized", "detail": response.json()["detail"]}
        assert detail in response.json()["detail"]
        assert response.headers["www-authenticate"].startswith("Bearer")
    assert service.get("/openapi.json", headers=headers).status_code == 401
    assert service.get("/healthz").status_code == 200  # open, for load balancers
    assert not scored and service.audit_path.read_text() == before


def test_authentication_happens_before_the_body_is_read(service):
    app = service.app
    received = []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b'{"prompt": "a cat"}', "more_body": False}

    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/check", "raw_path": b"/v1/check", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"19")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 401 and not received


# ---------------------------------------------------------------- per-key policies, ids and limits


def test_each_key_gets_its_policy_and_its_id_in_every_record(service):
    actions = {}
    for name in ("alice", "bob", "dave"):
        body = service.post("/v1/check", json={"prompt": PROMPT}, headers=bearer(name)).json()
        actions[name] = body["decisions"][0]["action"]
    assert actions == {"alice": "block", "bob": "allow", "dave": "allow"}
    generated = service.post("/v1/generate", json={"prompt": PROMPT, "num_inference_steps": 2}, headers=bearer("bob"))
    assert generated.status_code == 200, generated.text
    blocked = service.post("/v1/generate", json={"prompt": PROMPT, "num_inference_steps": 2}, headers=bearer("alice"))
    assert blocked.status_code == 403
    log = records(service.audit_path)
    per_request = [r for r in log if r["event"] in ("decision", "outcome")]
    assert len(per_request) == 3 + 2 + 2
    for record in per_request:
        assert record["context"]["key_id"] in ("alice", "bob", "dave"), record
        assert record["context"]["endpoint"] in ("/v1/check", "/v1/generate")
    policy_of = {r["context"]["key_id"]: r["policy"]["name"] for r in per_request}
    assert policy_of == {"alice": "block-all", "bob": "allow-all", "dave": "server"}
    assert {r["context"].get("team") for r in per_request if r["context"]["key_id"] == "bob"} == {"research"}
    (started,) = [r for r in log if r["event"] == "service_started"]
    assert started["auth"] == "api_keys" and started["bind"] == "127.0.0.1:0"
    assert {k["id"]: k["policy"]["name"] for k in started["keys"]} == {
        "alice": "block-all", "bob": "allow-all", "carol": "block-all", "dave": "server"}
    loaded = {r["policy"]["name"] for r in log if r["event"] == "policy_loaded"}
    assert loaded == {"server", "block-all", "allow-all"}  # one guard per distinct policy
    assert verify_log(service.audit_path)
    summary = CliRunner().invoke(main, ["audit", "summary", str(service.audit_path), "--key", "alice", "--json"])
    assert json.loads(summary.output)["decisions"] == 2


def test_rate_limit_answers_429_for_that_key_only(service):
    ok = [service.post("/v1/check", json={"prompt": PROMPT}, headers=bearer("carol")) for _ in range(2)]
    assert [r.status_code for r in ok] == [200, 200]
    before = len(records(service.audit_path))
    limited = service.post("/v1/check", json={"prompt": PROMPT}, headers=bearer("carol"))
    assert limited.status_code == 429 and limited.json()["error"] == "rate_limited"
    assert "over its rate limit" in limited.json()["detail"] and int(limited.headers["retry-after"]) >= 1
    assert len(records(service.audit_path)) == before  # no work for a refused request
    assert service.post("/v1/check", json={"prompt": PROMPT}, headers=bearer("bob")).status_code == 200


def test_failed_authentications_are_throttled_per_key(key_file, monkeypatch):
    import guard.service.keys as auth

    authenticator = Authenticator(load_api_keys(key_file).keys, failures_per_minute=2)
    good = bearer("alice")["Authorization"]
    assert authenticator.authenticate(good).key.id == "alice"
    hashed = []
    monkeypatch.setattr(auth, "verify_secret", lambda *a: hashed.append(1) or False)
    wrong = bearer("alice", "wrong-secret-but-long-enough")["Authorization"]
    assert [authenticator.authenticate(wrong).status for _ in range(3)] == [401, 401, 429]
    assert len(hashed) == 2  # the third guess is refused without hashing
    assert authenticator.authenticate(good).key.id == "alice"  # the key's verified secret keeps working
    assert authenticator.authenticate(bearer("bob")["Authorization"]).status == 401  # hashing is patched: refused


# ---------------------------------------------------------------- command line


def test_serve_refuses_a_public_address_without_keys(tmp_path):
    runner = CliRunner()
    public = runner.invoke(main, ["serve", "--model", str(tmp_path / "none"), "--host", "0.0.0.0"])
    assert public.exit_code != 0 and "refusing to serve 0.0.0.0 without API keys" in public.output
    both = runner.invoke(main, ["serve", "--model", "m", "--api-keys", "k.yaml", "--insecure-no-auth"])
    assert both.exit_code != 0 and "contradict" in both.output
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")


def test_hash_key_command(tmp_path):
    runner = CliRunner()
    plain = runner.invoke(main, ["serve", "hash-key"], input=SECRETS["alice"] + "\n")
    assert plain.exit_code == 0, plain.output
    assert verify_secret(SECRETS["alice"], plain.stdout.strip())
    made = runner.invoke(main, ["serve", "hash-key", "--generate", "--id", "ci-bot"])
    assert made.exit_code == 0, made.output
    token = made.stderr.strip().rsplit(" ", 1)[-1]
    assert token.startswith("ci-bot.") and token not in made.stdout
    (tmp_path / "keys.yaml").write_text("keys:\n" + made.stdout)
    config = load_api_keys(tmp_path / "keys.yaml")
    assert Authenticator(config.keys).authenticate(f"Bearer {token}").key.id == "ci-bot"
    short = runner.invoke(main, ["serve", "hash-key"], input="short\n")
    assert short.exit_code != 0 and "at least 16 characters" in short.output


def test_hash_key_entries_appended_to_a_new_file_make_a_key_file(tmp_path):
    """What docs/deployment.md tells an operator: `memguard serve hash-key --generate --id ID >> keys.yaml`."""
    runner = CliRunner()
    keys, tokens = tmp_path / "keys.yaml", {}
    for key_id in ("alice", "ci-bot"):
        made = runner.invoke(main, ["serve", "hash-key", "--generate", "--id", key_id])
        assert made.exit_code == 0, made.output
        tokens[key_id] = made.stderr.strip().rsplit(" ", 1)[-1]
        with keys.open("a") as handle:
            handle.write(made.stdout)
    config = load_api_keys(keys)
    assert sorted(config.keys) == ["alice", "ci-bot"]
    authenticator = Authenticator(config.keys)
    assert all(authenticator.authenticate(f"Bearer {t}").key.id == k for k, t in tokens.items())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_real_server_with_api_keys(sd_pipe, key_file, tmp_path):
    import httpx

    model_dir = tmp_path / "model"
    sd_pipe.save_pretrained(model_dir)
    (tmp_path / "server.yaml").write_text(json.dumps(server_policy()))
    audit, port = tmp_path / "audit.jsonl", _free_port()
    server = subprocess.Popen(
        [sys.executable, "-c", "from guard.cli import main; main()", "serve", "--model", str(model_dir), "--policy",
         str(tmp_path / "server.yaml"), "--port", str(port), "--audit", str(audit), "--device", "cpu",
         "--api-keys", str(key_file)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read().decode()
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.25)
        assert httpx.post(f"{base}/v1/check", json={"prompt": PROMPT}).status_code == 401
        alice = httpx.post(f"{base}/v1/check", json={"prompt": PROMPT}, headers=bearer("alice"), timeout=30)
        bob = httpx.post(f"{base}/v1/check", json={"prompt": PROMPT}, headers=bearer("bob"), timeout=30)
        assert (alice.json()["decisions"][0]["action"], bob.json()["decisions"][0]["action"]) == ("block", "allow")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [r["context"]["key_id"] for r in decisions(audit)] == ["alice", "bob"]
    assert verify_log(audit)


def test_a_key_whose_policy_cannot_be_loaded_stops_the_start(tmp_path):
    from types import SimpleNamespace

    path = tmp_path / "keys.yaml"
    path.write_text(f"keys: [{{id: erin, secret_hash: '{cheap_hash('x' * 16)}', policy: ./missing.yaml}}]\n")
    default = SimpleNamespace(policy=SimpleNamespace(content_hash="h"))
    with pytest.raises(ApiKeyFileError, match=r"keys.yaml: key 'erin': policy .*missing.yaml.*file not found"):
        ServiceAccess.build(load_api_keys(path), default, lambda spec, lock: pytest.fail("no guard for a bad policy"))
