"""Do the policies' relative thresholds give the FPR they ask for on prompts the calibration never saw?

    python benchmarks/calibration_check.py      # shipped model, its shipped calibration, held-out nmem.txt
    python benchmarks/calibration_check.py --from-audit   # a profile made from an audit log of traffic instead

For each ``above_fpr`` of the shipped policies: the absolute threshold the calibration gives, and the share
of held-out non-memorized prompts above it, with the 95% interval that sampling error alone allows. Both sets
are samples: the threshold is exceeded by k of the n calibration scores, so the true exceedance rate is
Beta(k + 1, n - k) distributed, and the held-out count of m prompts is then Beta-binomial(m, k + 1, n - k).

``--from-audit``: a ``Guard`` with an absolute-threshold monitor policy (prompts hashed in the log) judges
calib.txt with some memorized prompts of mem.txt mixed in; ``memguard calibrate --from-audit`` builds a profile
from that log, and the same table is printed for it, once per way of excluding the memorized prompts.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from common import MEMORIZER_PROMPTS, SHIPPED_MODEL, load, prompts_from, setup, table

from guard.assets import shipped_calibration_path
from guard.calibration import CalibrationProfile
from guard.policy import load_policy, shipped_policies
from guard.scoring import Scorer


def predictive_interval(exceeded: int, n_calibration: int, n_heldout: int) -> tuple[float, float]:
    """95% interval of the held-out FPR, given the threshold was exceeded by ``exceeded`` calibration scores."""
    from scipy.stats import betabinom

    low, high = betabinom.interval(0.95, n_heldout, exceeded + 1, n_calibration - exceeded)
    return low / n_heldout, high / n_heldout


def policy_fprs() -> dict[float, list[str]]:
    fprs: dict[float, list[str]] = {}
    for name in shipped_policies():
        policy = load_policy(name)
        for index, rule in enumerate(policy.rules):
            for metric, condition in rule.when.conditions().items():
                if condition.above_fpr is not None and metric == "score":
                    fprs.setdefault(condition.above_fpr, []).append(f"{name}:{policy.rule_label(index)}")
    return dict(sorted(fprs.items()))


def heldout_table(profile: CalibrationProfile, scores: list[float]) -> str:
    """Per policy ``above_fpr``: the profile's threshold and the held-out share above it, with its interval."""
    rows = []
    for fpr, rules in policy_fprs().items():
        threshold = profile.threshold_at_fpr(fpr)
        above = sum(s > threshold for s in scores)
        exceeded = sum(s > threshold for s in profile.scores)
        low, high = predictive_interval(exceeded, profile.n_prompts, len(scores))
        rows.append([fpr, threshold, above / len(scores), f"[{low:.3f}, {high:.3f}]",
                     "yes" if low <= above / len(scores) <= high else "no", ", ".join(rules)])
    return table(["asked FPR", "threshold", "held-out FPR", "95% interval", "consistent", "used by"], rows)


#: The monitor that writes the benchmark's audit log: absolute thresholds (no calibration needed), never blocks.
#: ``flag-outlier`` is a loose threshold: on the shipped model the highest of its 500 calibration scores is 2.656.
MONITOR = {
    "name": "monitor-absolute", "calibration": "off", "profile": {"g_norm": 1.0, "g_cos": 2.0},
    "rules": [{"name": "flag-outlier", "when": {"score": {"gte": 3.0}}, "action": "warn"}],
    "default": "allow", "on_error": "warn", "audit": {"prompt": "hash"},
}


def from_audit(args: argparse.Namespace, pipe: object, heldout: list[str]) -> None:
    """Write an audit log of traffic with a Guard, build profiles from it with the CLI, check them held out."""
    from click.testing import CliRunner

    from guard import Guard
    from guard.cli import main as cli

    rng = random.Random(0)
    traffic = prompts_from(MEMORIZER_PROMPTS / "calib.txt")
    memorized = rng.sample(prompts_from(MEMORIZER_PROMPTS / "mem.txt"), args.memorized)
    mixed = traffic + memorized
    rng.shuffle(mixed)
    work = Path(args.work or tempfile.mkdtemp(prefix="memguard-from-audit-"))
    log = work / "audit.jsonl"
    guard = Guard(pipe, MONITOR, audit_path=work / "scratch.jsonl")
    if not (args.reuse_log and log.exists()):
        log.unlink(missing_ok=True)
        guard = Guard(pipe, MONITOR, audit_path=log)
        for start in range(0, len(mixed), 32):
            guard.check_many(mixed[start:start + 32])
    guard.close()
    scores = [r.score for r in guard.core.scorer.score(heldout)]
    print(f"audit log {log}: {len(traffic)} ordinary prompts of calib.txt with {len(memorized)} memorized of "
          f"mem.txt mixed in ({100 * len(memorized) / len(mixed):.1f}%), prompts hashed; held-out: "
          f"{len(heldout)} prompts of {args.heldout}\n")
    variants = [("default exclusion (body fences on score and norm)", []),
                ("--exclude-rule flag-outlier", ["--exclude-rule", "flag-outlier"]),
                ("no exclusion (--fence 0)", ["--fence", "0"])]
    for label, options in variants:
        out = work / f"profile-{len(options)}-{options[-1] if options else 'fence'}.json"
        result = CliRunner().invoke(cli, ["calibrate", "--from-audit", str(log), "--out", str(out), *options])
        if result.exit_code != 0:
            raise SystemExit(result.output)
        profile = CalibrationProfile.load(out)
        print(f"### {label}\n")
        print("```\n" + "\n".join(line for line in result.output.splitlines() if not line.startswith("  threshold"))
              + "\n```\n")
        print(heldout_table(profile, scores) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL))
    parser.add_argument("--calibration", default=None, help="profile file (default: the one shipped beside the model)")
    parser.add_argument("--heldout", default=str(MEMORIZER_PROMPTS / "nmem.txt"))
    parser.add_argument("--from-audit", action="store_true",
                        help="check profiles made by `memguard calibrate --from-audit` from a log of traffic")
    parser.add_argument("--memorized", type=int, default=12, help="memorized prompts mixed into the traffic")
    parser.add_argument("--work", default=None, help="folder for the audit log and profiles (default: a temp dir)")
    parser.add_argument("--reuse-log", action="store_true",
                        help="with --work: use the audit log a previous run left there instead of writing it again")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    pipe = load(args.model)
    heldout = prompts_from(args.heldout)
    if args.from_audit:
        from_audit(args, pipe, heldout)
        return
    profile = CalibrationProfile.load(args.calibration or shipped_calibration_path(args.model))
    scorer = Scorer(pipe, samples=profile.samples, seed=profile.seed, profile={"g_norm": profile.g_norm,
                                                                              "g_cos": profile.g_cos})
    scores = [r.score for r in scorer.score(heldout)]
    print(f"calibration {profile.id}: {profile.n_prompts} prompts ({profile.source}); "
          f"held-out: {len(heldout)} prompts from {args.heldout}\n")
    print(heldout_table(profile, scores))


if __name__ == "__main__":
    main()
