"""Several records, one fsync: ``AuditLog.batch`` / ``AuditLogger.batch`` keep the write-ahead rule for the batch
(every record on disk before the block ends) with one ``os.fsync`` instead of one per record."""

from __future__ import annotations

import inspect
import json
import os
import threading
from pathlib import Path

import pytest

from guard.audit import AuditLog, AuditLogger, AuditWriteError, CheckpointSigner, generate_keypair, verify_log
from guard.audit import sink as sink_module
from guard.policy import decide, load_policy
from guard.scoring.result import MemorizationScore

POLICY = load_policy({"name": "t", "audit": {"fsync": True},
                      "rules": [{"name": "hi", "when": {"score": {"gte": 5}}, "action": "block"}]})


def score(value: float) -> MemorizationScore:
    return MemorizationScore(prompt="p", norm=1.0, cos=0.2, score=value, g_norm=1.0, g_cos=2.0, profile="sd1",
                             t_hi=981, t_lo=41, samples=1, seed=51, prediction_space="eps")


class FsyncSpy:
    """Counts fsyncs per file descriptor and can make them fail; records the file's size at each one."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[int] = []
        self.fail = False
        real = os.fsync

        def fsync(fd: int) -> None:
            if self.fail:
                raise OSError(5, "Input/output error")
            self.calls.append(os.fstat(fd).st_size)
            real(fd)

        monkeypatch.setattr(sink_module.os, "fsync", fsync)


def test_per_record_fsync_without_a_batch_and_one_fsync_per_batch(tmp_path, monkeypatch):
    spy = FsyncSpy(monkeypatch)
    log = AuditLogger.for_policy(POLICY, path=tmp_path / "a.jsonl")
    decision = decide(POLICY, score(1.0), "p")
    for i in range(3):
        log.log_decision(decision, prompt="p", outcome="pending", request_id=f"r{i}")
    assert len(spy.calls) == 3
    with log.batch():
        records = [log.log_decision(decision, prompt="p", outcome="pending", request_id=f"b{i}") for i in range(16)]
        assert len(spy.calls) == 3  # written (others can read them) but not yet flushed
        assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 3 + 16
    assert len(spy.calls) == 4  # one fsync, before the block ended: the caller may act on all 16 now
    assert spy.calls[-1] == (tmp_path / "a.jsonl").stat().st_size  # it covered every record of the batch
    assert [r["seq"] for r in records] == list(range(4, 20)) and verify_log(tmp_path / "a.jsonl").ok
    with log.batch():
        pass
    assert len(spy.calls) == 4  # nothing written, nothing to flush


def test_batches_nest_and_an_error_in_the_block_still_flushes_and_propagates(tmp_path, monkeypatch):
    spy = FsyncSpy(monkeypatch)
    log = AuditLog(tmp_path / "a.jsonl", fsync=True)
    with log.batch():
        log.append({"event": "decision"})
        with log.batch():
            log.append({"event": "decision"})
        assert spy.calls == []  # the inner block does not flush
    assert len(spy.calls) == 1
    with pytest.raises(RuntimeError, match="mid-batch"):
        with log.batch():
            log.append({"event": "decision"})
            raise RuntimeError("mid-batch")
    assert len(spy.calls) == 2  # what was written is still flushed


def test_a_failed_flush_fails_the_batch(tmp_path, monkeypatch):
    spy = FsyncSpy(monkeypatch)
    log = AuditLog(tmp_path / "a.jsonl", fsync=True)
    with pytest.raises(AuditWriteError, match="cannot flush"):
        with log.batch():
            log.append({"event": "decision"})
            spy.fail = True
    spy.fail = True
    with pytest.raises(AuditWriteError, match="cannot flush"):
        log.append({"event": "decision"})  # without a batch the record itself fails, as before


def test_without_fsync_a_batch_changes_nothing(tmp_path, monkeypatch):
    spy = FsyncSpy(monkeypatch)
    log = AuditLog(tmp_path / "a.jsonl")
    with log.batch():
        log.append({"event": "decision"})
    assert spy.calls == [] and verify_log(tmp_path / "a.jsonl").n_records == 1


def test_another_threads_records_are_not_held_back_by_a_batch(tmp_path, monkeypatch):
    spy = FsyncSpy(monkeypatch)
    log = AuditLog(tmp_path / "a.jsonl", fsync=True)
    inside, done = threading.Event(), threading.Event()

    def other() -> None:
        inside.wait(10)
        log.append({"event": "decision", "from": "other"})  # not in a batch: flushed at once
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with log.batch():
        log.append({"event": "decision", "from": "batch"})
        inside.set()
        assert done.wait(10) and len(spy.calls) == 1
    thread.join()
    # that fsync covered the batch's earlier record too, so the batch has nothing left to flush
    assert len(spy.calls) == 1 and spy.calls[0] == (tmp_path / "a.jsonl").stat().st_size


def test_a_signed_batch_defers_its_checkpoints_fsync_too_and_verifies(tmp_path, monkeypatch):
    private, public = generate_keypair(tmp_path / "keys")
    spy = FsyncSpy(monkeypatch)
    log = AuditLog(tmp_path / "a.jsonl", fsync=True, signer=CheckpointSigner.from_file(private), checkpoint_every=4,
                   checkpoint_seconds=3600)
    before = len(spy.calls)
    with log.batch():
        for i in range(10):
            log.append({"event": "decision", "i": i})
    assert len(spy.calls) == before + 1
    log.close()
    kinds = [json.loads(line)["event"] for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert kinds.count("checkpoint") == 3 and verify_log(tmp_path / "a.jsonl", public_keys=public, strict=True).ok


def test_a_log_rotated_mid_batch_has_its_old_file_flushed(tmp_path, monkeypatch):
    spy = FsyncSpy(monkeypatch)
    path = tmp_path / "a.jsonl"
    log = AuditLog(path, fsync=True)
    with log.batch():
        log.append({"event": "decision", "i": 0})
        path.rename(tmp_path / "a.jsonl.1")
        log.append({"event": "decision", "i": 1})  # follows the rotation: the old file is flushed first
        assert len(spy.calls) == 1
    assert len(spy.calls) == 2 and verify_log(tmp_path / "a.jsonl.1").ok and verify_log(path).ok


def test_the_logger_api_the_core_uses_is_unchanged():
    """``guard/core.py`` is written against these signatures; the batch API is an addition."""
    expected = {
        "for_policy": "(policy: 'Policy', *, path: 'str | os.PathLike[str] | None' = None, "
                      "model_id: 'str | None' = None, model_class: 'str | None' = None) -> 'AuditLogger'",
        "log_decision": "(self, decision: 'Decision', *, prompt: 'str | None', outcome: 'DecisionOutcome', "
                        "request_id: 'str', latency_scoring_ms: 'float | None' = None, **fields: 'Any') -> "
                        "'dict[str, Any]'",
        "log": "(self, event: 'str', **fields: 'Any') -> 'dict[str, Any]'",
        "log_policy_loaded": "(self, policy: 'Policy', **fields: 'Any') -> 'dict[str, Any]'",
        "close": "(self) -> 'None'",
        "batch": "(self) -> 'AbstractContextManager[None]'",
    }
    for name, signature in expected.items():
        assert str(inspect.signature(getattr(AuditLogger, name))) == signature, name
    outcome = inspect.signature(AuditLogger.log_outcome).parameters
    assert list(outcome) == ["self", "request_id", "prompt_index", "action", "outcome", "decision_record", "reason",
                             "latency_generation_ms", "error", "fields"]
    calibration = inspect.signature(AuditLogger.log_calibration_loaded).parameters
    assert list(calibration) == ["self", "calibration_id", "origin", "path", "previous", "fields"]


def test_the_benchmark_runs_and_batches_win(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "audit_fsync.py"
    run = subprocess.run([sys.executable, str(script), "--records", "64", "--batch", "16", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in run.stdout.splitlines() if line.startswith(("per-", "no-"))}
    assert set(rows) == {"no-fsync", "per-record", "per-batch"} and "fsyncs" in run.stdout
    assert int(rows["per-record"][2]) == 64 and int(rows["per-batch"][2]) == 4
