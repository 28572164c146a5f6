"""Does the guard notice when its calibration does not fit the traffic?

    python benchmarks/drift_check.py      # shipped model (151-word vocabulary), balanced policy
    python benchmarks/drift_check.py --zoo   # also the fit check on the zoo's scores, own and automatic calibration

The shipped memorizer's word-level vocabulary misses most words of memguard's generic captions, so the default
path (``Guard(pipe)``: balanced policy, automatic calibration on the generic captions) reads its thresholds off
prompts unlike the model's. Two guards judge the same traffic (held-out ordinary prompts of nmem.txt with a few
memorized prompts of mem.txt mixed in), one with the automatic calibration ("wrong"), one with the shipped
calibration made from calib.txt, prompts like the traffic ("right"). Printed per guard: what the automatic
calibration's fit checks said, the actions taken on the ordinary prompts, and the drift table of
``memguard audit summary`` (observed vs promised crossing rate per rule, 99% intervals).

A third guard judges nmem.txt alone in its file order with the shipped calibration: its first 200 captions differ
from calib.txt more than a random 200 do (a two-sample KS test gives p of about 0.001 there; the fit check used to
warn below 0.001, and did on the same captions with a few memorized prompts among them).

Then the fit check itself over many orders of the same traffic: the guard judges the first 200 requests, and
which 200 come first is chance. For ``--orders`` random orders of each log's scores, how often the threshold
check (``guard.calibration.checks.threshold_fit``, what the guard runs) fires, and how often the two-sample KS
test at p < 0.001 that it replaced would have.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import warnings
from pathlib import Path

from common import MEMORIZER_PROMPTS, SHIPPED_MODEL, load, prompts_from, setup, table

from guard.assets import shipped_calibration_path


def run(name: str, pipe: object, calibration: Path | None, traffic: list[str], ordinary: set[str],
        work: Path) -> tuple[Path, object]:
    from guard import Guard
    from guard.audit.review import summarize

    log = work / f"{name}.jsonl"
    log.unlink(missing_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        guard = Guard(pipe, "balanced", audit_path=log, calibration=calibration)
        reports = []
        for start in range(0, len(traffic), 32):
            reports += guard.check_many(traffic[start:start + 32])
    guard.close()
    counts: dict[str, int] = {}
    for prompt, report in zip(traffic, reports):
        if prompt in ordinary:
            counts[report.action] = counts.get(report.action, 0) + 1
    n = sum(counts.values())
    print(f"## {name}: calibration {guard.core.calibration.id} ({guard.core.calibration.source}, "
          f"{guard.core.calibration.n_prompts} prompts)\n")
    found = [str(w.message) for w in caught if "memguard" in str(w.message)]
    print("warnings: " + ("; ".join(found) if found else "none") + "\n")
    print(f"actions on the {n} ordinary prompts: " + ", ".join(
        f"{a} {counts.get(a, 0)} ({100 * counts.get(a, 0) / n:.1f}%)" for a in ("block", "rewrite", "warn", "allow"))
        + "\n")
    summary = summarize(log).to_dict()
    rows = [[r["rule"], r["above_fpr"], r["decisions"], r["crossed"], f"{100 * r['observed']:.2f}%",
             f"[{100 * r['observed_low']:.2f}%, {100 * r['observed_high']:.2f}%]", f"{100 * r['promised']:.2f}%",
             f"[{100 * r['promised_low']:.2f}%, {100 * r['promised_high']:.2f}%]", r["verdict"]]
            for r in summary["drift"]["rows"]]
    print(table(["rule", "above_fpr", "decisions", "crossed", "observed", "99% interval", "promised",
                 "promised 99% interval", "verdict"], rows) + "\n")
    findings = summary["calibration_findings"]
    print("audit records of the live monitor: " + (", ".join(
        f"{f['event']} ({f['check']})" for f in findings) or "none") + "\n")
    return log, guard.core.calibration


def orders(logs: dict[str, tuple[Path, object]], count: int, first_n: int = 200) -> None:
    """The fit check on ``count`` random orders of each log's scores, against the KS test it replaced."""
    import json

    from guard.calibration.checks import ks_two_sample, threshold_fit

    rows = []
    for name, (log, profile) in logs.items():
        records = [json.loads(line) for line in log.read_text().splitlines()]
        loaded = next(r for r in records if r["event"] == "calibration")
        relative = loaded["details"]["relative"]
        calibration = profile.scores
        decisions = [(r["score"], r["norm"]) for r in records if r["event"] == "decision"]
        scores = [s for s, _ in decisions]
        rng = random.Random(1)
        fired = ks_fired = 0
        for _ in range(count):
            first = rng.sample(decisions, first_n)
            observed = {"score": [s for s, _ in first], "norm": [n for _, n in first]}
            fired += threshold_fit(observed, relative).problem is not None
            ks_fired += ks_two_sample(observed["score"], calibration)[1] < 0.001
        head = decisions[:first_n]
        in_order = threshold_fit({"score": [s for s, _ in head], "norm": [n for _, n in head]}, relative, calibration)
        rows.append([name, len(scores), "fires" if in_order.problem else "quiet",
                     f"{in_order.distribution.p_value:.2g}", count, f"{fired} ({100 * fired / count:.0f}%)",
                     f"{ks_fired} ({100 * ks_fired / count:.0f}%)"])
    print(table(["calibration", "requests in the log", "log order: threshold check", "log order: KS p",
                 f"random orders (first {first_n})", "threshold check fires", "KS p < 0.001 would fire"], rows)
          + "\n")


def zoo(draws: int, first_n: int = 200) -> None:
    """The fit check on every model's held-out captions with 0, 5 and 10% memorized prompts mixed in, under its own
    calibration and the automatic one, for balanced and strict: how often the first 200 make it fire."""
    from guard import calibrate
    from guard.calibration import CalibrationProfile
    from guard.calibration.checks import threshold_fit
    from guard.monitor import relative_thresholds
    from guard.policy import load_policy
    from guard.scoring import Scorer

    root = Path(__file__).resolve().parent / "memorizer"
    models = {"shipped": (SHIPPED_MODEL, MEMORIZER_PROMPTS)}
    models.update({m: (root / "models" / m, MEMORIZER_PROMPTS / "strong")
                   for m in ("eps-strong", "eps-partial", "v-strong", "flow-strong")})
    policies = {name: load_policy(name) for name in ("balanced", "strict")}
    rows = []
    for name, (model, prompts) in models.items():
        pipe = load(model)
        family = Scorer(pipe)
        own_path = model / "calibration.json"
        own = (CalibrationProfile.load(own_path) if own_path.exists()
               else calibrate(family, prompts_from(prompts / "calib.txt"), progress=False))
        automatic = calibrate(family, progress=False)  # the generic captions, the family's weights
        memorized = prompts_from(prompts / "mem.txt")
        if prompts == MEMORIZER_PROMPTS:  # the shipped model: only captions it memorized (16 copies or more)
            levels = [line.split("\t") for line in (prompts / "mem_levels.tsv").read_text().splitlines()[1:]]
            memorized = [caption for caption, copies in levels if int(copies) >= 16]
        for label, profile in (("own", own), ("auto", automatic)):
            scorer = Scorer(pipe, profile={"g_norm": profile.g_norm, "g_cos": profile.g_cos})
            ordinary = [(s.score, s.norm) for s in scorer.score(prompts_from(prompts / "nmem.txt"))]
            mem = [(s.score, s.norm) for s in scorer.score(memorized)]
            for share in (0.0, 0.05, 0.10):
                cells = [name, label, f"{100 * share:g}%"]
                for policy in policies.values():
                    relative = relative_thresholds(policy, profile)
                    rng = random.Random(f"{name}-{label}-{share}")
                    fired = 0
                    for _ in range(draws):
                        count = round(share * first_n)
                        first = rng.sample(ordinary, first_n - count) + [rng.choice(mem) for _ in range(count)]
                        observed = {"score": [v for v, _ in first], "norm": [n for _, n in first]}
                        fit = threshold_fit(observed, relative)
                        fired += fit.problem is not None
                    cells.append(f"{fired}/{draws}")
                rows.append(cells)
    print(f"the fit check on {draws} random draws of {first_n} held-out captions (nmem.txt), memorized mixed in:\n")
    print(table(["model", "calibration", "memorized", "balanced fires", "strict fires"], rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL))
    parser.add_argument("--memorized", type=int, default=6, help="memorized prompts mixed into the traffic")
    parser.add_argument("--work", default=None, help="folder for the audit logs (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--orders", type=int, default=500, help="random orders of the traffic for the fit check")
    parser.add_argument("--zoo", action="store_true", help="also the fit check on the zoo's scores (a few minutes)")
    args = parser.parse_args()
    setup(args.threads)
    pipe = load(args.model)
    rng = random.Random(0)
    ordinary = prompts_from(MEMORIZER_PROMPTS / "nmem.txt")
    traffic = ordinary + rng.sample(prompts_from(MEMORIZER_PROMPTS / "mem.txt"), args.memorized)
    rng.shuffle(traffic)
    work = Path(args.work or tempfile.mkdtemp(prefix="memguard-drift-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"traffic: {len(ordinary)} ordinary prompts of nmem.txt + {args.memorized} memorized of mem.txt\n")
    logs = {"wrong (auto)": run("wrong", pipe, None, traffic, set(ordinary), work),
            "right (calib.txt)": run("right", pipe, shipped_calibration_path(args.model), traffic, set(ordinary),
                                     work)}
    print("nmem.txt alone, in its file order (its first 200 differ from calib.txt more than a random 200 do):\n")
    logs["right (calib.txt), nmem.txt in file order"] = run("right-file-order", pipe,
                                                            shipped_calibration_path(args.model), ordinary,
                                                            set(ordinary), work)
    orders(logs, args.orders)
    if args.zoo:
        zoo(300)


if __name__ == "__main__":
    main()
