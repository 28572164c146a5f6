"""Do the policies' relative thresholds give the FPR they ask for on prompts the calibration never saw?

    python benchmarks/calibration_check.py      # shipped model, its shipped calibration, held-out nmem.txt

For each ``above_fpr`` of the shipped policies: the absolute threshold the calibration gives, and the share
of held-out non-memorized prompts above it, with the 95% interval that sampling error alone allows. Both sets
are samples: the threshold is exceeded by k of the n calibration scores, so the true exceedance rate is
Beta(k + 1, n - k) distributed, and the held-out count of m prompts is then Beta-binomial(m, k + 1, n - k).
"""

from __future__ import annotations

import argparse

from common import MEMORIZER_PROMPTS, SHIPPED_MODEL, load, prompts_from, setup, table

from guard.assets import shipped_calibration_path
from guard.policy import CalibrationProfile, load_policy, shipped_policies
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL))
    parser.add_argument("--calibration", default=None, help="profile file (default: the one shipped beside the model)")
    parser.add_argument("--heldout", default=str(MEMORIZER_PROMPTS / "nmem.txt"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    profile = CalibrationProfile.load(args.calibration or shipped_calibration_path(args.model))
    pipe = load(args.model)
    scorer = Scorer(pipe, samples=profile.samples, seed=profile.seed, profile={"g_norm": profile.g_norm,
                                                                              "g_cos": profile.g_cos})
    heldout = prompts_from(args.heldout)
    scores = [r.score for r in scorer.score(heldout)]
    print(f"calibration {profile.id}: {profile.n_prompts} prompts ({profile.source}); "
          f"held-out: {len(heldout)} prompts from {args.heldout}\n")
    rows = []
    for fpr, rules in policy_fprs().items():
        threshold = profile.threshold_at_fpr(fpr)
        above = sum(s > threshold for s in scores)
        exceeded = sum(s > threshold for s in profile.scores)
        low, high = predictive_interval(exceeded, profile.n_prompts, len(scores))
        rows.append([fpr, threshold, above / len(scores), f"[{low:.3f}, {high:.3f}]",
                     "yes" if low <= above / len(scores) <= high else "no", ", ".join(rules)])
    print(table(["asked FPR", "threshold", "held-out FPR", "95% interval", "consistent", "used by"], rows))


if __name__ == "__main__":
    main()
