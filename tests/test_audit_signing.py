"""Signed checkpoints against the attacker they are for: someone who can write the log file but does not hold the
private key. Every forgery below uses memguard's own ``record_hash`` to re-chain, as the issue's attacker did."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from guard.audit import (
    GENESIS_HASH,
    AuditLog,
    AuditLogger,
    AuditRecordError,
    CheckpointSigner,
    KeyFileError,
    SigningKeyError,
    generate_keypair,
    load_anchors,
    load_private_key,
    record_hash,
    verify_log,
)
from guard.audit.signing import SIGNING_KEY_ENV, key_id_of, load_public_key
from guard.cli import main
from guard.policy import decide, load_policy
from guard.scoring.result import MemorizationScore

POLICY = load_policy({"name": "t", "rules": [{"name": "hi", "when": {"score": {"gte": 5}}, "action": "block"}]})


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs: the writer's (``a``) and someone else's (``b``)."""
    folder = tmp_path_factory.mktemp("keys")
    return {name: generate_keypair(folder, name) for name in ("a", "b")}


def signer(keys, name="a") -> CheckpointSigner:
    return CheckpointSigner.from_file(keys[name][0])


def pub(keys, name="a") -> Path:
    return keys[name][1]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records))


def rechain(records: list[dict], *, fix_checkpoints: bool = True) -> list[dict]:
    """What an editor with write access does: renumber and recompute every hash with memguard's ``record_hash``;
    with ``fix_checkpoints`` also make each checkpoint point at its new head and previous checkpoint, so that
    only the signatures (which need the private key) are left wrong."""
    prev, last_cp_seq, last_cp_sig, out = GENESIS_HASH, 0, None, []
    for seq, record in enumerate(records, start=1):
        record = {**record, "seq": seq, "prev_hash": prev}
        if fix_checkpoints and record["event"] == "checkpoint":
            record.update(signed_seq=seq - 1, signed_hash=prev, prev_checkpoint_seq=last_cp_seq,
                          prev_signature=last_cp_sig)
            last_cp_seq, last_cp_sig = seq, record["signature"]
        record["hash"] = record_hash(record)
        prev = record["hash"]
        out.append(record)
    return out


def signed_log(path: Path, keys, n: int = 25, every: int = 10, close: bool = True) -> AuditLog:
    log = AuditLog(path, signer=signer(keys), checkpoint_every=every, checkpoint_seconds=3600)
    for i in range(n):
        log.append({"event": "decision", "i": i, "action": "block" if i % 3 == 0 else "allow"})
    if close:
        log.close()
    return log


def checkpoint_lines(path: Path) -> list[int]:
    return [i for i, r in enumerate(read(path), start=1) if r["event"] == "checkpoint"]


def score(value: float) -> MemorizationScore:
    return MemorizationScore(prompt="p", norm=1.0, cos=0.2, score=value, g_norm=1.0, g_cos=2.0, profile="sd1",
                             t_hi=981, t_lo=41, samples=1, seed=51, prediction_space="eps")


# ---------------------------------------------------------------- keys


def test_keygen_writes_a_protected_pair_and_refuses_to_overwrite(tmp_path):
    result = CliRunner().invoke(main, ["audit", "keygen", "--out", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output
    private, public = tmp_path / "k" / "memguard-audit.key", tmp_path / "k" / "memguard-audit.pub"
    assert oct(private.stat().st_mode & 0o777) == "0o600"
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    assert key_id_of(load_public_key(public)) in result.output
    again = CliRunner().invoke(main, ["audit", "keygen", "--out", str(tmp_path / "k")])
    assert again.exit_code != 0 and "refusing to overwrite" in again.output
    private.chmod(0o644)
    with pytest.raises(KeyFileError, match="accessible by others .*mode 0644.*chmod 600"):
        load_private_key(private)
    private.chmod(0o640)  # a service group may read it
    assert load_private_key(private) is not None
    with pytest.raises(KeyFileError, match="that is the private key"):
        load_public_key(private)


def test_an_unusable_configured_key_makes_the_log_unwritable_not_unsigned(tmp_path, monkeypatch, keys):
    monkeypatch.setenv(SIGNING_KEY_ENV, str(tmp_path / "missing.key"))
    with pytest.raises(SigningKeyError, match="cannot read signing key .*missing.key"):
        AuditLogger.for_policy(POLICY, path=tmp_path / "a.jsonl")


def test_the_environment_key_wins_over_the_policy_key(tmp_path, monkeypatch, keys):
    policy = load_policy({"name": "p", "audit": {"signing_key": str(keys["a"][0]), "checkpoint_every": 7,
                                                 "checkpoint_seconds": 5}})
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    log = AuditLogger.for_policy(policy, path=tmp_path / "a.jsonl")
    assert log.sink.signer.key_id == signer(keys, "a").key_id
    assert (log.sink.checkpoint_every, log.sink.checkpoint_seconds) == (7, 5.0)
    monkeypatch.setenv(SIGNING_KEY_ENV, str(keys["b"][0]))
    assert AuditLogger.for_policy(policy, path=tmp_path / "b.jsonl").sink.signer.key_id == signer(keys, "b").key_id


def test_policy_audit_settings_are_validated():
    from guard.policy import PolicyError

    with pytest.raises(PolicyError, match="checkpoint_every"):
        load_policy({"name": "p", "audit": {"checkpoint_every": 0}})
    with pytest.raises(PolicyError, match="checkpoint_sceonds: unknown field; did you mean 'checkpoint_seconds'"):
        load_policy({"name": "p", "audit": {"checkpoint_sceonds": 5}})


# ---------------------------------------------------------------- untouched logs verify


def test_untouched_signed_log_verifies(tmp_path, keys):
    path = tmp_path / "a.jsonl"
    signed_log(path, keys, n=25, every=10)
    kinds = [(r["event"], r.get("reason")) for r in read(path) if r["event"] == "checkpoint"]
    assert kinds == [("checkpoint", "count"), ("checkpoint", "count"), ("checkpoint", "close")]
    report = verify_log(path, public_keys=pub(keys))
    assert report.ok and report.signed and report.checkpoints == 3 and report.unsigned_tail == 0
    assert report.n_records == 28 and report.signers == (signer(keys).key_id,)
    assert "signed: 3 checkpoint(s) verified" in str(report)
    assert verify_log(path, public_keys=pub(keys), strict=True).ok
    plain = verify_log(path)
    assert plain.ok and not plain.key_checked and "integrity only" in str(plain)


def test_logger_and_sink_refuse_forged_checkpoints(tmp_path, keys):
    log = AuditLogger.for_policy(POLICY, path=tmp_path / "a.jsonl")
    with pytest.raises(AuditRecordError, match="written by the sink only"):
        log.log("checkpoint", signature="x")
    with pytest.raises(ValueError, match="written by the sink itself"):
        log.sink.append({"event": "checkpoint"})


# ---------------------------------------------------------------- forgeries fail


def test_the_issues_attack_block_to_allow_and_rechained_is_caught(tmp_path, keys):
    """The issue's report: every block turned into allow and re-chained; the unkeyed chain cannot tell."""
    path = tmp_path / "service.jsonl"
    sink = AuditLog(path, signer=signer(keys), checkpoint_every=50)
    logger = AuditLogger(sink, context={"policy": {"name": "t", "version": "1", "hash": POLICY.content_hash}})
    for i in range(120):
        logger.log_decision(decide(POLICY, score(7.0 if i % 4 == 0 else 1.0), "p"), prompt=f"p{i}",
                            outcome="checked", request_id=f"r{i}")
    sink.close()
    original = read(path)
    assert sum(r.get("action") == "block" for r in original) == 30
    forged = [{**r, "action": "allow", "rule": "default"} if r.get("action") == "block" else r for r in original]
    write(path, rechain(forged))
    assert verify_log(path).ok  # memguard's own hash function re-chains it: integrity alone proves nothing here
    report = verify_log(path, public_keys=pub(keys))
    assert not report.ok
    assert report.first_bad_line == checkpoint_lines(path)[0] and "bad signature" in report.reason
    naive = [{**r, "action": "allow"} if r.get("action") == "block" else r for r in original]
    write(path, rechain(naive, fix_checkpoints=False))
    naive_report = verify_log(path, public_keys=pub(keys))
    assert not naive_report.ok and "records before it were changed" in naive_report.reason


@pytest.mark.parametrize("where", ["first", "before_checkpoint", "after_checkpoint", "checkpoint_itself",
                                   "before_last_checkpoint"])
def test_a_rechained_edit_anywhere_before_the_last_checkpoint_fails(tmp_path, keys, where):
    path = tmp_path / "a.jsonl"
    signed_log(path, keys, n=25, every=10)
    records = read(path)
    cps = checkpoint_lines(path)  # 1-based lines of the checkpoints: 11, 22, 28
    index = {"first": 0, "before_checkpoint": cps[0] - 2, "after_checkpoint": cps[0],
             "checkpoint_itself": cps[0] - 1, "before_last_checkpoint": cps[-1] - 2}[where]
    field = "timestamp" if where == "checkpoint_itself" else "action"
    records[index] = {**records[index], field: "2000-01-01T00:00:00.000000Z" if field == "timestamp" else "warn"}
    write(path, rechain(records))
    assert verify_log(path).ok
    report = verify_log(path, public_keys=pub(keys))
    first_cp_after = min(line for line in cps if line > index + 1) if where != "checkpoint_itself" else cps[0]
    assert not report.ok and report.first_bad_line == first_cp_after, str(report)
    assert "bad signature" in report.reason
    assert report.n_records == first_cp_after - 1


def test_a_deleted_checkpoint_fails(tmp_path, keys):
    path = tmp_path / "a.jsonl"
    signed_log(path, keys, n=25, every=10)
    records = read(path)
    first = checkpoint_lines(path)[0]
    del records[first - 1]
    write(path, rechain(records, fix_checkpoints=False))
    report = verify_log(path, public_keys=pub(keys))
    assert not report.ok and "a checkpoint was deleted, reordered or inserted" in report.reason
    write(path, rechain(records))  # the thorough editor also repoints the next checkpoint: its signature fails
    thorough = verify_log(path, public_keys=pub(keys))
    assert not thorough.ok and "bad signature" in thorough.reason


def test_reordered_checkpoints_fail(tmp_path, keys):
    path = tmp_path / "a.jsonl"
    signed_log(path, keys, n=25, every=10)
    records = read(path)
    a, b = (line - 1 for line in checkpoint_lines(path)[:2])
    records[a], records[b] = records[b], records[a]
    write(path, rechain(records, fix_checkpoints=False))
    report = verify_log(path, public_keys=pub(keys))
    assert not report.ok and report.first_bad_line == a + 1 and "deleted, reordered or inserted" in report.reason


def test_a_checkpoint_signed_by_another_key_fails_and_names_it(tmp_path, keys):
    path = tmp_path / "a.jsonl"
    signed_log(path, keys, n=12, every=5)
    report = verify_log(path, public_keys=pub(keys, "b"))
    assert not report.ok and report.first_bad_line == checkpoint_lines(path)[0]
    assert f"signed by another key (key id {signer(keys, 'a').key_id}" in report.reason
    # an editor who re-signs with a key of their own is caught the same way
    forger = signer(keys, "b")
    records = read(path)
    edited = [{**r, "action": "allow"} for r in records]
    prev, last_seq, last_sig, resigned = GENESIS_HASH, 0, None, []
    for seq, record in enumerate(edited, start=1):
        record = {**record, "seq": seq, "prev_hash": prev}
        if record["event"] == "checkpoint":
            record = {**forger.checkpoint(signed_seq=seq - 1, signed_hash=prev, prev_checkpoint_seq=last_seq,
                                          prev_signature=last_sig, reason="count"), "seq": seq, "prev_hash": prev}
            last_seq, last_sig = seq, record["signature"]
        record["hash"] = record_hash(record)
        prev = record["hash"]
        resigned.append(record)
    write(path, resigned)
    assert verify_log(path, public_keys=pub(keys, "b")).ok  # a valid log of the forger's ...
    forged = verify_log(path, public_keys=pub(keys, "a"))  # ... but not the writer's
    assert not forged.ok and f"key id {forger.key_id}" in forged.reason


def test_a_cut_off_tail_fails_with_strict_and_with_shipped_checkpoints(tmp_path, keys):
    path, copy = tmp_path / "a.jsonl", tmp_path / "elsewhere" / "checkpoints.jsonl"
    copy.parent.mkdir()
    log = AuditLog(path, signer=signer(keys), checkpoint_every=10, checkpoint_seconds=3600, checkpoint_copy=copy)
    for i in range(25):
        log.append({"event": "decision", "i": i})
    log.close()
    records = read(path)
    # the final checkpoint and 3 records removed: what remains verifies, but says what is not signed
    write(path, records[:-4])
    report = verify_log(path, public_keys=pub(keys))
    assert report.ok and report.unsigned_tail == 2 and "2 record(s) after the last checkpoint" in str(report)
    strict = verify_log(path, public_keys=pub(keys), strict=True)
    assert not strict.ok and strict.first_bad_line == checkpoint_lines(path)[-1] + 1 and "--strict" in strict.reason
    # cut exactly after an earlier checkpoint: nothing in the file can show it, the shipped copy does
    write(path, records[: checkpoint_lines(path)[0]])
    assert verify_log(path, public_keys=pub(keys), strict=True).ok
    anchored = verify_log(path, public_keys=pub(keys), anchors=load_anchors([copy]))
    assert not anchored.ok and "records were cut off the end" in anchored.reason
    write(path, records)
    whole = verify_log(path, public_keys=pub(keys), anchors=load_anchors([copy]))
    assert whole.ok and whole.anchors == 3


def test_a_log_without_any_checkpoint_fails_with_a_key(tmp_path, keys):
    path = tmp_path / "a.jsonl"
    with AuditLog(path) as log:
        for i in range(3):
            log.append({"event": "decision", "i": i})
    report = verify_log(path, public_keys=pub(keys))
    assert not report.ok and report.first_bad_line == 1 and "none of the 3 record(s) is signed" in report.reason
    assert verify_log(path).ok and not verify_log(path, strict=True).ok  # --strict: unsigned records fail


# ---------------------------------------------------------------- many writers, restarts, crashes


def test_log_continued_across_restarts_verifies(tmp_path, keys):
    path = tmp_path / "a.jsonl"
    for _ in range(3):
        signed_log(path, keys, n=7, every=5)
    report = verify_log(path, public_keys=pub(keys), strict=True)
    assert report.ok and report.n_records == 3 * 7 + 3 * 2
    with AuditLog(path) as unsigned_writer:  # a writer without the key continues the chain ...
        unsigned_writer.append({"event": "decision"})
    log = AuditLog(path, signer=signer(keys))  # ... and the next signing writer starts by signing what it found
    assert read(path)[-1]["reason"] == "open" and read(path)[-1]["signed_seq"] == report.n_records + 1
    log.close()
    again = verify_log(path, public_keys=pub(keys), strict=True)
    assert again.ok and again.adopted == 1


def test_many_threads_verify(tmp_path, keys):
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, signer=signer(keys), checkpoint_every=7, checkpoint_seconds=3600)

    def worker(t: int) -> None:
        for i in range(30):
            log.append({"event": "decision", "t": t, "i": i})

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    report = verify_log(path, public_keys=pub(keys), strict=True)
    assert report.ok and report.n_records == 180 + report.checkpoints and report.checkpoints == 26


def _signed_writer(path: str, key: str, tag: str, n: int) -> None:
    with AuditLog(path, signer=CheckpointSigner.from_file(key), checkpoint_every=5, checkpoint_seconds=3600) as log:
        for i in range(n):
            log.append({"event": "decision", "writer": tag, "i": i})


def test_many_processes_and_two_keys_keep_one_signature_chain(tmp_path, keys):
    path = str(tmp_path / "a.jsonl")
    ctx = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    procs = [ctx.Process(target=_signed_writer, args=(path, str(keys[name][0]), f"{name}{k}", 40))
             for k, name in enumerate(["a", "a", "b"])]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    records = read(Path(path))
    assert sum(r["event"] == "decision" for r in records) == 120
    both = verify_log(path, public_keys=[pub(keys, "a"), pub(keys, "b")], strict=True)
    assert both.ok and set(both.signers) == {signer(keys, "a").key_id, signer(keys, "b").key_id}, str(both)
    only_a = verify_log(path, public_keys=pub(keys, "a"))
    assert not only_a.ok and "signed by another key" in only_a.reason  # a rotated-out key must be given too


def test_interval_checkpoint_signs_a_quiet_log(tmp_path, keys):
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, signer=signer(keys), checkpoint_every=1000, checkpoint_seconds=0.2)
    log.append({"event": "decision"})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and read(path)[-1]["event"] != "checkpoint":
        time.sleep(0.05)
    assert read(path)[-1]["reason"] == "interval"
    assert verify_log(path, public_keys=pub(keys), strict=True).ok
    log.close()
    assert read(path)[-1]["reason"] == "interval"  # nothing new to sign at close


WRITER = """
import os, signal, sys
from guard.audit import AuditLog, CheckpointSigner
log = AuditLog(sys.argv[1], signer=CheckpointSigner.from_file(sys.argv[2]), checkpoint_every=1000,
               checkpoint_seconds=3600)
for i in range(5):
    log.append({"event": "decision", "i": i})
if sys.argv[3] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_exit_signs_and_a_crash_leaves_an_unsigned_tail_the_next_writer_signs(tmp_path, keys):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean, crashed = tmp_path / "clean.jsonl", tmp_path / "crashed.jsonl"
    run = subprocess.run([sys.executable, "-c", WRITER, str(clean), str(keys["a"][0]), "exit"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert read(clean)[-1]["reason"] == "exit"  # never closed: signed at interpreter exit
    assert verify_log(clean, public_keys=pub(keys), strict=True).ok
    run = subprocess.run([sys.executable, "-c", WRITER, str(crashed), str(keys["a"][0]), "kill"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL
    report = verify_log(crashed, public_keys=pub(keys))
    assert not report.ok and "none of the 5 record(s) is signed" in report.reason  # SIGKILL cannot checkpoint
    AuditLog(crashed, signer=signer(keys)).close()  # the restarted writer signs the head it found
    after = verify_log(crashed, public_keys=pub(keys), strict=True)
    assert after.ok and after.adopted == 5 and "first signed by a later writer" in str(after)


def test_a_rotated_log_is_signed_at_its_end(tmp_path, keys):
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, signer=signer(keys), checkpoint_every=100, checkpoint_seconds=3600)
    for i in range(3):
        log.append({"event": "decision", "i": i})
    path.rename(tmp_path / "a.jsonl.1")  # logrotate
    log.append({"event": "decision", "i": 3})
    log.close()
    for name in ("a.jsonl.1", "a.jsonl"):
        assert verify_log(tmp_path / name, public_keys=pub(keys), strict=True).ok, name


# ---------------------------------------------------------------- the command line


def test_cli_verify_with_key_strict_and_errors(tmp_path, keys):
    path = tmp_path / "a.jsonl"
    signed_log(path, keys, n=12, every=5)
    runner = CliRunner()
    ok = runner.invoke(main, ["audit", "verify", str(path), "--public-key", str(pub(keys))])
    assert ok.exit_code == 0 and "signed: 3 checkpoint(s) verified" in ok.output
    plain = runner.invoke(main, ["audit", "verify", str(path)])
    assert plain.exit_code == 0 and "integrity only" in plain.output
    records = read(path)
    records[0] = {**records[0], "action": "allow"}
    write(path, rechain(records))
    bad = runner.invoke(main, ["audit", "verify", str(path), "--public-key", str(pub(keys))])
    assert bad.exit_code == 1 and bad.output.strip().count("\n") == 0
    assert f"line {checkpoint_lines(path)[0]}: bad signature" in bad.output
    cut = tmp_path / "cut.jsonl"
    signed_log(cut, keys, n=12, every=5)
    write(cut, read(cut)[: checkpoint_lines(cut)[0] + 2])
    lenient = runner.invoke(main, ["audit", "verify", str(cut), "--public-key", str(pub(keys))])
    assert lenient.exit_code == 0 and "2 record(s) after the last checkpoint (seq 6) not yet signed" in lenient.output
    strict = runner.invoke(main, ["audit", "verify", str(cut), "--public-key", str(pub(keys)), "--strict"])
    assert strict.exit_code == 1 and "line 7: 2 record(s) after the last checkpoint" in strict.output
    wrong = runner.invoke(main, ["audit", "verify", str(path), "--public-key", str(keys["a"][0])])
    assert wrong.exit_code == 1 and "that is the private key" in wrong.output


def test_summary_and_report_say_whether_the_log_was_signed_and_verified(tmp_path, keys):
    path = tmp_path / "a.jsonl"
    signed_log(path, keys, n=12, every=5)
    runner = CliRunner()
    unverified = runner.invoke(main, ["audit", "summary", str(path)])
    assert unverified.exit_code == 0 and "NOT verified with a key" in unverified.output
    verified = runner.invoke(main, ["audit", "summary", str(path), "--public-key", str(pub(keys)), "--json"])
    signature = json.loads(verified.output)["signature"]
    assert signature["checkpoints"] == 3 and signature["verified"]["ok"] and signature["verified"]["with_key"]
    out = tmp_path / "report.html"
    report = runner.invoke(main, ["audit", "report", str(path), "--out", str(out), "--public-key", str(pub(keys))])
    assert report.exit_code == 0, report.output
    html = out.read_text()
    assert 'id="signature-status" class="status ok"' in html and "verified with key" in html
    runner.invoke(main, ["audit", "report", str(path), "--out", str(out)])
    assert 'class="status warn"' in out.read_text() and "NOT verified with a key" in out.read_text()
    unsigned = tmp_path / "u.jsonl"
    with AuditLog(unsigned) as log:
        log.append({"event": "decision"})
    assert "not signed (no checkpoints)" in runner.invoke(main, ["audit", "summary", str(unsigned)]).output


def test_load_anchors_rejects_what_is_not_a_checkpoint(tmp_path):
    bogus = tmp_path / "anchors.jsonl"
    bogus.write_text('{"event": "decision", "seq": 1}\n')
    with pytest.raises(ValueError, match="line 1: not an intact checkpoint record"):
        load_anchors([bogus])


def test_guard_signs_its_log_and_records_its_policy(sd_pipe, tmp_path, monkeypatch, keys):
    from guard import Guard

    monkeypatch.setenv(SIGNING_KEY_ENV, str(keys["a"][0]))
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(textwrap.dedent("""
        name: signed
        version: 3
        calibration: "off"
        rules: [{name: hi, when: {score: {gte: 1000}}, action: block}]
    """))
    with Guard(sd_pipe, str(policy_file), audit_path=tmp_path / "a.jsonl") as guarded:
        guarded.check("a red cat")
    records = read(tmp_path / "a.jsonl")
    assert [r["event"] for r in records] == ["policy_loaded", "decision", "checkpoint"]
    loaded = records[0]
    assert loaded["policy"]["name"] == "signed" and loaded["policy"]["version"] == "3"
    assert loaded["policy_path"] == str(policy_file.resolve()) and loaded["signing_key_id"] == signer(keys).key_id
    assert loaded["actor"]["pid"] == os.getpid() and loaded["actor"]["user"]
    assert verify_log(tmp_path / "a.jsonl", public_keys=pub(keys), strict=True).ok


def test_a_checkpoint_that_cannot_be_written_does_not_fail_the_record(tmp_path, keys, monkeypatch):
    import guard.audit.sink as sink_module

    path = tmp_path / "a.jsonl"
    log = AuditLog(path, signer=signer(keys), checkpoint_every=2, checkpoint_seconds=3600)
    real_write = os.write

    def full_disk_for_checkpoints(fd, data):
        if b'"event":"checkpoint"' in data:
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(sink_module.os, "write", full_disk_for_checkpoints)
    log.append({"event": "decision", "i": 0})
    with pytest.warns(UserWarning, match="checkpoint not written, records after seq 0 stay unsigned"):
        written = log.append({"event": "decision", "i": 1})
    assert written["seq"] == 2 and [r["event"] for r in read(path)] == ["decision", "decision"]
    monkeypatch.setattr(sink_module.os, "write", real_write)
    log.append({"event": "decision", "i": 2})  # the next record retries, and signs all three
    assert [r["event"] for r in read(path)][-1] == "checkpoint" and read(path)[-1]["signed_seq"] == 3
    log.close()
    assert verify_log(path, public_keys=pub(keys), strict=True).ok
