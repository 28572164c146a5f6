"""Detection quality of memguard's score vs the baselines, with each method's time per prompt.

    python benchmarks/detection.py --model guard/assets/memorizer \
        --mem benchmarks/memorizer/prompts/mem.txt --nmem benchmarks/memorizer/prompts/nmem.txt \
        --levels benchmarks/memorizer/prompts/mem_levels.tsv

TPR@x%FPR is the highest TPR among ROC points with FPR <= x (docs/scoring.md, "Metrics").
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from baselines import first_step_norms, sharpness_scores
from common import MEMORIZER_PROMPTS, SHIPPED_MODEL, load, prompts_from, setup, table, timed

from guard.metrics import roc_auc, tpr_at_fpr
from guard.scoring import Scorer


def metrics(positives: list[float], negatives: list[float]) -> list[float]:
    return [
        roc_auc(positives, negatives),
        tpr_at_fpr(positives, negatives, 0.01),
        tpr_at_fpr(positives, negatives, 0.03),
    ]


def read_levels(path: str) -> dict[str, int]:
    levels = {}
    with open(path, encoding="utf-8") as handle:
        next(handle)
        for line in handle:
            caption, level = line.rstrip("\n").rsplit("\t", 1)
            levels[caption] = int(level)
    return levels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL))
    parser.add_argument("--mem", default=str(MEMORIZER_PROMPTS / "mem.txt"))
    parser.add_argument("--nmem", default=str(MEMORIZER_PROMPTS / "nmem.txt"))
    parser.add_argument("--levels", default=None, help="TSV caption<TAB>duplicates, for per-level results")
    parser.add_argument("--samples", default="1,4", help="comma-separated noise sample counts")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts of each file")
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
        pipe.unet.set_default_attn_processor()
    print(table(["method", "n", "AUROC", "TPR@1%FPR", "TPR@3%FPR", "ms / prompt"], rows))
    if level_rows:
        print("\nmemguard norm+cos by duplication level (vs all non-memorized prompts):\n")
        print(table(["duplicates", "n", "prompts", "AUROC", "TPR@1%FPR", "TPR@3%FPR"], level_rows))


if __name__ == "__main__":
    main()
