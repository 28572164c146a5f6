"""What signed checkpoints cost: audit records/s without and with signing, measured side by side in one run.

    python benchmarks/audit_signing.py                       # 3000 decision records per round, 5 rounds
    python benchmarks/audit_signing.py --records 20000 --rounds 7 --fsync

Each round writes the same decision records (through ``AuditLogger``, as a guard does: timestamp, prompt
hash, schema validation, chaining) to a fresh log once per configuration, in rotating order, so that a
busy shared machine slows every configuration alike; the table reports the median round, and the ratio
to the unsigned log is the median of the per-round ratios. Then each log is verified without and with
the public key (fastest of 3). Ratios are the numbers to read; absolute rates depend on the machine and
the disk.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=3000, help="decision records per round and configuration")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fsync", action="store_true", help="fsync every record (audit.fsync: true)")
    args = parser.parse_args()

    from guard.audit import AuditLog, AuditLogger, CheckpointSigner, generate_keypair, verify_log
    from guard.policy import decide, load_policy
    from guard.scoring.result import MemorizationScore

    work = Path(tempfile.mkdtemp(prefix="memguard-sign-"))
    private, public = generate_keypair(work / "keys")
    signer = CheckpointSigner.from_file(private)
    policy = load_policy({"name": "bench", "rules": [{"name": "hi", "when": {"score": {"gte": 5}}, "action": "block"}]})
    context = {"policy": {"name": policy.name, "version": policy.version, "hash": policy.content_hash},
               "model": {"id": "bench", "class": "StableDiffusionPipeline"}}
    decisions = [decide(policy, MemorizationScore(norm=1.0, cos=0.1, score=float(i % 9), g_norm=1.0, g_cos=1.0,
                                                  profile="sd1", t_hi=981, t_lo=41, samples=1, seed=51,
                                                  prediction_space="eps"), f"prompt {i}") for i in range(64)]
    configs = {"unsigned": None, "signed, every 100 (default)": 100, "signed, every 10": 10, "signed, every 1": 1}
    rates: dict[str, list[float]] = {name: [] for name in configs}
    logs: dict[str, Path] = {}
    for round_no in range(args.rounds):
        names = list(configs)
        names = names[round_no % len(names):] + names[:round_no % len(names)]
        for name in names:
            every = configs[name]
            path = work / f"{name.split(',')[0]}-{every}-{round_no}.jsonl"
            sink = AuditLog(path, fsync=args.fsync, signer=signer if every else None,
                            checkpoint_every=every or 100, checkpoint_seconds=3600)
            logger = AuditLogger(sink, context=context)
            started = time.perf_counter()
            for i in range(args.records):
                logger.log_decision(decisions[i % 64], prompt=f"prompt {i}", outcome="checked", request_id=f"r{i}")
            sink.close()
            rates[name].append(args.records / (time.perf_counter() - started))
            logs[name] = path
    rows = []
    for name, every in configs.items():
        path = logs[name]
        plain_s, keyed_s = [], []
        for _ in range(3):
            started = time.perf_counter()
            plain = verify_log(path)
            plain_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            keyed = verify_log(path, public_keys=public) if every else None
            keyed_s.append(time.perf_counter() - started)
        assert plain.ok and (keyed is None or keyed.ok and keyed.unsigned_tail == 0), (plain, keyed)
        ratio = statistics.median(r / u for r, u in zip(rates[name], rates["unsigned"]))  # per round: same load
        rows.append([name, args.records, plain.checkpoints, round(statistics.median(rates[name])), f"{ratio:.3f}",
                     round(plain.n_records / min(plain_s)),
                     round(keyed.n_records / min(keyed_s)) if keyed else "-"])
    print(f"{args.records} decision records x {args.rounds} rounds (median), fsync={args.fsync}, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print(table(["log", "records", "checkpoints", "records/s", "vs unsigned", "verify records/s (chain)",
                 "verify records/s (with key)"], rows))
    per_record = statistics.median(1 / r for r in rates["unsigned"])
    per_checkpoint = statistics.median(1 / s - 1 / u for s, u in zip(rates["signed, every 1"], rates["unsigned"]))
    print(f"one record: {per_record * 1e6:.0f} us; one checkpoint (from 'every 1', per round): "
          f"{per_checkpoint * 1e6:.0f} us, i.e. {per_checkpoint / per_record / 100:.2%} of a record's cost "
          f"at the default of one checkpoint per 100 records")


if __name__ == "__main__":
    main()
