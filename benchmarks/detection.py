"""Detection quality of memguard's score vs the baselines, with each method's time per prompt.

    python benchmarks/detection.py --model guard/assets/memorizer \
        --mem benchmarks/memorizer/prompts/mem.txt --nmem benchmarks/memorizer/prompts/nmem.txt \
        --levels benchmarks/memorizer/prompts/mem_levels.tsv

Any pipeline memguard scores works (it is loaded with ``guard.loading.load_pipeline``, i.e.
``DiffusionPipeline.from_pretrained``): SD 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1, PixArt. Reported per noise-sample
count: the score with the model family's profile (or ``--profile``), its two terms alone, the score with weights
fitted by ``guard.calibration.fit_weights`` (in-sample, and on held-out folds), and the baselines. The first-step
norm (Wen et al.) is the guidance norm at the first step in the score's space: for rectified-flow models the
velocity-guidance norm at s = sigmas[0]; it is the score's ``norm`` term, computed the way the reference runs it.

With ``--calib FILE`` (ordinary captions, disjoint from ``--nmem``) it also compares n=1, n=4 and adaptive sampling
in the same run (``sampling.py``): each mode calibrated on FILE, then AUROC, TPR@1%/3%FPR, draws and wall time per
prompt, and the decisions at the calibrated thresholds. ``--no-baselines`` skips the baseline detectors.

TPR@x%FPR is the highest TPR among ROC points with FPR <= x (docs/scoring.md, "Metrics").
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from baselines import first_step_norms, sharpness_scores
from common import MEMORIZER_PROMPTS, SHIPPED_MODEL, load, prompts_from, setup, table, timed
from sampling import HEADERS, compare_sampling

from guard.calibration import Features, fit_weights
from guard.roc import roc_auc, tpr_at_fpr
from guard.scoring import ModelProfile, Scorer


def metrics(positives: list[float], negatives: list[float]) -> list[float]:
    return [
        roc_auc(positives, negatives),
        tpr_at_fpr(positives, negatives, 0.01),
        tpr_at_fpr(positives, negatives, 0.03),
    ]


def read_levels(path: str) -> dict[str, int]:
    """Caption -> number of training copies, from a TSV whose header names ``caption`` and ``duplicates``
    (other columns, such as the strong regime's ``triggers``, are ignored)."""
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        caption_at, duplicates_at = header.index("caption"), header.index("duplicates")
        levels = {}
        for line in handle:
            fields = line.rstrip("\n").split("\t")
            if len(fields) > max(caption_at, duplicates_at):
                levels[fields[caption_at]] = int(fields[duplicates_at])
    return levels


def _fitted_metrics(report, which: str) -> list[float]:
    values = report.held_out.get("fitted") if which == "held-out" else report.in_sample["fitted"]
    if not values:
        return [float("nan")] * 3
    return [values["auroc"], values["tpr@0.01"], values["tpr@0.03"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL))
    parser.add_argument("--mem", default=str(MEMORIZER_PROMPTS / "mem.txt"))
    parser.add_argument("--nmem", default=str(MEMORIZER_PROMPTS / "nmem.txt"))
    parser.add_argument("--levels", default=None, help="TSV with caption and duplicates columns, for per-level results")
    parser.add_argument("--samples", default="1,4", help="comma-separated noise sample counts")
    parser.add_argument("--profile", default=None, help="score weights by profile name (default: the model family's)")
    parser.add_argument("--folds", type=int, default=5, help="held-out folds of the weight fit")
    parser.add_argument("--no-sharpness", action="store_true", help="skip the (slow) Hessian-sharpness baseline")
    parser.add_argument("--json", default=None, help="also write every prompt's norm and cos here, per sample count")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each file")
    parser.add_argument("--calib", default=None, help="ordinary captions: also compare n=1, n=4 and adaptive sampling")
    parser.add_argument("--max-samples", type=int, default=4, help="adaptive sampling's most draws per prompt")
    parser.add_argument("--band-quantiles", default="0.99", help="comma-separated band quantiles of adaptive sampling")
    parser.add_argument("--no-baselines", action="store_true", help="only the score (no first-step norm, sharpness)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)

    pipe = load(args.model, args.device)
    mem, nmem = prompts_from(args.mem, args.limit), prompts_from(args.nmem, args.limit)
    prompts = mem + nmem
    levels = read_levels(args.levels) if args.levels else {}
    print(f"model {args.model} ({type(pipe).__name__}): {len(mem)} memorized vs {len(nmem)} non-memorized prompts, "
          f"{args.threads} threads\n")
    rows, level_rows, fits, dump = [], [], [], {}
    for samples in [int(s) for s in args.samples.split(",")]:
        scorer = Scorer(pipe, samples=samples, batch_size=32, profile=args.profile)
        scorer.score(prompts[:2])  # warm-up: caches and lazy initialisation are not what we time
        results, seconds = timed(lambda scorer=scorer: scorer.score(prompts), args.device)
        per_prompt_ms = 1000 * seconds / len(prompts)
        split = len(mem)
        norms, coses = [r.norm for r in results], [r.cos for r in results]
        profile = scorer.profile
        report = fit_weights(Features(norms[:split], coses[:split]), Features(norms[split:], coses[split:]),
                             (profile.g_norm, profile.g_cos), folds=args.folds, seed=scorer.seed)
        fitted = ModelProfile("fitted", *report.fitted)
        fits.append(f"n={samples}: memguard norm+cos = profile {profile.name} (g_norm={profile.g_norm:g}, "
                    f"g_cos={profile.g_cos:g}); fitted g_norm={report.fitted[0]:g}, g_cos={report.fitted[1]:g}: "
                    f"{report.why}")
        detectors = {
            "memguard norm+cos": [r.score for r in results],
            "norm alone": norms,
            "cos alone": coses,
            f"norm+cos, fitted ({report.fitted[0]:g}, {report.fitted[1]:g})": [
                fitted.combine(n, c) for n, c in zip(norms, coses)
            ],
        }
        for name, values in detectors.items():
            rows.append([name, samples, *metrics(values[:split], values[split:]), per_prompt_ms])
        rows.append([f"  fitted, {report.folds}-fold held-out (reference weights: "
                     f"{report.held_out.get('reference', {}).get('auroc', float('nan')):.3f} AUROC)", samples,
                     *_fitted_metrics(report, "held-out"), per_prompt_ms])
        if not args.no_baselines:
            baseline, seconds = timed(lambda scorer=scorer: first_step_norms(scorer, prompts), args.device)
            rows.append(["first-step norm (Wen et al.)", samples, *metrics(baseline[:split], baseline[split:]),
                         1000 * seconds / len(prompts)])
        if not (args.no_sharpness or args.no_baselines):
            sharp, seconds = timed(lambda scorer=scorer: sharpness_scores(scorer, prompts), args.device)
            rows.append(["Hessian sharpness (Jeon et al.)", samples, *metrics(sharp[:split], sharp[split:]),
                         1000 * seconds / len(prompts)])
        if levels:
            by_level: dict[int, list[int]] = defaultdict(list)
            for index, prompt in enumerate(mem):
                by_level[levels.get(prompt, -1)].append(index)
            for level in sorted(by_level):
                members = by_level[level]
                for name, values in detectors.items():
                    level_rows.append([level, samples, len(members), name,
                                       *metrics([values[i] for i in members], values[split:])])
        dump[samples] = {
            "profile": [profile.name, profile.g_norm, profile.g_cos], "fit": report.to_dict(),
            "mem": [{"prompt": p, "norm": n, "cos": c, "duplicates": levels.get(p)}
                    for p, n, c in zip(mem, norms[:split], coses[:split])],
            "nmem": [{"prompt": p, "norm": n, "cos": c} for p, n, c in zip(nmem, norms[split:], coses[split:])],
        }
    print(table(["method", "n", "AUROC", "TPR@1%FPR", "TPR@3%FPR", "ms / prompt"], rows))
    print("\n" + "\n".join(fits))
    if level_rows:
        print("\nby duplication level (vs all non-memorized prompts):\n")
        print(table(["duplicates", "n", "prompts", "method", "AUROC", "TPR@1%FPR", "TPR@3%FPR"], level_rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"model": args.model, "pipeline": type(pipe).__name__, "samples": dump}, handle, indent=1)
        print(f"\nper-prompt measurements -> {args.json}")
    if args.calib:
        calib = prompts_from(args.calib)
        quantiles = [float(q) for q in args.band_quantiles.split(",")]
        sampling_rows, notes = compare_sampling(pipe, mem, nmem, calib, max_samples=args.max_samples,
                                                quantiles=quantiles)
        print(f"\nn=1, n={args.max_samples} and adaptive sampling (calibrated on {len(calib)} captions of "
              f"{args.calib}; policy thresholds above_fpr 0.01 and 0.03; fastest of 3 timed runs):\n")
        print(table(HEADERS, sampling_rows))
        print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
