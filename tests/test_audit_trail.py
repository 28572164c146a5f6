"""An audit trail of many writers: one segment per writer in a directory, verified, summarized and read as one.

The attacker tests play the attacker ``docs/audit.md`` names for trails: someone who can write every file of the
trail directory (delete, truncate, rename, edit, re-chain with memguard's own ``record_hash``) but holds no
private key and cannot write where checkpoints are shipped.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from guard.audit import (
    GENESIS_HASH,
    AuditLog,
    AuditLogger,
    CheckpointSigner,
    TrailStats,
    generate_keypair,
    iter_trail,
    load_trail_anchors,
    read_trail,
    record_hash,
    verify_log,
    verify_trail,
    writer_id,
)
from guard.audit.trail import WRITER_ENV, check_writer_id, list_segments
from guard.cli import main
from guard.policy import decide, load_policy
from guard.scoring.result import MemorizationScore

POLICY = {"name": "t", "rules": [{"name": "hi", "when": {"score": {"gte": 5}}, "action": "block"}]}
WRITERS = ("a", "b", "c")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    return {name: generate_keypair(folder, name) for name in ("a", "b")}


def pub(keys, name="a") -> Path:
    return keys[name][1]


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in records))


def rechain(records: list[dict]) -> list[dict]:
    """The attacker's re-chaining: renumber, recompute every hash, point each checkpoint at its new head and
    previous checkpoint, so that only the signatures (which need the private key) are left wrong."""
    prev, cp_seq, cp_sig, out = GENESIS_HASH, 0, None, []
    for seq, record in enumerate(records, start=1):
        record = {**record, "seq": seq, "prev_hash": prev}
        if record["event"] == "checkpoint":
            record.update(signed_seq=seq - 1, signed_hash=prev, prev_checkpoint_seq=cp_seq, prev_signature=cp_sig)
            cp_seq, cp_sig = seq, record["signature"]
        record["hash"] = record_hash(record)
        prev = record["hash"]
        out.append(record)
    return out


def signed_trail(folder: Path, keys, *, n: int = 24, every: int = 4, copy: str | None = None,
                 writers: tuple[str, ...] = WRITERS) -> Path:
    """Writers appending in turn (so their checkpoints witness each other), then closing in order."""
    logs = {w: AuditLog(folder, trail=True, writer=w, signer=CheckpointSigner.from_file(keys["a"][0]),
                        checkpoint_every=every, checkpoint_seconds=3600, checkpoint_copy=copy) for w in writers}
    for i in range(n):
        for w, log in logs.items():
            log.append({"event": "decision", "w": w, "i": i, "action": "block" if i % 5 == 0 else "allow"})
    for log in logs.values():
        log.close()
    return folder


def checkpoint_seqs(path: Path) -> list[int]:
    return [r["seq"] for r in read(path) if r["event"] == "checkpoint"]


def score(value: float) -> MemorizationScore:
    return MemorizationScore(prompt="p", norm=1.0, cos=0.2, score=value, g_norm=1.0, g_cos=2.0, profile="sd1",
                             t_hi=981, t_lo=41, samples=1, seed=51, prediction_space="eps")


# ---------------------------------------------------------------- writers and segments


def test_writer_id_is_stable_per_process_and_configurable(monkeypatch):
    monkeypatch.delenv(WRITER_ENV, raising=False)
    first = writer_id()
    assert first == writer_id() and f"-{os.getpid()}-" in first  # host-pid-random, the same all process long
    monkeypatch.setenv(WRITER_ENV, "replica-3")
    assert writer_id() == "replica-3"
    monkeypatch.setenv(WRITER_ENV, "pod-{pid}")
    assert writer_id() == f"pod-{os.getpid()}"
    for bad in ("", "../x", ".hidden", "a b", "x" * 129):
        with pytest.raises(ValueError, match="not an audit writer id"):
            check_writer_id(bad)
    monkeypatch.setenv(WRITER_ENV, "{nope}")
    with pytest.raises(ValueError, match="may use"):
        writer_id()


def test_a_trail_directory_gets_one_segment_per_writer_and_every_record_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv(WRITER_ENV, "w1")
    monkeypatch.setenv("MEMGUARD_AUDIT_PATH", str(tmp_path / "logs") + "/")  # a trailing slash: a directory
    policy = load_policy(POLICY)
    log = AuditLogger.for_policy(policy)
    written = log.log_decision(decide(policy, score(1.0), "p"), prompt="p", outcome="checked", request_id="r")
    log.close()
    segment = tmp_path / "logs" / "w1.jsonl"
    assert log.sink.path == segment and log.sink.writer == "w1" and written["writer"] == "w1"
    records = read(segment)
    assert records[0]["event"] == "segment" and records[0]["trail"] == "logs" and records[0]["writer"] == "w1"
    assert records[0]["process"]["pid"] == os.getpid() and records[0]["witness"] == {}
    assert all(r["writer"] == "w1" for r in records) and verify_log(segment).ok
    with pytest.raises(ValueError, match="fields the sink sets"):
        log.sink.append({"event": "decision", "writer": "someone-else"})
    with pytest.raises(ValueError, match="written by the sink itself"):
        log.sink.append({"event": "segment"})
    monkeypatch.setenv("MEMGUARD_AUDIT_TRAIL", "prod-eu")
    monkeypatch.setenv(WRITER_ENV, "w2")
    named = AuditLog(tmp_path / "logs", trail=True)
    named.append({"event": "decision"})
    named.close()
    assert read(tmp_path / "logs" / "w2.jsonl")[0]["trail"] == "prod-eu"
    (tmp_path / "logs" / "w2.jsonl").unlink()
    monkeypatch.setenv(WRITER_ENV, "w1")
    second = AuditLogger.for_policy(policy, path=tmp_path / "logs")  # an existing directory needs no slash
    second.log("policy_loaded", policy_path=None, actor={"pid": 1, "host": "h"})
    second.close()
    assert [s.writer for s in list_segments(tmp_path / "logs")] == ["w1"] and len(read(segment)) == 3


def _worker_of_a_pool(logger: AuditLogger, n: int) -> None:
    for i in range(n):
        logger.log("policy_loaded", policy_path=f"child {i}", actor={"pid": os.getpid(), "host": "h"})
    logger.close()
    os._exit(0)  # like a pool worker: no interpreter exit handlers


def test_forked_workers_of_one_logger_each_write_their_own_segment(tmp_path, keys, monkeypatch):
    """A prefork pool (Celery, gunicorn): the logger is made in the parent, the children inherit it."""
    monkeypatch.delenv(WRITER_ENV, raising=False)
    monkeypatch.setenv("MEMGUARD_AUDIT_SIGNING_KEY", str(keys["a"][0]))
    policy = load_policy(POLICY)
    logger = AuditLogger.for_policy(policy, path=str(tmp_path / "trail") + "/")
    logger.log("policy_loaded", policy_path="parent", actor={"pid": os.getpid(), "host": "h"})
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=_worker_of_a_pool, args=(logger, 5)) for _ in range(3)]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    logger.close()
    report = verify_trail(tmp_path / "trail", public_keys=pub(keys), strict=True)
    assert report.ok, str(report)
    assert len(report.segments) == 4 and logger.sink.writer in report.writers
    for segment in report.segments:
        kinds = [r["event"] for r in read(segment.segment.path)]
        assert kinds[:2] == ["segment", "checkpoint"] and kinds[-1] == "checkpoint"


def _append_in_child(log: AuditLog, n: int) -> None:
    for i in range(n):
        log.append({"event": "decision", "pid": os.getpid(), "i": i})
    os._exit(0)


def test_forked_children_of_a_single_file_sink_keep_one_chain(tmp_path):
    """Inherited descriptors share one flock: a child must reopen the file, or parent and child interleave."""
    path = tmp_path / "a.jsonl"
    log = AuditLog(path)
    log.append({"event": "decision", "pid": os.getpid(), "i": -1})
    ctx = multiprocessing.get_context("fork")
    children = [ctx.Process(target=_append_in_child, args=(log, 400)) for _ in range(3)]
    for child in children:
        child.start()
    for i in range(400):
        log.append({"event": "decision", "pid": os.getpid(), "i": i})
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    log.close()
    report = verify_log(path)
    assert report.ok and report.n_records == 1 + 4 * 400, str(report)


# ---------------------------------------------------------------- several real processes, each a plain Guard


def _guard_process(folder: str, key: str, prompts: list[str]) -> None:
    import torch

    torch.set_num_threads(1)
    os.environ["MEMGUARD_AUDIT_SIGNING_KEY"] = key
    import guard
    from guard.testing import tiny_sd_pipeline

    with guard.Guard(tiny_sd_pipeline("epsilon"), policy=POLICY, audit_path=folder + "/") as g:
        g.check_many(prompts)
        g.check(prompts[0])


def test_several_processes_with_plain_guards_make_one_trail(tmp_path, keys):
    folder = tmp_path / "trail"
    prompts = [["a cat on a mat", "a red car"], ["a house by the sea", "two dogs", "a bowl of fruit"],
               ["a city at night"]]
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_guard_process, args=(str(folder), str(keys["a"][0]), p)) for p in prompts]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(300)
        assert proc.exitcode == 0
    runner = CliRunner()
    checked = runner.invoke(main, ["audit", "verify", str(folder), "--public-key", str(pub(keys)), "--strict"])
    assert checked.exit_code == 0, checked.output
    assert "3 segment(s)" in checked.output and checked.output.count("closed") == 3
    summary = runner.invoke(main, ["audit", "summary", str(folder), "--json"])
    data = json.loads(summary.output)
    assert data["decisions"] == sum(len(p) + 1 for p in prompts) and data["segments"] == 3
    assert sorted(w["decisions"] for w in data["writers"]) == sorted(len(p) + 1 for p in prompts)
    text = runner.invoke(main, ["audit", "summary", str(folder)]).output
    assert "writers (3, 3 segment(s))" in text
    out = tmp_path / "report.html"
    report = runner.invoke(main, ["audit", "report", str(folder), "--out", str(out), "--public-key", str(pub(keys))])
    assert report.exit_code == 0, report.output
    html = out.read_text()
    assert 'id="writers"' in html and html.count("<td>intact, ") == 3 and 'class="status ok"' in html
    times = [r["timestamp"] for r in read_trail(folder)]
    assert times == sorted(times) and len(times) == sum(len(read(s.path)) for s in list_segments(folder))


# ---------------------------------------------------------------- the attacker: writes the directory, no key


def test_an_untouched_trail_verifies_and_each_segment_witnesses_the_others(tmp_path, keys):
    folder = signed_trail(tmp_path / "t", keys)
    report = verify_trail(folder, public_keys=pub(keys), strict=True)
    assert report.ok and report.writers == WRITERS and report.trails == ("t",), str(report)
    witnessed = {w for r in read(folder / "c.jsonl") for w in (r.get("witness") or {})}
    assert witnessed == {"a", "b"}


def test_a_deleted_segment_is_missing(tmp_path, keys):
    folder = signed_trail(tmp_path / "t", keys)
    (folder / "a.jsonl").unlink()
    report = verify_trail(folder, public_keys=pub(keys))
    assert not report.ok
    assert [(Path(p.segment).name, p.reason.split(":")[0]) for p in report.problems] == [("a.jsonl", "missing")]
    assert "witnessed seq" in report.problems[0].reason


def test_a_segment_cut_back_to_an_earlier_checkpoint_verifies_alone_but_not_in_its_trail(tmp_path, keys):
    folder = signed_trail(tmp_path / "t", keys)
    segment = folder / "b.jsonl"
    earlier = checkpoint_seqs(segment)[-3]
    write(segment, read(segment)[:earlier])  # cut at a checkpoint: what is left is a valid signed log
    assert verify_log(segment, public_keys=pub(keys), strict=True).ok  # a single log cannot tell
    report = verify_trail(folder, public_keys=pub(keys))
    assert not report.ok and len(report.problems) == 1
    assert report.problems[0].segment == str(segment) and report.problems[0].reason.startswith(
        f"cut back: ends at seq {earlier}")


def test_an_edit_rechained_anywhere_fails(tmp_path, keys):
    folder = signed_trail(tmp_path / "t", keys)
    segment = folder / "a.jsonl"
    records = read(segment)
    blocked = next(i for i, r in enumerate(records) if r.get("action") == "block" and i > 4)
    records[blocked]["action"] = "allow"
    write(segment, rechain(records))
    report = verify_trail(folder, public_keys=pub(keys))
    assert not report.ok and report.problems[0].segment == str(segment)
    assert "bad signature" in report.problems[0].reason


def test_reordered_records_fail(tmp_path, keys):
    folder = signed_trail(tmp_path / "t", keys)
    segment = folder / "c.jsonl"
    records = read(segment)
    records[4], records[5] = records[5], records[4]
    write(segment, records)
    report = verify_trail(folder, public_keys=pub(keys))
    assert not report.ok and report.problems[0].line == 5 and "seq 6 follows seq 4" in report.problems[0].reason


def test_renamed_or_swapped_segments_fail(tmp_path, keys):
    folder = signed_trail(tmp_path / "t", keys)
    (folder / "a.jsonl").rename(folder / "tmp.jsonl")
    (folder / "b.jsonl").rename(folder / "a.jsonl")
    (folder / "tmp.jsonl").rename(folder / "b.jsonl")
    report = verify_trail(folder, public_keys=pub(keys))
    assert not report.ok
    assert {(Path(p.segment).name, p.line) for p in report.problems} == {("a.jsonl", 1), ("b.jsonl", 1)}
    assert "names writer 'b', but the segment is 'a'" in str(report)


def test_a_record_moved_to_another_segment_fails(tmp_path, keys):
    folder = signed_trail(tmp_path / "t", keys)
    source, target = read(folder / "a.jsonl"), read(folder / "b.jsonl")
    moved = source.pop(8)
    target.insert(8, {**moved, "writer": "b"})
    write(folder / "a.jsonl", rechain(source))
    write(folder / "b.jsonl", rechain(target))
    report = verify_trail(folder, public_keys=pub(keys))
    assert {Path(p.segment).name for p in report.problems} >= {"a.jsonl", "b.jsonl"}


def test_a_forged_or_foreign_segment_fails(tmp_path, keys):
    folder = signed_trail(tmp_path / "t", keys)
    with AuditLog(folder, trail=True, writer="forged") as unsigned:  # no key: no checkpoint
        unsigned.append({"event": "decision", "action": "allow"})
    report = verify_trail(folder, public_keys=pub(keys))
    assert [(Path(p.segment).name, p.reason.split(":")[0]) for p in report.problems] == [
        ("forged.jsonl", "no checkpoint")]
    (folder / "forged.jsonl").unlink()
    other = AuditLog(folder, trail=True, writer="other", signer=CheckpointSigner.from_file(keys["b"][0]))
    other.close()  # signed, but with a key that is not the deployment's
    report = verify_trail(folder, public_keys=pub(keys))
    assert not report.ok and "signed by another key" in report.problems[0].reason


def test_a_segment_of_another_trail_mixed_in_fails(tmp_path, keys):
    folder = signed_trail(tmp_path / "t", keys)
    elsewhere = signed_trail(tmp_path / "elsewhere", keys, n=3, writers=("a", "d"))
    shutil.copy(elsewhere / "d.jsonl", folder / "d.jsonl")  # same key, another deployment's trail
    report = verify_trail(folder, public_keys=pub(keys))
    assert [(Path(p.segment).name, p.reason.split(",")[0]) for p in report.problems] == [
        ("d.jsonl", "belongs to trail 'elsewhere'")]
    shutil.copy(elsewhere / "a.jsonl", folder / "a.jsonl")  # a writer of the same name: its own witnesses break
    assert any(Path(p.segment).name == "a.jsonl" for p in verify_trail(folder, public_keys=pub(keys)).problems)


def test_a_torn_last_line_fails(tmp_path, keys):
    folder = signed_trail(tmp_path / "t", keys)
    segment = folder / "b.jsonl"
    segment.write_bytes(segment.read_bytes()[:-15])
    report = verify_trail(folder, public_keys=pub(keys))
    assert report.problems[0].segment == str(segment) and "truncated mid-write" in report.problems[0].reason


CRASHING_WRITER = """
import os, sys
from guard.audit import AuditLog, CheckpointSigner
log = AuditLog(sys.argv[1], trail=True, writer="b", signer=CheckpointSigner.from_file(sys.argv[2]),
               checkpoint_every=1000, checkpoint_seconds=3600)
for i in range(6):
    log.append({"event": "decision", "i": i, "action": "block"})
os._exit(0)  # killed: nothing signs the six decisions
"""


def test_another_writers_witness_protects_a_crashed_segments_unsigned_tail(tmp_path, keys):
    folder = tmp_path / "t"
    run = subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(folder), str(keys["a"][0])],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with AuditLog(folder, trail=True, writer="c", signer=CheckpointSigner.from_file(keys["a"][0])) as later:
        later.append({"event": "decision", "action": "allow"})
    segment = folder / "b.jsonl"
    records = read(segment)
    assert records[-1]["event"] == "decision"  # b's last records were never signed by b
    records[-1]["action"] = "allow"  # block -> allow, after b's last checkpoint
    write(segment, rechain(records))
    alone = verify_log(segment, public_keys=pub(keys))
    assert alone.ok and alone.unsigned_tail == 6  # alone, an unsigned tail can be anything
    report = verify_trail(folder, public_keys=pub(keys))
    assert not report.ok and report.problems[0].reason.startswith("rewritten: its record seq 8")


def test_rolling_the_whole_trail_back_is_caught_only_by_shipped_checkpoints(tmp_path, keys):
    """The limit of what the directory alone shows: cutting every segment back to one earlier moment leaves a
    consistent, shorter trail. Checkpoints shipped where the attacker cannot write catch it."""
    folder, shipped, before = tmp_path / "t", tmp_path / "shipped", tmp_path / "before"
    signed_trail(folder, keys, n=8, copy=str(shipped) + "/")
    shutil.copytree(folder, before)  # the attacker keeps (or reconstructs) this earlier state ...
    signed_trail(folder, keys, n=8, copy=str(shipped) + "/")  # the writers go on
    assert sorted(p.name for p in shipped.iterdir()) == ["a.jsonl", "b.jsonl", "c.jsonl"]
    shutil.rmtree(folder)
    shutil.copytree(before, folder)  # ... and puts it back
    assert verify_trail(folder, public_keys=pub(keys), strict=True).ok  # consistent: not detectable alone
    report = verify_trail(folder, public_keys=pub(keys), anchors=load_trail_anchors([shipped]))
    assert not report.ok and len(report.problems) == 3
    assert all("records were cut off the end" in p.reason for p in report.problems)
    (shipped / "d.jsonl").write_text((shipped / "a.jsonl").read_text().replace('"writer":"a"', '"writer":"d"'))
    with pytest.raises(ValueError, match="not an intact checkpoint"):  # shipped copies are hash-checked too
        load_trail_anchors([shipped])


def test_without_a_key_a_deleted_segment_is_still_reported_by_later_segments(tmp_path):
    """Integrity only (no signatures: anyone can re-chain), but an accidentally lost segment still shows."""
    folder = tmp_path / "t"
    for w in WRITERS:
        with AuditLog(folder, trail=True, writer=w) as log:
            log.append({"event": "decision", "w": w})
    assert verify_trail(folder).ok
    (folder / "a.jsonl").unlink()
    report = verify_trail(folder)
    assert [p.reason.split(":")[0] for p in report.problems] == ["missing"] and "FAILED" in report.headline()


# ---------------------------------------------------------------- reading and the command line


def test_read_trail_merges_by_time_and_keeps_each_segments_order(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    stamps = {"a": [1, 4, 7], "b": [2, 3, 9], "c": [5, 6, 8]}
    for w, seconds in stamps.items():
        write(folder / f"{w}.jsonl", [{"event": "decision", "writer": w, "timestamp": f"2024-01-01T00:00:0{s}Z",
                                       "seq": i + 1} for i, s in enumerate(seconds)])
    with (folder / "b.jsonl").open("a") as handle:
        handle.write("garbage\n")
    stats = TrailStats()
    merged = [(segment.writer, record["timestamp"][-2]) for segment, record in iter_trail(folder, stats=stats)]
    assert [s for _, s in merged] == [str(i) for i in range(1, 10)]
    assert [s for w, s in merged if w == "b"] == ["2", "3", "9"]
    assert stats.records == 9 and stats.unreadable == 1 and stats.lines == 10
    assert len(list(read_trail([folder / "a.jsonl", folder / "c.jsonl", folder / "a.jsonl"]))) == 6
    with pytest.raises(FileNotFoundError):
        list(read_trail(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no audit segments"):
        list(read_trail(tmp_path / "empty"))


def test_read_trail_opens_a_segment_only_while_its_time_span_is_being_merged(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    for hour in range(40):  # forty short-lived writers, one after another
        write(folder / f"w{hour:02d}.jsonl", [{"event": "decision", "timestamp": f"2024-01-02T{hour % 24:02d}:0{i}:00Z"
                                              .replace("2024-01-02", f"2024-01-{2 + hour // 24:02d}"), "seq": i + 1}
                                             for i in range(3)])
    baseline = len(os.listdir("/proc/self/fd"))
    most = 0
    for _ in read_trail(folder):
        most = max(most, len(os.listdir("/proc/self/fd")) - baseline)
    assert most <= 2  # not forty


def test_cli_verify_a_trail_lists_writers_and_reports_each_problem_on_its_own_line(tmp_path, keys):
    folder = signed_trail(tmp_path / "t", keys)
    runner = CliRunner()
    ok = runner.invoke(main, ["audit", "verify", str(folder), "--public-key", str(pub(keys))])
    assert ok.exit_code == 0 and "writers: a, b, c" in ok.output and ok.output.count("(writer ") == 3
    files = runner.invoke(main, ["audit", "verify", str(folder / "a.jsonl"), str(folder / "c.jsonl")])
    assert files.exit_code == 1 and "b.jsonl: missing" in files.output  # several files are one trail too
    (folder / "a.jsonl").unlink()
    segment = folder / "c.jsonl"
    segment.write_bytes(segment.read_bytes()[:-10])
    bad = runner.invoke(main, ["audit", "verify", str(folder), "--public-key", str(pub(keys))])
    assert bad.exit_code == 1
    errors = bad.stderr.splitlines()  # one line per problem, each naming its segment
    assert len(errors) == 2 and any("c.jsonl: line" in e and "truncated" in e for e in errors)
    assert "FAILED: 2 problem(s)" in bad.stdout and "b.jsonl (writer b, closed)" in bad.stdout
    assert any("a.jsonl: missing" in e for e in errors)
    empty = tmp_path / "empty"
    empty.mkdir()
    unreadable = runner.invoke(main, ["audit", "verify", str(empty)])
    assert unreadable.exit_code == 2 and "no audit segments" in unreadable.output


def test_separate_single_file_logs_read_as_one_trail(tmp_path):
    """Logs of two hosts, each a plain file with the same name: verified, summarized and reported together."""
    for host in ("h1", "h2"):
        with AuditLog(tmp_path / host / "audit.jsonl") as log:
            for i in range(3):
                log.append({"event": "decision", "action": "block", "outcome": "checked",
                            "timestamp": f"2024-01-0{1 if host == 'h1' else 2}T00:00:0{i}.000000Z"})
    paths = [str(tmp_path / "h1" / "audit.jsonl"), str(tmp_path / "h2" / "audit.jsonl")]
    runner = CliRunner()
    assert runner.invoke(main, ["audit", "verify", *paths]).exit_code == 0
    data = json.loads(runner.invoke(main, ["audit", "summary", *paths, "--json"]).output)
    assert data["actions"]["block"] == 6 and sorted(w["writer"] for w in data["writers"]) == sorted(paths)
    assert data["first"].startswith("2024-01-01") and data["last"].startswith("2024-01-02")


def test_report_of_a_broken_trail_names_the_problem(tmp_path, keys):
    folder = signed_trail(tmp_path / "t", keys)
    (folder / "b.jsonl").unlink()
    out = tmp_path / "r.html"
    run = CliRunner().invoke(main, ["audit", "report", str(folder), "--out", str(out), "--public-key",
                                    str(pub(keys))])
    assert run.exit_code == 0, run.output
    html = out.read_text()
    assert "Trail BROKEN" in html and 'id="trail-problems"' in html and "b.jsonl: missing" in html


def test_checkpoint_copy_is_per_writer_and_must_be_outside_the_trail(tmp_path, keys):
    folder = tmp_path / "t"
    with pytest.raises(ValueError, match="inside the trail"):
        AuditLog(folder, trail=True, writer="a", checkpoint_copy=folder / "copies.jsonl")
    log = AuditLog(folder, trail=True, writer="a", signer=CheckpointSigner.from_file(keys["a"][0]),
                   checkpoint_copy=str(tmp_path / "copies") + "/")
    log.append({"event": "decision"})
    log.close()
    assert log.checkpoint_copy == tmp_path / "copies" / "a.jsonl"
    shipped = read(log.checkpoint_copy)
    assert [r["seq"] for r in shipped] == checkpoint_seqs(folder / "a.jsonl") and shipped[0]["writer"] == "a"


def test_a_crash_does_not_stop_the_trail_from_verifying(tmp_path, keys):
    """SIGKILL mid-segment: the segment stays open (unsigned tail); the trail verifies without --strict."""
    script = CRASHING_WRITER.replace("os._exit(0)", "os.kill(os.getpid(), signal.SIGKILL)").replace(
        "import os, sys", "import os, signal, sys")
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "t"), str(keys["a"][0])],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL
    report = verify_trail(tmp_path / "t", public_keys=pub(keys))
    assert report.ok and report.unsigned_tail == 6 and "open: writer running, crashed, or cut back" in str(report)
    assert not verify_trail(tmp_path / "t", public_keys=pub(keys), strict=True).ok
