"""Which rung frees which memorizer: guidance schedules, trigger-word edits and the shipped rungs, per prompt.

Why: the shipped ladder (``policies/strict.yaml``) frees every memorized prompt of the zoo's eps-strong,
v-strong and eps-partial, but none of a v-prediction memorizer with less duplication (``v-hard``). This script
measures, prompt by prompt and on one initial noise per (caption, seed), what each candidate input does:

* ``none``: the plain generation;
* guidance schedules ``g[S@U,...]`` (scale S until fraction U of the steps, then the call's own): the
  shipped ``-2@0.5``, longer / stronger opposite guidance, unconditional starts (``0@U``), mixtures;
* the shipped optimising rungs ``prompt_embedding``, ``initial_noise``, ``combined`` (with the policy's
  settings), ``pe-full`` (the prompt-embedding optimisation run for all ``max_steps``, no early stop) and
  ``pe-rel`` (its learning rate multiplied by the RMS of the prompt's embedding, BOS left out: steps of a
  fixed size relative to the conditioning's own scale), ``combined-rel`` (``combined`` on that embedding) and
  ``pe-rel+g`` (that embedding with the policy's guidance schedule, no noise search);
* trigger-word edits (``guard/actions/trigger_words.py``): occlusion attribution (``Guard.explain``) ranks
  the words; ``del1``/``del2`` delete the top 1/2 words, ``rep1``/``rep2`` replace them by the
  lowest-scoring word of the same kind (the data's vocabulary is the lexicon), ``rnd1`` by a random word of
  the same kind, ``iter`` replaces the top word, re-explains and repeats (at most 3 words) until the score is
  under the rewrite target; ``+g`` variants add a guidance schedule to an edit.

Every image is verified as the ladder verifies (``probe_similarity`` against 2 probes of the *original*
prompt, threshold at the strict policy's ``above_fpr`` of the model's verification calibration) and compared
with the truth (cosine to the caption's own training latent; a copy is above the unseen-caption level, as in
``benchmarks/mitigation.py``). Costs are in plain 50-step generations of one image: the process's CPU
seconds (``time.process_time``, one thread, so other jobs on a shared machine do not inflate them) divided by
those of one plain generation. The per-prompt records go to ``--json`` for
``benchmarks/ladder_simulation.py``.

    python benchmarks/rung_research.py --model benchmarks/memorizer/models/v-hard --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import load, setup, table  # noqa: E402
from memorizers import Sampler, cosine_rows, data_for, unseen_level  # noqa: E402

from guard import Guard  # noqa: E402
from guard.actions.generation import GenerationJob  # noqa: E402
from guard.actions.mitigation import mitigate_initial_noise, mitigate_prompt_embedding, noise_seed  # noqa: E402
from guard.actions.trigger_words import Edit, edits, ranked_spans, rewrite_triggers  # noqa: E402
from guard.actions.verification import probe_similarity, run_probes  # noqa: E402
from guard.calibration import CalibrationProfile  # noqa: E402
from guard.guard import PipelineGenerator  # noqa: E402
from guard.policy import GuidanceStage  # noqa: E402
from guard.scoring import TextConditioning  # noqa: E402

DEFAULT_SCHEDULES = ("g[-2@0.5]", "g[-2@0.7]", "g[-2@0.9]", "g[-7.5@0.5]", "g[0@0.5]", "g[0@0.7]", "g[0@0.9]",
                     "g[-2@0.3,0@0.7]", "g[-2@0.5,0@0.8]", "g[-4@0.7]")
DEFAULT_EDITS = ("del1", "del2", "rep1", "rep2", "rnd1", "iter", "rep1+g", "rep2+g", "iter+g")


def parse_schedule(text: str) -> tuple[GuidanceStage, ...]:
    """``"-2@0.3,0@0.7"`` (or ``"g[-2@0.3,0@0.7]"``, the variant's name) -> scale -2 until 0.3, then 0 until
    0.7 (then the call's own)."""
    text = text.removeprefix("g[").removesuffix("]")
    stages = []
    for part in text.split(","):
        scale, until = part.split("@")
        stages.append(GuidanceStage(until=float(until), scale=float(scale)))
    return tuple(stages)


def lexicon_of(data_module: Any) -> dict[str, list[str]]:
    """The memorizer data's vocabulary by kind: what 'a word of the same kind' means on these models."""
    d = data_module
    return {"color": list(d.COLORS), "object": list(d.OBJECTS), "objects": [o + "s" for o in d.OBJECTS],
            "place": list(d.BACKGROUNDS), "style": list(d.STYLES), "light": list(d.LIGHTS), "size": list(d.SIZES)}


class Lab:
    """One model, its data, calibration, strict guard (scorer, explain) and batched generations."""

    def __init__(self, model: Path, steps: int, guidance: float, unseen: int, fpr: float) -> None:
        import data as data_module  # benchmarks/memorizer/data.py (memorizers put it on the path)

        self.model = model
        self.data = data_for(model)
        self.lexicon = lexicon_of(data_module)
        self.pipe = load(model)
        self.pipe.set_progress_bar_config(disable=True)
        self.calibration = CalibrationProfile.load(model / "calibration.json")
        self.work = Path(tempfile.mkdtemp(prefix="memguard-research-"))
        self.guard = Guard(self.pipe, "strict", calibration=self.calibration, audit_path=self.work / "audit.jsonl")
        self.scorer = self.guard.scorer
        self.adapter = self.scorer.adapter
        rule = next(r for r in self.guard.policy.rules if r.action == "rewrite")
        self.settings = rule.rewrite
        self.verify = self.settings.verify
        self.fpr = fpr
        self.threshold = self.calibration.verification.threshold_at_fpr(fpr)
        self.target = self.calibration.threshold_at_fpr(0.5)
        self.flag = self.calibration.threshold_at_fpr(0.02)
        self.seed = self.guard.policy.scoring.noise_seed
        self.steps, self.guidance = steps, guidance
        self.shape = tuple(self.adapter.latent_shape)
        sample = Sampler(self.pipe, self.scorer, steps, guidance)
        self.level = unseen_level(sample, self.data, unseen).level if unseen else float("nan")
        self.plain_seconds = self._time_plain()
        self._content_words = data_module.content_words
        unseen_captions = self.data.nmem_captions[:30]
        noise = torch.stack([torch.randn(self.shape, generator=torch.Generator().manual_seed(3000 + i))
                             for i in range(len(unseen_captions))])
        plain = self.generate(self.scorer.encode(unseen_captions), noise)
        self.unseen_text = statistics.mean(
            float(cosine_rows(plain[i : i + 1], self.text_target(c)[None])[0]) for i, c in enumerate(unseen_captions))

    def text_target(self, caption: str) -> torch.Tensor | None:
        """The caption's text-determined latent (its known content words' patterns), None if it has none."""
        known = [self.data.word_patterns[w] for w in self._content_words(caption) if w in self.data.word_patterns]
        return torch.stack(known).sum(0) / len(known) ** 0.5 if known else None

    def _time_plain(self) -> float:
        cond = self.scorer.encode([self.data.nmem_captions[0]])
        noise = torch.randn((1, *self.shape), generator=torch.Generator().manual_seed(0))
        times = []
        for _ in range(3):
            started = time.process_time()
            self.generate(cond, noise)
            times.append(time.process_time() - started)
        return min(times)

    def generate(self, cond: TextConditioning, noise: torch.Tensor,
                 stages: Sequence[Sequence[GuidanceStage] | None] | None = None, steps: int | None = None,
                 chunk: int = 32) -> torch.Tensor:
        """Final latents of one image per row of ``cond`` from ``noise`` (one row each), per-row stages."""
        out = []
        for start in range(0, len(cond), chunk):
            rows = list(range(start, min(len(cond), start + chunk)))
            part = cond.select(rows)
            generation = PipelineGenerator(self.pipe, self.adapter, {"num_inference_steps": self.steps,
                                                                     "guidance_scale": self.guidance},
                                           len(rows), redact=False)
            guidance = {} if stages is None else {i: tuple(stages[r]) for i, r in enumerate(rows)
                                                  if stages[r] is not None}
            job = GenerationJob(cond=part, latents=noise[rows], images_per_prompt=1, guidance=guidance, steps=steps)
            out.append(generation(job).latents)
        return torch.cat(out)

    def probes(self, cond: TextConditioning) -> torch.Tensor:
        generation = PipelineGenerator(self.pipe, self.adapter, {"num_inference_steps": self.steps,
                                                                 "guidance_scale": self.guidance},
                                       len(cond), redact=False)
        return run_probes(generation, cond, self.verify, self.seed)

    def scores(self, prompts: Sequence[str]) -> list[float]:
        return [s.score for s in self.scorer.score(list(prompts))]


def _choose(lab: Lab, candidates: list[Edit]) -> tuple[Edit, float, int]:
    """The lowest-scoring edit (and its score, and how many were scored)."""
    scores = lab.scores([e.prompt for e in candidates])
    best = min(range(len(candidates)), key=lambda i: scores[i])
    return candidates[best], scores[best], len(candidates)


def trigger_edit(lab: Lab, prompt: str, name: str, rng: random.Random) -> dict[str, Any]:
    """One trigger-word edit of ``prompt``: the edited prompt, its score, and what it cost (score rows)."""
    base = name.split("+")[0]
    rows = 0
    if base == "iter":
        done = rewrite_triggers(prompt, explain=lambda p: lab.guard.explain(p, method="occlusion").words,
                                score=lab.scores, target=lab.target, lexicon=lab.lexicon, max_words=3)
        return {"prompt": done.prompt, "score": done.score, "score_rows": done.scored, "removed": list(done.removed),
                "inserted": list(done.inserted)}
    explanation = lab.guard.explain(prompt, method="occlusion")
    rows += len(explanation.words) + 1
    k = int(base[-1])
    spans = ranked_spans(explanation.words, k)
    if base.startswith("del"):
        candidates = edits(prompt, spans, mode="delete")
    else:
        candidates = edits(prompt, spans, lab.lexicon)
    if not candidates:
        return {"prompt": prompt, "score": lab.scores([prompt])[0], "score_rows": rows + 1, "removed": []}
    if base.startswith("rnd"):
        edit = rng.choice(candidates)
        score, n = lab.scores([edit.prompt])[0], 1
    else:
        edit, score, n = _choose(lab, candidates)
    return {"prompt": edit.prompt, "score": score, "score_rows": rows + n, "removed": list(edit.removed),
            "inserted": list(edit.inserted)}


def run(lab: Lab, args: argparse.Namespace) -> list[dict[str, Any]]:
    data = lab.data
    picks: list[tuple[str, int, int]] = []
    per_level: dict[int, int] = {}
    for caption, copies, index in zip(data.mem_captions, data.mem_levels, data.mem_latent_index, strict=True):
        per_level[copies] = per_level.get(copies, 0) + 1
        if args.per_level is None or per_level[copies] <= args.per_level:
            picks.append((caption, copies, index))
    records: list[dict[str, Any]] = []
    for caption, copies, index in picks:
        for seed in range(args.seeds):
            records.append({"caption": caption, "copies": copies, "latent": index, "seed": seed, "variants": {}})
    captions = [r["caption"] for r in records]
    cond = lab.scorer.encode(captions)
    noise = torch.stack([torch.randn(lab.shape, generator=torch.Generator().manual_seed(r["seed"]))
                         for r in records])
    truth = data.train_latents[[r["latent"] for r in records]]
    targets = [lab.text_target(c) for c in captions]
    started = time.process_time()
    probes = lab.probes(cond)
    probe_cost = (time.process_time() - started) / len(records) / lab.plain_seconds
    base_scores = lab.scores(captions)
    for r, score in zip(records, base_scores):
        r["score"] = score
        r["flagged"] = score > lab.flag
        r["probe_cost"] = probe_cost

    def record(name: str, latents: torch.Tensor, extra: list[dict[str, Any]] | None = None,
               cost: list[float] | float = 1.0) -> None:
        sims = [float(probe_similarity(latents[i : i + 1], probes[i])[0]) for i in range(len(records))]
        coses = cosine_rows(latents, truth).tolist()
        fidelity = [float(cosine_rows(latents[i : i + 1], t[None])[0]) if t is not None else float("nan")
                    for i, t in enumerate(targets)]
        for i, r in enumerate(records):
            entry = {"sim": round(sims[i], 4), "cos": round(coses[i], 4), "text": round(fidelity[i], 4),
                     "cost": round(cost[i] if isinstance(cost, list) else cost, 3)}
            if extra is not None:
                entry.update(extra[i])
            r["variants"][name] = entry
        print(f"  {name}: sim mean {statistics.mean(sims):.3f}, verified {sum(s <= lab.threshold for s in sims)}"
              f"/{len(sims)}, copies {sum(c > lab.level for c in coses)}", flush=True)

    record("none", lab.generate(cond, noise))
    for text in args.schedules:
        stages = parse_schedule(text)
        name = text if text.startswith("g[") else f"g[{text}]"
        record(name, lab.generate(cond, noise, [stages] * len(records)))

    shipped_stages = lab.settings.guidance
    wanted = set(args.rungs)
    if {"pe", "combined", "prompt_embedding+g"} & wanted:
        wanted.add("prompt_embedding")
    if {"combined-rel", "pe-rel+g"} & wanted:
        wanted.add("pe-rel")
    for name, target in (("prompt_embedding", lab.target), ("pe-full", -math.inf), ("pe-rel", lab.target)):
        if name in wanted:
            rows, costs, extra = [], [], []
            for i in range(len(records)):
                started = time.process_time()
                lr = lab.settings.lr
                if name == "pe-rel":  # Adam steps in units of the prompt's own embedding scale (RMS, BOS left out)
                    lr *= float(cond.embeds[i, 1:].float().pow(2).mean().sqrt())
                adapted = mitigate_prompt_embedding(lab.scorer, cond.select([i]), target=target,
                                                    max_steps=lab.settings.max_steps, lr=lr)
                costs.append(1.0 + (time.process_time() - started) / lab.plain_seconds)
                rows.append(adapted.cond)
                extra.append({"steps": adapted.steps, "score": round(adapted.score_after, 4), "met": adapted.met})
            adapted_cond = TextConditioning(torch.cat([c.embeds for c in rows]), None, None,
                                            [False] * len(rows))
            if name in args.rungs or name == "prompt_embedding" and "pe" in args.rungs:
                record(name, lab.generate(adapted_cond, noise), extra, costs)
            if f"{name}+g" in args.rungs:  # this embedding with the policy's guidance schedule, no noise search
                record(f"{name}+g", lab.generate(adapted_cond, noise, [shipped_stages] * len(records)), extra, costs)
            combined = {"prompt_embedding": "combined", "pe-rel": "combined-rel"}.get(name)
            if combined in args.rungs:  # the combined rung: this embedding, SAIL noise for it, the schedule
                moved, costs_c = [], []
                for i in range(len(records)):
                    started = time.process_time()
                    result = mitigate_initial_noise(lab.scorer, adapted_cond.select([i]), noise[i : i + 1],
                                                    target=lab.target, max_steps=lab.settings.max_steps,
                                                    lr=lab.settings.lr, seed=noise_seed(noise[i : i + 1]))
                    moved.append(result.latents)
                    costs_c.append(costs[i] + (time.process_time() - started) / lab.plain_seconds)
                record(combined, lab.generate(adapted_cond, torch.cat(moved).float(),
                                              [shipped_stages] * len(records)), None, costs_c)
    if "in" in args.rungs:
        moved, costs, steps = [], [], []
        for i in range(len(records)):
            started = time.process_time()
            result = mitigate_initial_noise(lab.scorer, cond.select([i]), noise[i : i + 1], target=lab.target,
                                            max_steps=lab.settings.max_steps, lr=lab.settings.lr,
                                            seed=noise_seed(noise[i : i + 1]))
            moved.append(result.latents)
            costs.append(1.0 + (time.process_time() - started) / lab.plain_seconds)
            steps.append({"steps": result.steps, "met": result.met})
        record("initial_noise", lab.generate(cond, torch.cat(moved).float()), steps, costs)

    rng = random.Random(0)
    edit_schedule = parse_schedule(args.edit_schedule)
    done: dict[str, dict[str, Any]] = {}
    for name in args.edits:
        base = name.split("+")[0]
        if base not in done:
            found = []
            for r in records:
                started = time.process_time()
                found.append(trigger_edit(lab, r["caption"], base, rng))
                found[-1]["seconds"] = time.process_time() - started
            done[base] = {"found": found}
        found = done[base]["found"]
        edited = lab.scorer.encode([f["prompt"] for f in found])
        stages = [edit_schedule] * len(records) if name.endswith("+g") else None
        costs = [1.0 + f["seconds"] / lab.plain_seconds for f in found]
        extra = [{"prompt": f["prompt"], "score": round(f["score"], 4), "removed": f["removed"],
                  "score_rows": f["score_rows"]} for f in found]
        record(name, lab.generate(edited, noise, stages), extra, costs)
    return records


def summarize(lab: Lab, records: list[dict[str, Any]]) -> str:
    names = list(records[0]["variants"])
    body = []
    for name in names:
        entries = [r["variants"][name] for r in records]
        sims = [e["sim"] for e in entries]
        released = [e for e in entries if e["sim"] <= lab.threshold]
        copies_released = sum(e["cos"] > lab.level for e in released)
        body.append([name, len(entries), round(statistics.mean(sims), 3), round(min(sims), 3), round(max(sims), 3),
                     f"{len(released)}/{len(entries)}", copies_released,
                     f"{sum(e['cos'] > lab.level for e in entries)}/{len(entries)}",
                     _mean(e["text"] for e in released), round(statistics.mean(e["cost"] for e in entries), 2)])
    return table(["input", "n", "probe sim mean", "min", "max", "verified", "copies among verified",
                  "copies (truth)", "text cos of verified", "cost (x generation)"], body)


def _mean(values: Any) -> float | str:
    values = [v for v in values if v == v]
    return round(statistics.mean(values), 3) if values else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--per-level", type=int, default=None, help="first N memorized captions per duplication level")
    p.add_argument("--schedules", nargs="*", default=list(DEFAULT_SCHEDULES), help='e.g. "g[-2@0.3,0@0.7]"')
    p.add_argument("--rungs", nargs="*", default=["pe", "pe-full", "pe-rel", "in", "combined", "combined-rel"],
                   help="optimising rungs to run: pe, pe-full, pe-rel, in, combined, combined-rel, and X+g for "
                        "prompt_embedding+g / pe-rel+g (the embedding with the guidance schedule)")
    p.add_argument("--edits", nargs="*", default=list(DEFAULT_EDITS))
    p.add_argument("--edit-schedule", default="g[-2@0.5]", help="the schedule of the +g edit variants")
    p.add_argument("--fpr", type=float, default=0.05, help="verification above_fpr (strict: 0.05)")
    p.add_argument("--unseen", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    p.add_argument("--append", type=Path, help="merge the variants measured now into this earlier --json output")
    args = p.parse_args()
    setup(args.threads)
    started = time.perf_counter()
    lab = Lab(args.model, args.steps, args.guidance, args.unseen, args.fpr)
    print(f"{args.model.name}: copy level {lab.level:.3f}, verification threshold {lab.threshold:.3f} "
          f"(above_fpr {args.fpr}), flag {lab.flag:.3f}, target {lab.target:.3f}, plain generation "
          f"{lab.plain_seconds:.3f} s; unseen captions' text cos {lab.unseen_text:.3f}", flush=True)
    records = run(lab, args)
    if args.append and args.append.exists():  # merge into an earlier run's records (same captions, seeds, noise)
        earlier = json.loads(args.append.read_text())
        by_key = {(r["caption"], r["seed"]): r for r in records}
        for r in earlier["records"]:
            new = by_key.get((r["caption"], r["seed"]))
            if new is not None:
                r["variants"].update({k: v for k, v in new["variants"].items() if k != "none"})
        records = earlier["records"]
    print(f"\n{args.model.name}: {len(records)} prompt-seeds, flagged {sum(r['flagged'] for r in records)}; "
          f"probes cost {records[0]['probe_cost']:.2f} generations per prompt; "
          f"{time.perf_counter() - started:.0f} s wall")
    print(summarize(lab, records))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": str(args.model), "level": lab.level, "threshold": lab.threshold, "fpr": args.fpr,
            "flag": lab.flag, "target": lab.target, "plain_seconds": lab.plain_seconds,
            "unseen_text": lab.unseen_text,
            "prediction_type": lab.adapter.prediction_type, "records": records}, indent=1))


if __name__ == "__main__":
    main()
