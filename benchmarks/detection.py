"""Detection quality of memguard's score vs the baselines, with each method's time per prompt.

    python benchmarks/detection.py --model guard/assets/memorizer \
        --mem benchmarks/memorizer/prompts/mem.txt --nmem benchmarks/memorizer/prompts/nmem.txt \
        --levels benchmarks/memorizer/prompts/mem_levels.tsv

With ``--calib FILE`` (ordinary captions, disjoint from ``--nmem``) it also compares n=1, n=4 and adaptive sampling
in the same run (``sampling.py``): each mode calibrated on FILE, then AUROC, TPR@1%/3%FPR, draws and wall time per
prompt, and the decisions at the calibrated thresholds. ``--no-baselines`` skips the baseline detectors.

TPR@x%FPR is the highest TPR among ROC points with FPR <= x (docs/scoring.md, "Metrics").
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from baselines import first_step_norms, sharpness_scores
from common import MEMORIZER_PROMPTS, SHIPPED_MODEL, load, prompts_from, setup, table, timed
from sampling import HEADERS, compare_sampling

from guard.metrics import roc_auc, tpr_at_fpr
from guard.scoring import Scorer


def metrics(positives: list[float], negatives: list[float]) -> list[float]:
    return [
        roc_auc(positives, negatives),
        tpr_at_fpr(positives, negatives, 0.01),
        tpr_at_fpr(positives, negatives, 0.03),
    ]


def read_levels(path: str) -> dict[str, int]:
    """Caption -> number of training copies, from a TSV whose header names ``caption`` and ``duplicates`` (other
    columns, such as the strong regime's ``triggers``, are ignored)."""
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        caption_at, duplicates_at = header.index("caption"), header.index("duplicates")
        levels = {}
        for line in handle:
            fields = line.rstrip("\n").split("\t")
            if len(fields) > max(caption_at, duplicates_at):
                levels[fields[caption_at]] = int(fields[duplicates_at])
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL))
    parser.add_argument("--mem", default=str(MEMORIZER_PROMPTS / "mem.txt"))
    parser.add_argument("--nmem", default=str(MEMORIZER_PROMPTS / "nmem.txt"))
    parser.add_argument("--levels", default=None, help="TSV caption<TAB>duplicates, for per-level results")
    parser.add_argument("--samples", default="1,4", help="comma-separated noise sample counts")
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
    print(f"model {args.model}: {len(mem)} memorized vs {len(nmem)} non-memorized prompts, {args.threads} threads\n")
    rows, level_rows = [], []
    for samples in [int(s) for s in args.samples.split(",")]:
        scorer = Scorer(pipe, samples=samples, batch_size=32)
        scorer.score(prompts[:2])  # warm-up: caches and lazy initialisation are not what we time
        results, seconds = timed(lambda scorer=scorer: scorer.score(prompts), args.device)
        per_prompt_ms = 1000 * seconds / len(prompts)
        split = len(mem)
        for name, values in (
            ("memguard norm+cos", [r.score for r in results]),
            ("cos alone", [r.cos for r in results]),
        ):
            rows.append([name, samples, *metrics(values[:split], values[split:]), per_prompt_ms])
        if not args.no_baselines:
            norms, seconds = timed(lambda scorer=scorer: first_step_norms(scorer, prompts), args.device)
            rows.append(["first-step norm (Wen et al.)", samples, *metrics(norms[:split], norms[split:]),
                         1000 * seconds / len(prompts)])
            sharp, seconds = timed(lambda scorer=scorer: sharpness_scores(scorer, prompts), args.device)
            rows.append(["Hessian sharpness (Jeon et al.)", samples, *metrics(sharp[:split], sharp[split:]),
                         1000 * seconds / len(prompts)])
        if args.levels:
            levels = read_levels(args.levels)
            by_level = defaultdict(list)
            for prompt, result in zip(mem, results):
                by_level[levels.get(prompt, -1)].append(result.score)
            negatives = [r.score for r in results[split:]]
            for level in sorted(by_level):
                level_rows.append([level, samples, len(by_level[level]), *metrics(by_level[level], negatives)])
        if hasattr(pipe, "unet"):
            pipe.unet.set_default_attn_processor()
    print(table(["method", "n", "AUROC", "TPR@1%FPR", "TPR@3%FPR", "ms / prompt"], rows))
    if level_rows:
        print("\nmemguard norm+cos by duplication level (vs all non-memorized prompts):\n")
        print(table(["duplicates", "n", "prompts", "AUROC", "TPR@1%FPR", "TPR@3%FPR"], level_rows))
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
