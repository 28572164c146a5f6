import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import structlog
from click.testing import CliRunner

from guard.audit import (
    GENESIS_HASH,
    AuditLog,
    AuditLogger,
    AuditRecordError,
    AuditWriteError,
    protect_prompt,
    resolve_audit_path,
    verify_log,
)
from guard.cli.audit import audit
from guard.policy import decide, load_policy
from guard.scoring.result import MemorizationScore

POLICY = load_policy({"name": "t", "rules": [{"name": "hi", "when": {"score": {"gte": 5}}, "action": "block"}]})


def score(value: float) -> MemorizationScore:
    return MemorizationScore(prompt="p", norm=1.0, cos=0.2, score=value, g_norm=1.0, g_cos=2.0, profile="sd1",
                             t_hi=981, t_lo=41, samples=1, seed=51, prediction_space="eps")


def write_log(path: Path, n: int) -> None:
    with AuditLog(path) as log:
        for i in range(n):
            log.append({"event": "decision", "i": i})


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_chain_verifies(tmp_path):
    path = tmp_path / "a.jsonl"
    write_log(path, 5)
    report = verify_log(path)
    assert report.ok and report.n_records == 5
    first = json.loads(lines(path)[0])
    assert first["seq"] == 1 and first["prev_hash"] == GENESIS_HASH
    body = {k: v for k, v in first.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert first["hash"] == hashlib.sha256(canonical.encode()).hexdigest()


def _edit(ls):
    rec = json.loads(ls[2])
    rec["i"] = 99
    ls[2] = (json.dumps(rec) + "\n").encode()


def _edit_rehash(ls):
    from guard.audit import canonical_json, record_hash

    rec = json.loads(ls[2])
    rec["i"] = 99
    rec["hash"] = record_hash(rec)
    ls[2] = (canonical_json(rec) + "\n").encode()


def _reorder(ls):
    ls[2], ls[3] = ls[3], ls[2]


def _delete(ls):
    del ls[2]


def _delete_first(ls):
    del ls[0]


def _truncate(ls):
    ls[-1] = ls[-1][:20]


def _garbage(ls):
    ls.insert(2, b"not json at all\n")


@pytest.mark.parametrize(
    "tamper,bad_line,reason",
    [
        (_edit, 3, "hash mismatch"),
        (_edit_rehash, 4, "prev_hash"),
        (_reorder, 3, "seq 4 follows seq 2"),
        (_delete, 3, "deleted"),
        (_delete_first, 1, "seq 2 follows seq 0"),
        (_truncate, 6, "truncated"),
        (_garbage, 3, "not valid JSON"),
    ],
)
def test_tampering_is_detected(tmp_path, tamper, bad_line, reason):
    path = tmp_path / "a.jsonl"
    write_log(path, 6)
    ls = lines(path)
    tamper(ls)
    path.write_bytes(b"".join(ls))
    report = verify_log(path)
    assert not report.ok
    assert report.first_bad_line == bad_line
    assert reason in report.reason
    assert report.n_records == bad_line - 1


def test_threads_do_not_interleave(tmp_path):
    path = tmp_path / "a.jsonl"
    log = AuditLogger(AuditLog(path), context={"policy": {"name": "t", "version": "1", "hash": "h"}})
    decision = decide(POLICY, score(1.0), "p")

    def worker(t):
        for i in range(25):
            log.log_decision(decision, prompt=f"prompt {t} {i}", outcome="checked", request_id=f"{t}-{i}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    report = verify_log(path)
    assert report.ok and report.n_records == 200
    ids = {json.loads(line)["request_id"] for line in lines(path)}
    assert len(ids) == 200


def _append_many(path: str, tag: str, n: int) -> None:
    with AuditLog(path) as log:
        for i in range(n):
            log.append({"event": "decision", "writer": tag, "i": i})


def test_processes_continue_one_chain(tmp_path):
    path = str(tmp_path / "a.jsonl")
    ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    procs = [ctx.Process(target=_append_many, args=(path, tag, 40)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    report = verify_log(path)
    assert report.ok and report.n_records == 80


def test_restart_and_other_writer_continue_chain(tmp_path):
    path = tmp_path / "a.jsonl"
    write_log(path, 3)
    write_log(path, 2)
    first, second = AuditLog(path), AuditLog(path)
    first.append({"event": "x"})
    second.append({"event": "y"})
    first.append({"event": "z"})
    first.close()
    second.close()
    report = verify_log(path)
    assert report.ok and report.n_records == 8
    assert [json.loads(line)["seq"] for line in lines(path)] == list(range(1, 9))


def test_refuses_to_append_after_truncated_line(tmp_path):
    path = tmp_path / "a.jsonl"
    write_log(path, 2)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(AuditWriteError, match="incomplete line"):
        AuditLog(path).append({"event": "x"})
    garbage = tmp_path / "b.jsonl"
    garbage.write_text("hello\n")
    with pytest.raises(AuditWriteError, match="not a chained record"):
        AuditLog(garbage).append({"event": "x"})


def test_unwritable_path_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(AuditWriteError):
        AuditLog(blocker / "sub" / "audit.jsonl")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(AuditWriteError):
            AuditLog(ro / "audit.jsonl")


@pytest.mark.parametrize("mode", ["hash", "redact", "plain"])
def test_prompt_modes(tmp_path, mode):
    policy = load_policy({"name": "p", "audit": {"prompt": mode, "hash_salt": "s" if mode == "hash" else None}})
    log = AuditLogger.for_policy(policy, path=tmp_path / "a.jsonl", model_id="m", model_class="C")
    written = log.log_decision(decide(policy, score(1.0), "a cat"), prompt="a cat", outcome="checked", request_id="r")
    expected = {
        "hash": hashlib.sha256(b"sa cat").hexdigest(),
        "redact": "[redacted]",
        "plain": "a cat",
    }[mode]
    assert written["prompt"] == protect_prompt("a cat", mode, policy.audit.hash_salt) == expected
    assert written["prompt_mode"] == mode
    assert written["model"] == {"id": "m", "class": "C"}
    assert written["policy"] == {"name": "p", "version": "1", "hash": policy.content_hash}
    assert written["timestamp"].endswith("Z") and written["request_id"]
    on_disk = json.loads(lines(tmp_path / "a.jsonl")[0])
    assert on_disk == written


def test_record_fields_and_schema(tmp_path):
    log = AuditLogger.for_policy(POLICY, path=tmp_path / "a.jsonl")
    decision = decide(POLICY, score(7.0), "p")
    rec = log.log_decision(decision, prompt="p", outcome="pending", latency_scoring_ms=3.5, request_id="r1")
    assert (rec["action"], rec["rule"], rec["outcome"], rec["score"]) == ("block", "hi", "pending", 7.0)
    assert rec["thresholds"] == [{"metric": "score", "op": ">=", "value": 5.0, "above_fpr": None}]
    done = log.log_outcome(request_id="r1", prompt_index=0, action="block", outcome="blocked", decision_record=rec,
                           latency_generation_ms=0.0)
    assert (done["decision_seq"], done["decision_hash"]) == (rec["seq"], rec["hash"]) and "prompt" not in done
    nan = decide(POLICY, score(float("nan")), "p")
    err = log.log_decision(nan, prompt="p", outcome="checked", request_id="r2")
    assert err["event"] == "error" and err["score"] is None and "non-finite" in err["error"]["message"]
    with pytest.raises(AuditRecordError, match="outcome"):
        log.log_decision(decision, prompt="p", outcome="exploded", request_id="r3")
    with pytest.raises(AuditRecordError, match="outcome"):
        log.log_outcome(request_id="r4", prompt_index=0, action="block", outcome="checked")
    with pytest.raises(AuditRecordError, match="unknown event"):
        log.log("happened", request_id="r5")
    assert verify_log(tmp_path / "a.jsonl").n_records == 3


def test_audit_path_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MEMGUARD_AUDIT_PATH", raising=False)
    assert resolve_audit_path(POLICY) == Path("memguard-audit.jsonl")
    monkeypatch.setenv("MEMGUARD_AUDIT_PATH", str(tmp_path / "env.jsonl"))
    assert resolve_audit_path(POLICY) == tmp_path / "env.jsonl"
    assert resolve_audit_path(POLICY, tmp_path / "arg.jsonl") == tmp_path / "arg.jsonl"


def test_import_does_not_touch_logging_or_structlog():
    code = """
import logging, structlog
before = (structlog.is_configured(), dict(structlog.get_config()), list(logging.root.handlers), logging.root.level)
import guard, guard.policy, guard.audit, guard.cli.audit
import tempfile, os
from guard.audit import AuditLogger
from guard.policy import load_policy
p = load_policy('strict')
AuditLogger.for_policy(p, path=os.path.join(tempfile.mkdtemp(), 'a.jsonl')).log(
    'decision', prompt='x', action='allow', outcome='checked')
after = (structlog.is_configured(), dict(structlog.get_config()), list(logging.root.handlers), logging.root.level)
assert before == after, (before, after)
assert not logging.getLogger('guard').handlers
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_app_structlog_config_cannot_filter_audit(tmp_path):
    import logging

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL),
        processors=[structlog.processors.JSONRenderer()],
    )
    try:
        log = AuditLogger.for_policy(POLICY, path=tmp_path / "a.jsonl")
        log.log_decision(decide(POLICY, score(1.0), "p"), prompt="p", outcome="checked", request_id="r")
    finally:
        structlog.reset_defaults()
    assert verify_log(tmp_path / "a.jsonl").n_records == 1


def test_cli_verify(tmp_path):
    path = tmp_path / "a.jsonl"
    write_log(path, 4)
    runner = CliRunner()
    ok = runner.invoke(audit, ["verify", str(path)])
    assert ok.exit_code == 0 and "intact, 4 records" in ok.output
    ls = lines(path)
    del ls[1]
    path.write_bytes(b"".join(ls))
    bad = runner.invoke(audit, ["verify", str(path)])
    assert bad.exit_code == 1
    assert bad.output.strip().count("\n") == 0 and "line 2:" in bad.output
    missing = runner.invoke(audit, ["verify", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code != 0
