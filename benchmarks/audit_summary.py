"""Benchmark: ``memguard audit summary`` and ``report`` on a generated, chain-valid log of 1 million records.

    python benchmarks/audit_summary.py [--records 1000000] [--log /tmp/audit-1m.jsonl] [--keep]

Records are made from memguard's own record models (a decision record, then its outcome record, one pair
per kind: allow, warn, rewrite, block, error) with varied times, scores and ids, then hash-chained exactly
as ``AuditLog`` does, so ``audit verify`` accepts the file. Prints the generation time, the summary time
(target: under 60 s for 1M records) and the process's peak memory (RSS) before and after the summary pass.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import resource
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from guard.audit import GENESIS_HASH, DecisionRecord, ModelRef, OutcomeRecord, PolicyRef, canonical_json
from guard.audit.record import CalibrationEventRecord, decision_fields, protect_prompt
from guard.policy import AppliedThreshold, Decision, load_policy
from guard.scoring import MemorizationScore

_KINDS = (  # action, rule, outcome, weight
    ("allow", "default", "generated", 0.93),
    ("warn", "warn-elevated", "generated", 0.04),
    ("rewrite", "rewrite-suspicious", "rewritten", 0.015),
    ("block", "block-memorized", "blocked", 0.01),
    ("block", "on_error", "blocked", 0.005),
)
_THRESHOLDS = {"warn-elevated": (1.9, 0.02), "rewrite-suspicious": (2.4, 0.005), "block-memorized": (3.1, 0.001)}
CALIBRATION = "cal-sd1-0123456789abcdef"
MEASUREMENT = {"fingerprint": "0123456789abcdef", "steps": 50, "seed": 51, "samples": 1, "prediction_space": "eps",
               "g_norm": 1.0, "g_cos": 2.0}


def _calibration_record(common: dict) -> dict:
    """The record a guard writes when it takes the calibration into use: the drift table's thresholds."""
    relative = [{"rule": rule, "metric": "score", "above_fpr": fpr, "value": value, "exceeded": round(fpr * 1000),
                 "n": 1000} for rule, (value, fpr) in _THRESHOLDS.items()]
    return CalibrationEventRecord(**common, event="calibration", calibration=CALIBRATION, check="loaded",
                                  message=f"judging with calibration {CALIBRATION}",
                                  details={"relative": relative}).to_json_dict()


def _templates(prompt_mode: str) -> list[tuple[dict, dict]]:
    """One (decision record, outcome record) pair per kind, as the guard writes them."""
    policy = load_policy("balanced")
    policy = policy.model_copy(update={"audit": policy.audit.model_copy(update={"prompt": prompt_mode})})
    common = {"timestamp": "2024-05-01T00:00:00.000000Z", "request_id": "x", "policy": PolicyRef.of(policy),
              "model": ModelRef(id="tiny", class_="StableDiffusionPipeline"), "source": "python"}
    out = []
    for action, rule, outcome, _ in _KINDS:
        score = MemorizationScore(norm=1.0, cos=0.2, score=1.4, g_norm=1.0, g_cos=2.0, profile="sd1", t_hi=981,
                                  t_lo=41, samples=1, seed=51, prediction_space="eps")
        thresholds = ()
        if rule in _THRESHOLDS:
            value, fpr = _THRESHOLDS[rule]
            thresholds = (AppliedThreshold(metric="score", op=">", value=value, above_fpr=fpr),)
        error = "non-finite score" if rule == "on_error" else None
        decision = Decision(prompt_index=0, action=action, rule=rule, reason=f"rule {rule}", thresholds=thresholds,
                            score=None if error else score, error=error, calibration_id=None if error else CALIBRATION)
        fields = decision_fields(decision, prompt="a prompt", outcome="pending")
        if not error:
            fields["measurement"] = MEASUREMENT
        fields["prompt"] = protect_prompt(fields["prompt"], prompt_mode)
        decided = DecisionRecord(**common, **fields, prompt_mode=prompt_mode, latency_scoring_ms=12.0)
        extras = {"mitigation": {"score_after": 1.2, "steps": 6, "met": True}} if action == "rewrite" else {}
        done = OutcomeRecord(**common, event="outcome", prompt_index=0, action=action, outcome=outcome,
                             latency_generation_ms=900.0, extras=extras)
        out.append((decided.to_json_dict(), done.to_json_dict()))
    out.append((_calibration_record(common), {}))
    return out


def write_synthetic_log(path: str | Path, records: int, *, seed: int = 0, prompt_mode: str = "hash",
                        start: datetime | None = None, span_hours: float = 24 * 14) -> Path:
    """A chain-valid audit log of ``records`` decisions (each followed by its outcome record) spread over
    ``span_hours`` from ``start``."""
    rng = random.Random(seed)
    templates = _templates(prompt_mode)
    calibration = templates.pop()[0]
    weights = [k[3] for k in _KINDS]
    start = start or datetime(2024, 5, 1, tzinfo=timezone.utc)
    step = span_hours * 3600 / max(records, 1)
    prev, path = GENESIS_HASH, Path(path)
    with path.open("w", encoding="utf-8") as handle:
        seq = 1
        calibration.update(timestamp=start.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), seq=seq, prev_hash=prev)
        calibration["hash"] = prev = hashlib.sha256(canonical_json(calibration).encode("utf-8")).hexdigest()
        handle.write(canonical_json(calibration) + "\n")
        for number in range(1, records + 1):
            kind = rng.choices(range(len(templates)), weights)[0]
            decided, done = (dict(t) for t in templates[kind])
            when = (start + timedelta(seconds=number * step)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            request_id = f"{seed:04x}{number:028x}"
            prompt = f"prompt number {rng.randrange(10**6)}"
            decided["prompt"] = (prompt if prompt_mode == "plain"
                                 else hashlib.sha256(prompt.encode()).hexdigest() if prompt_mode == "hash"
                                 else "[redacted]")
            if decided["score"] is not None:
                base = {"allow": 1.2, "warn": 2.1, "rewrite": 2.7, "block": 3.5}[decided["action"]]
                decided["norm"] = round(rng.gauss(base - 0.4, 0.15), 6)
                decided["cos"] = round(rng.uniform(0.15, 0.25), 6)
                decided["score"] = round(decided["norm"] + 2.0 * decided["cos"], 6)
            for record in (decided, done):
                seq += 1
                record.update(timestamp=when, request_id=request_id, seq=seq, prev_hash=prev)
                if record is done:
                    record.update(decision_seq=decided["seq"], decision_hash=decided["hash"])
                record["hash"] = prev = hashlib.sha256(canonical_json(record).encode("utf-8")).hexdigest()
                handle.write(canonical_json(record) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--log", default="/tmp/memguard-audit-bench.jsonl")
    parser.add_argument("--report", default=None, help="also time `audit report` into this HTML file")
    parser.add_argument("--keep", action="store_true", help="keep the generated log")
    args = parser.parse_args()

    from guard.audit.review import render_text, summarize

    t0 = time.perf_counter()
    log = write_synthetic_log(args.log, args.records)
    t1 = time.perf_counter()
    print(f"generated {args.records} records ({log.stat().st_size / 1e6:.0f} MB) in {t1 - t0:.1f} s")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    summary = summarize(log)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    text = render_text(summary).splitlines()
    print(text[0])
    print("\n".join(line for line in text if "above_fpr" in line or line.startswith("  block-") or
                    line.startswith("  rewrite-") or line.startswith("  warn-")))
    print(f"summary: {t2 - t1:.1f} s ({args.records / (t2 - t1):,.0f} records/s), peak RSS {peak / 1e3:.0f} MB "
          f"(was {before / 1e3:.0f} MB before it)")
    if args.report:
        from guard.audit import verify_log
        from guard.audit.report import write_report

        write_report(summary, verify_log(log), args.report)
        print(f"report (verify + render): {time.perf_counter() - t2:.1f} s -> {args.report}")
    if not args.keep:
        log.unlink()


if __name__ == "__main__":
    main()
