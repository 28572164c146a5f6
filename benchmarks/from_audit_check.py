"""Does `memguard calibrate --from-audit` keep recall when the logged traffic holds memorized prompts?

    python benchmarks/from_audit_check.py                     # shipped model and the zoo, 0-10% memorized
    python benchmarks/from_audit_check.py --models shipped --shares 0,2.5,10 --work /tmp/fa

For each model, real audit logs are written by a real ``Guard`` scoring (not generating) a traffic of ordinary
prompts (the 500 of the model's ``calib.txt``) with memorized prompts mixed in at a given share, under three
logging policies: a rule-less one (everything allowed, only logged; no calibration, so the family's weights),
``balanced`` with the model's own calibration (it blocks the memorized prompts it catches) and ``balanced`` with
``calibration: auto`` (the generic captions; on a model with its own small vocabulary it flags ordinary prompts
too). The memorized prompts are split in two halves: one half is logged (repeated as needed to reach the share),
the other is held out, and the run is repeated with the halves swapped, so every memorized prompt is held out once.

Each log then goes through the default ``memguard calibrate --from-audit LOG --out P`` (no options), and the
profile is compared with the clean one (the same log's ordinary traffic alone, no exclusion): its thresholds, the
share of held-out memorized prompts the shipped ``strict`` and ``balanced`` policies stop with it (``rewrite`` or
``block``), and the share of held-out ordinary prompts (``nmem.txt``) ``strict`` flags. Also printed: how many
records were excluded (memorized / ordinary, which only a benchmark knows), the tool's estimate of memorized
records left above the 2% threshold against the truth, and whether the running guard's fit check warned. Counts
are both folds together (the 0% log has no folds); thresholds are fold 0's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import MEMORIZER_PROMPTS, SHIPPED_MODEL, load, prompts_from, table
from common import setup as setup_threads

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "benchmarks" / "memorizer" / "models"
MODELS = {
    "shipped": (SHIPPED_MODEL, MEMORIZER_PROMPTS),
    **{name: (ZOO / name, MEMORIZER_PROMPTS / "strong") for name in ("eps-strong", "eps-partial", "v-strong",
                                                                     "flow-strong")},
}
SETUPS = ("rule-less", "balanced (own)", "balanced (auto)")
FPRS = (0.001, 0.005, 0.02)
STOPS = ("block", "rewrite")


@dataclass
class Row:
    """One model, logging policy and memorized share, both folds together."""

    model: str
    setup: str
    share: float
    logged: int = 0
    memorized_logged: int = 0
    excluded_memorized: int = 0
    excluded_ordinary: int = 0
    thresholds: list[float] = field(default_factory=list)
    clean: list[float] = field(default_factory=list)
    strict: int = 0
    balanced: int = 0
    strict_clean: int = 0
    balanced_clean: int = 0
    heldout: int = 0
    ordinary_flagged: float = 0.0
    ordinary_flagged_clean: float = 0.0
    estimate: float = 0.0
    truth: int = 0
    fit_warning: bool = False
    output: str = ""


def memorized_prompts(prompts: Path) -> list[str]:
    """The model's memorized captions: for the shipped model only those duplicated 16 times or more."""
    levels = prompts / "mem_levels.tsv"
    if prompts == MEMORIZER_PROMPTS and levels.exists():
        rows = [line.split("\t") for line in levels.read_text().splitlines()[1:] if line.strip()]
        return [row[0] for row in rows if int(row[1]) >= 16]
    return prompts_from(prompts / "mem.txt")


def own_calibration(model: Path, pipe: Any, calib: list[str], work: Path) -> Path:
    """The model's shipped calibration, or one made from calib.txt (flow-strong ships none)."""
    shipped = model / "calibration.json"
    if shipped.exists():
        return shipped
    from guard import calibrate
    from guard.scoring import Scorer

    path = work / f"{model.name}-calibration.json"
    if not path.exists():
        calibrate(Scorer(pipe), calib, source="calib.txt", progress=False).save(path)
    return path


def policy_for(setup: str, own: Path) -> tuple[Any, Path | None]:
    if setup == "rule-less":
        return {"name": "log-only", "calibration": "off", "rules": [], "default": "allow",
                "audit": {"prompt": "hash"}}, None
    return "balanced", (own if setup == "balanced (own)" else None)


def write_log(pipe: Any, policy: Any, calibration: Path | None, traffic: list[str], log: Path) -> None:
    """A real guard judges the traffic (scoring only) and writes its audit log."""
    from guard import Guard

    log.unlink(missing_ok=True)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        guard = Guard(pipe, policy, audit_path=log, calibration=calibration)
        for start in range(0, len(traffic), 32):
            guard.check_many(traffic[start:start + 32])
        guard.close()


def read_log(log: Path) -> tuple[list[dict[str, Any]], bool]:
    """The decision records, and whether the guard's fit check wrote a ``calibration_mismatch`` record."""
    records = [json.loads(line) for line in log.read_text().splitlines()]
    warned = any(r.get("event") == "calibration_mismatch" and r.get("check") == "score_distribution"
                 for r in records)
    return [r for r in records if r.get("event") == "decision"], warned


def from_audit(log: Path, out: Path, *options: str) -> tuple[Any, str]:
    """The CLI's ``calibrate --from-audit``, as a user runs it; the profile and what it printed."""
    from click.testing import CliRunner

    from guard.calibration import CalibrationProfile
    from guard.cli import main as cli

    result = CliRunner().invoke(cli, ["calibrate", "--from-audit", str(log), "--out", str(out),
                                      "--fprs", ",".join(f"{f:g}" for f in FPRS), *options])
    if result.exit_code != 0:
        raise SystemExit(f"calibrate --from-audit {log} failed:\n{result.output}")
    return CalibrationProfile.load(out), result.output


def stops(policy: Any, scores: list[Any], profile: Any) -> int:
    from guard.policy import decide

    return sum(decide(policy, s, "p", profile).action in STOPS for s in scores)


def run_model(name: str, shares: list[float], setups: list[str], work: Path, reuse: bool = False) -> list[Row]:
    from guard.audit.from_audit import profile_from_audit
    from guard.policy import load_policy
    from guard.scoring import Scorer

    model, prompts = MODELS[name]
    pipe = load(model)
    calib, heldout_ordinary = prompts_from(prompts / "calib.txt"), prompts_from(prompts / "nmem.txt")
    memorized = memorized_prompts(prompts)
    folds = [memorized[0::2], memorized[1::2]]
    own = own_calibration(model, pipe, calib, work)
    strict, balanced = load_policy("strict"), load_policy("balanced")
    scored: dict[tuple[float, float], tuple[list[Any], list[Any]]] = {}
    rows = []
    for setup in setups:
        policy, calibration = policy_for(setup, own)
        clean = None
        for share in sorted(set(shares) | {0.0}):  # the 0% log gives the clean profile: its traffic, nothing excluded
            row = Row(name, setup, share)
            for fold in (0, 1):
                if share == 0 and fold == 1:
                    break
                logged = folds[fold]
                count = round(share * len(calib) / (1 - share))
                traffic = [(p, False) for p in calib] + [(logged[i % len(logged)], True) for i in range(count)]
                random.Random(f"{name}-{share}-{fold}").shuffle(traffic)
                log = log_path(work, name, setup, share, fold)
                started = time.perf_counter()
                if not (reuse and log.exists()):
                    write_log(pipe, policy, calibration, [p for p, _ in traffic], log)
                decisions, warned = read_log(log)
                if len(decisions) != len(traffic):
                    raise SystemExit(f"{log}: {len(decisions)} decisions for {len(traffic)} requests")
                key = (decisions[0]["measurement"]["g_norm"], decisions[0]["measurement"]["g_cos"])
                if key not in scored:
                    scorer = Scorer(pipe, profile={"g_norm": key[0], "g_cos": key[1]})
                    scored[key] = (scorer.score(memorized), scorer.score(heldout_ordinary))
                mem_scores, ordinary_scores = scored[key]
                if share == 0:
                    clean, _ = from_audit(log, work / "clean.json", "--fence", "0")
                profile, output = from_audit(log, work / "profile.json")
                made = profile_from_audit(log)
                held = [mem_scores[memorized.index(p)] for p in folds[1 - fold]] if share else mem_scores
                kinds = [is_mem for _, is_mem in traffic]  # the log keeps the traffic's order
                scores = [r["score"] for r in decisions]
                far = made.body.far if made.body is not None else (None,) * len(scores)
                row.logged += len(traffic)
                row.memorized_logged += count
                row.excluded_memorized += sum(1 for f, m in zip(far, kinds) if m and f is not None)
                row.excluded_ordinary += sum(1 for f, m in zip(far, kinds) if not m and f is not None)
                threshold = profile.threshold_at_fpr(0.02)
                row.estimate += made.remaining(0.02).memorized
                row.truth += sum(1 for s, f, m in zip(scores, far, kinds) if m and f is None and s > threshold)
                row.strict += stops(strict, held, profile)
                row.balanced += stops(balanced, held, profile)
                row.strict_clean += stops(strict, held, clean)
                row.balanced_clean += stops(balanced, held, clean)
                row.heldout += len(held)
                row.ordinary_flagged += stops(strict, ordinary_scores, profile) / len(ordinary_scores)
                row.ordinary_flagged_clean += stops(strict, ordinary_scores, clean) / len(ordinary_scores)
                row.fit_warning |= warned
                if fold == 0:
                    row.thresholds = [profile.threshold_at_fpr(f) for f in FPRS]
                    row.clean = [clean.threshold_at_fpr(f) for f in FPRS]
                    row.output = output
                print(f"  {name} {setup} {100 * share:g}% fold {fold}: {time.perf_counter() - started:.0f}s",
                      file=sys.stderr, flush=True)
            folds_run = 1 if share == 0 else 2
            row.ordinary_flagged /= folds_run
            row.ordinary_flagged_clean /= folds_run
            if share in shares:
                rows.append(row)
    return rows


def log_path(work: Path, model: str, setup: str, share: float, fold: int) -> Path:
    slug = setup.replace(" ", "-").replace("(", "").replace(")", "")
    return work / f"{model}-{slug}-{100 * share:g}-{fold}.jsonl"


def report(rows: list[Row]) -> str:
    out = []
    for setup in dict.fromkeys(r.setup for r in rows):
        chosen = [r for r in rows if r.setup == setup]
        out.append(f"### logged under {setup}\n")
        out.append(table(
            ["model", "memorized share", "excluded: memorized / ordinary", "thresholds 0.001 / 0.005 / 0.02",
             "clean profile's", "strict stops", "clean", "balanced stops", "clean",
             "held-out ordinary strict flags (clean)", "memorized left above 0.02: estimated / true",
             "fit check warned"],
            [[r.model, f"{100 * r.share:g}%", f"{r.excluded_memorized}/{r.memorized_logged} / {r.excluded_ordinary}",
              " / ".join(f"{v:.3f}" for v in r.thresholds), " / ".join(f"{v:.3f}" for v in r.clean),
              f"{r.strict}/{r.heldout}", f"{r.strict_clean}/{r.heldout}", f"{r.balanced}/{r.heldout}",
              f"{r.balanced_clean}/{r.heldout}",
              f"{100 * r.ordinary_flagged:.1f}% ({100 * r.ordinary_flagged_clean:.1f}%)",
              f"{r.estimate:.1f} / {r.truth}", "-" if setup == "rule-less" else ("yes" if r.fit_warning else "no")]
             for r in chosen]))
        out.append("")
    worst = [r for r in rows if r.share in (0.025, 0.1)
             and (r.strict < r.strict_clean - r.heldout / 40 or r.balanced < r.balanced_clean - r.heldout / 40)]
    out.append("rows at 2.5% and 10% where --from-audit stops more than 1 in 40 fewer held-out memorized prompts "
               f"than the clean profile: {len(worst)}" + "".join(f"\n  {r.model} {r.setup} {100 * r.share:g}%"
                                                                for r in worst))
    return "\n".join(out)


def decisions_table(name: str, work: Path, share: float) -> str:
    """``--exclude-action block`` on the balanced logs: applied where the logging calibration fits, else not."""
    from guard.audit.from_audit import profile_from_audit

    rows = []
    for setup in ("balanced (own)", "balanced (auto)"):
        log = log_path(work, name, setup, share, 0)
        if not log.exists():
            continue
        made = profile_from_audit(log, exclude_actions=["block"])
        for check in made.decisions:
            rows.append([name, setup, f"{100 * share:g}%", check.records, check.within_body,
                         f"{100 * check.promised[2]:.2f}%" if check.promised else "-",
                         "applied" if check.consistent else "not applied",
                         f"{made.profile.threshold_at_fpr(0.02):.3f}"])
    return table(["model", "logged under", "memorized share", "blocked records", "within the body",
                  "promised at most", "--exclude-action block", "threshold 0.02"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--shares", default="0,1,2.5,5,10", help="memorized shares of the logged traffic, in %%")
    parser.add_argument("--setups", default=",".join(SETUPS), help=f"logging policies, of {', '.join(SETUPS)}")
    parser.add_argument("--work", default=None, help="folder for logs, profiles and the cache (default: temp)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reuse-logs", action="store_true",
                        help="with --work: read the logs a previous run left there instead of writing them again")
    args = parser.parse_args()
    setup_threads(args.threads)
    logging.getLogger("memguard").addHandler(logging.NullHandler())  # drift events: in the logs
    logging.getLogger("memguard").propagate = False
    work = Path(args.work or tempfile.mkdtemp(prefix="memguard-from-audit-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MEMGUARD_CACHE_DIR"] = str(work / "cache")  # the automatic calibrations, made once per model
    shares = [float(s) / 100 for s in args.shares.split(",")]
    setups = [s.strip() for s in args.setups.split(",")]
    unknown = [s for s in setups if s not in SETUPS] + [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown: {', '.join(unknown)}")
    rows = []
    for name in args.models.split(","):
        rows += run_model(name, shares, setups, work, args.reuse_logs)
    print(f"work folder: {work}\n")
    print(report(rows) + "\n")
    example = next((r for r in rows if r.model == "shipped" and r.setup == "balanced (own)" and r.share == 0.1), None)
    if example is not None:
        print("`memguard calibrate --from-audit` on the shipped model's 10% log under balanced (fold 0):\n")
        print("```\n" + example.output.rstrip() + "\n```\n")
    for name in args.models.split(","):
        if "balanced (own)" in setups and "balanced (auto)" in setups and 0.025 in shares:
            print(decisions_table(name, work, 0.025) + "\n")


if __name__ == "__main__":
    main()
