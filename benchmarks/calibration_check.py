"""Do the policies' relative thresholds give the FPR they ask for on prompts the calibration never saw?

    python benchmarks/calibration_check.py      # shipped model, its shipped calibration, held-out nmem.txt

For each ``above_fpr`` of the shipped policies: the absolute threshold the calibration gives, and the share
of held-out non-memorized prompts above it, with a 95% Wilson interval (sampling error of the held-out set).
"""

from __future__ import annotations

import argparse
import math

from common import MEMORIZER_PROMPTS, SHIPPED_MODEL, load, prompts_from, setup, table

from guard.assets import shipped_calibration_path
from guard.policy import CalibrationProfile, load_policy, shipped_policies
from guard.scoring import Scorer


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


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
        low, high = wilson(above, len(scores))
        rows.append([fpr, threshold, above / len(scores), f"[{low:.3f}, {high:.3f}]",
                     "yes" if low <= fpr <= high else "no", ", ".join(rules)])
    print(table(["asked FPR", "threshold", "held-out FPR", "95% interval", "consistent", "used by"], rows))


if __name__ == "__main__":
    main()
