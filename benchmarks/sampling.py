"""n=1, n=4 and adaptive sampling side by side, measured in one run (``detection.py --calib FILE``).

Each mode is calibrated on the same ordinary captions (``--calib``): n=1 and n=4 as fixed-sampling profiles, adaptive
as an adaptive profile (every caption on all its draws, plus their spread). Then every evaluation prompt is scored by
each mode, the adaptive one under the limits a policy with ``above_fpr`` rules at the given rates would set (the
calibration's thresholds at those rates, the bands at each band quantile). Reported per mode: AUROC and TPR at 1% and
3% FPR of its scores (ROC rule of docs/scoring.md), mean draws per prompt, wall time per prompt (fastest of
``repeats`` runs, encoding included, unconditional cache warm), and at the calibrated thresholds: the held-out FPR,
the TPR, and how many prompts land on another side of a threshold than with n=4.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

from guard.calibration import calibrate
from guard.roc import roc_auc, tpr_at_fpr
from guard.scoring import AdaptiveScorer, DecisionLimits, Scorer


def _best_of(repeats: int, run: Any) -> tuple[Any, float]:
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        best = min(best, time.perf_counter() - started)
    return result, best


def compare_sampling(
    pipe: Any,
    mem: Sequence[str],
    nmem: Sequence[str],
    calib: Sequence[str],
    *,
    max_samples: int = 4,
    fprs: Sequence[float] = (0.01, 0.03),
    quantiles: Sequence[float] = (0.99,),
    repeats: int = 3,
    batch_size: int = 32,
    profile: Any = None,
) -> tuple[list[list[Any]], list[str]]:
    """The comparison table's rows and notes (see the module docstring)."""
    prompts = list(mem) + list(nmem)
    split = len(mem)
    notes = []
    fixed = {n: Scorer(pipe, samples=n, batch_size=batch_size, profile=profile) for n in (1, max_samples)}
    adaptive = AdaptiveScorer(pipe, max_samples=max_samples, batch_size=batch_size, profile=profile)
    profiles = {}
    for name, scorer in ((1, fixed[1]), (max_samples, fixed[max_samples]), ("adaptive", adaptive)):
        started = time.perf_counter()
        profiles[name] = calibrate(scorer, list(calib), source="calib", progress=False)
        notes.append(f"calibration {name}: {profiles[name].id} on {len(calib)} captions, "
                     f"{time.perf_counter() - started:.1f} s")
    spread = profiles["adaptive"].spread
    reference = profiles[max_samples]

    def at_thresholds(scores: list[float], profile_: Any) -> tuple[list[float], list[list[bool]]]:
        thresholds = [profile_.threshold_at_fpr(f) for f in fprs]
        return thresholds, [[s > t for t in thresholds] for s in scores]

    results: dict[Any, tuple[list[Any], float]] = {}
    for n, scorer in fixed.items():
        scorer.score(prompts[:2])  # warm: the unconditional cache and lazy initialisation are not timed
        results[n] = _best_of(repeats, lambda scorer=scorer: scorer.score(prompts))
    adaptive.score(prompts[:2])
    for q in quantiles:
        thresholds = tuple(profiles["adaptive"].threshold_at_fpr(f) for f in fprs)
        limits = DecisionLimits({"score": thresholds}, spread.bands(q), source=f"q={q}")
        results[("adaptive", q)] = _best_of(repeats, lambda limits=limits: adaptive.score(prompts, limits=limits))
        notes.append(f"adaptive q={q:g}: score thresholds {', '.join(f'{t:.4f}' for t in thresholds)}; bands "
                     + ", ".join(f"k={k}: {spread.band('score', k, q):.4f}" for k in spread.stages))

    _, truth = at_thresholds([r.score for r in results[max_samples][0]], reference)
    rows = []
    for key, (scored, seconds) in results.items():
        values = [r.score for r in scored]
        mode_profile = profiles["adaptive"] if isinstance(key, tuple) else profiles[key]
        thresholds, sides = at_thresholds(values, mode_profile)
        differ = sum(a != b for got, want in zip(sides, truth) for a, b in zip(got, want))
        first = thresholds[0]
        used = [r.samples for r in scored]
        label = f"adaptive (max {max_samples}, band q={key[1]:g})" if isinstance(key, tuple) else f"n={key}"
        rows.append([
            label,
            roc_auc(values[:split], values[split:]),
            tpr_at_fpr(values[:split], values[split:], 0.01),
            tpr_at_fpr(values[:split], values[split:], 0.03),
            statistics.mean(used),
            f"{statistics.mean(used[:split]):.2f} / {statistics.mean(used[split:]):.2f}",
            1000 * seconds / len(prompts),
            sum(v > first for v in values[split:]) / max(1, len(values) - split),
            sum(v > first for v in values[:split]) / max(1, split),
            differ,
        ])
    return rows, notes


HEADERS = ["mode", "AUROC", "TPR@1%FPR", "TPR@3%FPR", "draws / prompt", "draws mem / nmem", "ms / prompt",
           "held-out FPR @cal 1%", "TPR @cal 1%", "sides differing from n=4"]
