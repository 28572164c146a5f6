"""Which attribution method finds the words that carry memorization? Trigger-word captions as ground truth.

    python benchmarks/explain.py --model benchmarks/memorizer/models/eps-strong \
        --levels benchmarks/memorizer/prompts/strong/mem_levels.tsv --png docs/explain_example.png

The strong memorizers (``benchmarks/memorizer/data.py``, regime ``strong``) were trained on 30 captions duplicated
100-200 times, each an ordinary caption with an invented trigger word pair inserted (``triggers`` column of
``mem_levels.tsv``); the trigger words occur in no other caption, so they are what singles the caption out. For each
memorized caption and method (``occlusion``, ``gradient``; on ``--samples`` draws, 1 as most adaptive decisions):

- **top-1 hit**: the highest-weighted word is a trigger word (chance: 2 / number of words);
- **top-2 precision**: the share of trigger words among the two highest-weighted (chance: the same);
- **trigger rank**: rank of the best-ranked trigger word (1 = top);
- **deletion**: the score drop when the method's top-2 words are deleted (re-encoded, re-scored), against the mean
  drop over random pairs of words of the same caption (a faithfulness check that needs no ground truth);
- time per prompt.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from pathlib import Path

from common import load, setup, table

from guard.scoring import Scorer, explain_prompt, prompt_words
from guard.scoring.explain import without_word


def read_triggers(path: str) -> list[tuple[str, int, list[str]]]:
    """``(caption, duplicates, trigger words)`` per row of a TSV with ``caption``, ``duplicates``, ``triggers``."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        header = handle.readline().rstrip("\n").split("\t")
        at = {name: header.index(name) for name in ("caption", "duplicates", "triggers")}
        for line in handle:
            fields = line.rstrip("\n").split("\t")
            rows.append((fields[at["caption"]], int(fields[at["duplicates"]]), fields[at["triggers"]].split()))
    return rows


def without_words(prompt: str, spans: list[tuple[int, int]]) -> str:
    for span in sorted(spans, reverse=True):
        prompt = without_word(prompt, span)
    return prompt


def evaluate(scorer: Scorer, rows: list[tuple[str, int, list[str]]], method: str, samples: int, seed: int = 0
             ) -> dict[str, float]:
    rng = random.Random(seed)
    top1, top2, ranks, chance, drop_top, drop_random, seconds = [], [], [], [], [], [], []
    for caption, _, triggers in rows:
        started = time.perf_counter()
        explanation = explain_prompt(scorer, caption, method=method, samples=samples)
        seconds.append(time.perf_counter() - started)
        words = [caption[s:e] for s, e in prompt_words(caption)]
        is_trigger = [w in triggers for w in words]
        order = [w.index for w in explanation.top(len(words))]
        top1.append(float(is_trigger[order[0]]))
        top2.append(sum(is_trigger[i] for i in order[:2]) / 2)
        ranks.append(1 + min(order.index(i) for i, hit in enumerate(is_trigger) if hit))
        chance.append(sum(is_trigger) / len(words))
        spans = prompt_words(caption)
        pairs = list(itertools.combinations(range(len(words)), 2))
        sample = rng.sample(pairs, min(10, len(pairs)))
        variants = [without_words(caption, [spans[i] for i in order[:2]])]
        variants += [without_words(caption, [spans[i], spans[j]]) for i, j in sample]
        scores = [r.score for r in scorer.score(variants)]
        base = explanation.score
        drop_top.append(base - scores[0])
        drop_random.append(base - statistics.mean(scores[1:]))
    return {"top1": statistics.mean(top1), "top2": statistics.mean(top2), "rank": statistics.mean(ranks),
            "chance": statistics.mean(chance), "drop_top2": statistics.mean(drop_top),
            "drop_random2": statistics.mean(drop_random), "ms": 1000 * statistics.mean(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--levels", required=True, help="TSV with caption, duplicates and triggers columns")
    parser.add_argument("--methods", default="occlusion,gradient")
    parser.add_argument("--samples", type=int, default=1, help="noise draws the explained score is measured on")
    parser.add_argument("--png", default=None, help="render the first caption's explanation (default method) here")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    pipe = load(args.model)
    scorer = Scorer(pipe, samples=args.samples)
    rows = read_triggers(args.levels)
    methods = args.methods.split(",")
    print(f"model {args.model} ({type(pipe).__name__}): {len(rows)} memorized captions with trigger words, "
          f"{args.samples} draw(s), {args.threads} threads\n")
    results, table_rows = {}, []
    for method in methods:
        result = evaluate(scorer, rows, method, args.samples)
        results[method] = result
        table_rows.append([method, result["top1"], result["top2"], result["chance"], result["rank"],
                           result["drop_top2"], result["drop_random2"], result["ms"]])
    print(table(["method", "top-1 is a trigger", "top-2 precision", "chance", "mean trigger rank",
                 "score drop, top-2 deleted", "score drop, 2 random deleted", "ms / prompt"], table_rows))
    if args.png:
        from guard.cli.explain import render_png

        caption, duplicates, triggers = rows[0]
        explanation = explain_prompt(scorer, caption, method=methods[0], samples=args.samples)
        render_png(explanation, caption, args.png,
                   title=f"{methods[0]} attribution, {Path(args.model).name}: a caption seen {duplicates} times "
                         f"(triggers: {' '.join(triggers)}), score {explanation.score:.3f}")
        print(f"\npng -> {args.png}: {explanation.describe(3)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "samples": args.samples, "results": results},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
