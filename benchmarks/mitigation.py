"""Does ``rewrite`` stop the copy? Measured on a memorizing model against its own training latents.

Why: a rewrite is only worth shipping if the image it releases is not the training image, and "the score
target was met" is not that. For every memorized caption and seed this benchmark runs (50-step generations,
guidance 7.5, latents compared with the caption's own training latent; a **copy** is above the
unseen-caption level, the mean + 2.5 std of unseen captions' cosine to their nearest training latent):

* no guard;
* each rung of the ladder alone, its image always released (``verify: max_similarity 1.0``), with the
  run-time signals memguard could verify with: ``probe_similarity`` (the image's cosine to probe generations
  of the original prompt), ``score_at_input`` (the score at the rung's own input) and ``guidance_norm`` (the
  guidance norm over the first 30% of the actual trajectory): their AUROC for copy vs escaped;
* the shipped policy (``--policy strict``) with the model's calibration (score and verification): which
  prompts were released (rewritten and verified) or blocked, and the released images' cosine;
* costs, as multiples of one plain generation of one image;
* unseen captions rewritten anyway through the same ladder: how many are released and how much their image
  changes (cosine to the unrewritten image from the same seed).

    python benchmarks/mitigation.py --model benchmarks/memorizer/models/eps-strong
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import load, setup, table  # noqa: E402
from memorizers import Sampler, cosine_rows, data_for, unseen_level  # noqa: E402

from guard import Guard, MemorizationBlocked  # noqa: E402
from guard.calibration import CalibrationProfile  # noqa: E402
from guard.policy import load_policy  # noqa: E402
from guard.roc import roc_auc  # noqa: E402
from guard.scoring import Scorer  # noqa: E402

RUNGS = ("guidance_schedule", "prompt_embedding", "initial_noise", "combined")
SIGNALS = ("probe_similarity", "score_at_input", "guidance_norm")


class GuidanceNorm:
    """Mean ||e_c - e_u|| over the first ``share`` of the steps of single-image guided generations."""

    def __init__(self, denoiser: torch.nn.Module, share: float = 0.3) -> None:
        self.values: list[float] = []
        self.share = share
        self.handle = denoiser.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        if isinstance(tensor, torch.Tensor) and tensor.shape[0] == 2:
            self.values.append(float((tensor[1] - tensor[0]).detach().float().flatten().norm()))

    def take(self, steps: int) -> float:
        early = self.values[: max(1, int(self.share * steps))]
        self.values = []
        return sum(early) / len(early) if early else float("nan")


def model_calibration(model: Path, scorer: Scorer, data, work: Path, verification: int) -> CalibrationProfile:
    """The model's own calibration (with verification values), else one made here from its calib captions."""
    shipped = model / "calibration.json"
    if shipped.exists():
        profile = CalibrationProfile.load(shipped)
        if profile.verification is not None and profile.verification.unrelated is not None:
            return profile
    from click.testing import CliRunner

    from guard.cli import main

    prompts = work / "calib.txt"
    prompts.write_text("\n".join(data.calib_captions) + "\n")
    out = work / "calibration.json"
    result = CliRunner().invoke(main, ["calibrate", "--model", str(model), "--nmem", str(prompts), "--out", str(out),
                                       "--verification", str(verification), "--no-progress", "--device", "cpu"])
    if result.exit_code != 0:
        raise SystemExit(result.output)
    return CalibrationProfile.load(out)


def only(rung: str, target: float, args: argparse.Namespace) -> dict:
    return {"name": f"only-{rung}", "calibration": "off", "rules": [{
        "when": {"score": {"gte": -1e9}}, "action": "rewrite",
        "rewrite": {"ladder": [rung], "target": {"score": target}, "max_steps": args.max_steps, "lr": args.lr,
                    "verify": {"max_similarity": 1.0}, "fallback": "allow"}}]}


def forced(policy_name: str) -> dict:
    """The shipped policy with its rewrite rule applied to every prompt (for unseen captions)."""
    policy = load_policy(policy_name).model_dump(mode="json")
    rewrite = next(rule for rule in policy["rules"] if rule["action"] == "rewrite")
    rewrite["when"] = {"score": {"gte": -1e9}}
    policy["rules"] = [rewrite]
    policy["name"] = f"{policy_name}-forced"
    return policy


def cost_account(rows: list[dict], plain_cost: float, policy: str) -> str:
    """Per outcome (released, blocked): prompts, the generations the guard recorded spending (probes, candidates,
    optimisation and scoring passes at their share) and the wall time, both per prompt in plain generations."""
    body = []
    for label, group in (("released", [r for r in rows if r["released"]]),
                         ("blocked", [r for r in rows if not r["released"]])):
        counted = [r["generations"] for r in group if r.get("generations") is not None]
        body.append([label, len(group), round(statistics.mean(counted), 2) if counted else "-",
                     round(statistics.mean(r["seconds"] for r in group) / plain_cost, 2) if group else "-"])
    return table([f"{policy}: outcome", "prompts", "generations recorded, mean", "wall time (x one generation), mean"],
                 body)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--policy", default="strict")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--mem-limit", type=int, default=None)
    p.add_argument("--rungs-per-level", type=int, default=None,
                   help="run the rungs alone on only the first N captions of each duplication level (cost); "
                        "no guard and the policy always run on every caption")
    p.add_argument("--unseen", type=int, default=200, help="unseen captions for the unseen-caption level")
    p.add_argument("--unseen-rewrite", type=int, default=20, help="unseen captions rewritten anyway")
    p.add_argument("--verification", type=int, default=64, help="prompts of a verification calibration made here")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--max-steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    setup(args.threads)
    work = Path(tempfile.mkdtemp(prefix="memguard-mitigation-"))

    data = data_for(args.model)
    pipe = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    scorer = Scorer(pipe)
    sample = Sampler(pipe, scorer, args.steps, args.guidance)
    call = {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "output_type": "latent"}
    level = unseen_level(sample, data, args.unseen)
    print(level.describe(), flush=True)
    calibration = model_calibration(args.model, scorer, data, work, args.verification)
    target = calibration.threshold_at_fpr(0.5)
    print(f"calibration {calibration.id}: {calibration.n_prompts} prompts; verification on "
          f"{len(calibration.verification.nearest)} prompts, threshold at FPR 0.01 "
          f"{calibration.verification.threshold_at_fpr(0.01):.4f} (unrelated), "
          f"{calibration.verification.threshold_at_fpr(0.01, 'nearest'):.4f} (nearest), "
          f"{calibration.verification.threshold_at_fpr(0.01, 'same'):.4f} (same)", flush=True)

    mem = list(zip(data.mem_captions, data.mem_levels, data.mem_latent_index))[: args.mem_limit]
    meter = GuidanceNorm(scorer.adapter.denoiser)
    rows: list[dict] = []
    guards = {rung: Guard(pipe, only(rung, target, args), audit_path=work / f"{rung}.jsonl") for rung in RUNGS}
    shipped = Guard(pipe, args.policy, calibration=calibration, audit_path=work / f"{args.policy}.jsonl")
    plain_seconds: list[float] = []
    seen_per_level: dict[int, int] = defaultdict(int)
    for caption, copies, latent_index in mem:
        truth = data.train_latents[latent_index][None]
        seen_per_level[copies] += 1
        with_rungs = args.rungs_per_level is None or seen_per_level[copies] <= args.rungs_per_level
        for seed in range(args.seeds):
            started = time.perf_counter()
            plain = pipe(caption, generator=torch.Generator().manual_seed(seed), **call).images
            plain_seconds.append(time.perf_counter() - started)
            meter.take(args.steps)
            rows.append({"variant": "none", "copies": copies, "seed": seed, "caption": caption,
                         "cos": float(cosine_rows(plain, truth)[0]), "released": True, "seconds": plain_seconds[-1]})
            for rung, guard in (guards.items() if with_rungs else ()):
                started = time.perf_counter()
                out = guard(prompt=caption, generator=torch.Generator().manual_seed(seed), **call)
                seconds = time.perf_counter() - started
                ladder = out.memguard.mitigations[0]
                last = ladder.rungs[-1]
                scores = [m.score_after for m in last.optimisations]
                rows.append({
                    "variant": rung, "copies": copies, "seed": seed, "caption": caption, "released": True,
                    "cos": float(cosine_rows(out.images, truth)[0]), "seconds": seconds,
                    "probe_similarity": max(last.similarity) if last.similarity else None,
                    "score_at_input": scores[-1] if scores else out.memguard.decisions[0].score.score,
                    "guidance_norm": meter.take(args.steps),
                })
            started = time.perf_counter()
            try:
                out = shipped(prompt=caption, generator=torch.Generator().manual_seed(seed), **call)
                report, released = out.memguard, True
                cos = float(cosine_rows(out.images, truth)[0])
            except MemorizationBlocked as blocked:
                report, released, cos = blocked.report, False, None
            meter.take(args.steps)
            ladder = report.mitigations.get(0)
            rows.append({"variant": args.policy, "copies": copies, "seed": seed, "caption": caption, "cos": cos,
                         "released": released, "seconds": time.perf_counter() - started,
                         "action": report.decisions[0].action, "rule": report.decisions[0].rule,
                         "rung": None if ladder is None else ladder.released,
                         "generations": 1.0 if ladder is None else round(ladder.generations, 3),
                         "rungs": [] if ladder is None else [r.rung for r in ladder.rungs if r.ran]})
        print(f"  {caption[:40]!r} ({copies} copies) done", flush=True)
    meter.handle.remove()
    plain_cost = statistics.median(plain_seconds)

    lines = {"level": level.level}
    copy_level = level.level
    by_variant = defaultdict(list)
    for row in rows:
        by_variant[row["variant"]].append(row)
    headers = ["variant", "duplicates", "n", "cos to training latent, mean", "max", "copies (> level)",
               "released", "cost (x one generation)"]
    body = []
    for variant in ("none", *RUNGS, args.policy):
        if not by_variant[variant]:
            continue
        for copies in sorted({r["copies"] for r in by_variant[variant]}) + ["all"]:
            group = [r for r in by_variant[variant] if copies == "all" or r["copies"] == copies]
            released = [r for r in group if r["released"]]
            coses = [r["cos"] for r in released]
            body.append([variant, copies, len(group), round(statistics.mean(coses), 3) if coses else "-",
                         round(max(coses), 3) if coses else "-",
                         f"{sum(c > copy_level for c in coses)}/{len(released)}",
                         f"{len(released)}/{len(group)}",
                         round(statistics.median(r["seconds"] for r in group) / plain_cost, 2)])
    print(f"\nunseen-caption level {copy_level:.3f}; plain generation {plain_cost:.3f} s")
    print(table(headers, body))
    rungs_used = defaultdict(int)
    for row in by_variant[args.policy]:
        rungs_used[row["rung"] or f"fell back ({row['action']})"] += 1
    print("\n" + table([f"{args.policy}: released by", "prompts"], [[k, v] for k, v in rungs_used.items()]))
    print("\n" + cost_account(by_variant[args.policy], plain_cost, args.policy))

    rewritten = [r for v in RUNGS for r in by_variant[v]]
    signal_rows = []
    for name in SIGNALS:
        pos = [r[name] for r in rewritten if r["cos"] > copy_level and r[name] is not None]
        neg = [r[name] for r in rewritten if r["cos"] <= copy_level and r[name] is not None]
        signal_rows.append([name, len(pos), len(neg), round(roc_auc(pos, neg), 3) if pos and neg else "n/a"])
    print("\n" + table(["signal", "copies", "escaped", "AUROC copy vs escaped"], signal_rows))
    verification = calibration.verification
    verdicts = []
    for against in ("unrelated", "nearest", "same"):
        threshold = verification.threshold_at_fpr(0.01, against)
        passed = [r for r in rewritten if r["probe_similarity"] is not None and r["probe_similarity"] <= threshold]
        escaped = sum(r["cos"] <= copy_level for r in rewritten)
        verdicts.append([against, round(threshold, 4), sum(r["cos"] > copy_level for r in passed),
                         f"{sum(r['cos'] <= copy_level for r in passed)}/{escaped}"])
    print("\n" + table(["verification null", "threshold (FPR 1%)", "copies that would pass (must be 0)",
                        "escaped that pass"], verdicts))

    if args.unseen_rewrite:
        policy = forced(args.policy)
        guard = Guard(pipe, policy, calibration=calibration, audit_path=work / "unseen.jsonl")
        changes, released, by = [], 0, defaultdict(int)
        for i, caption in enumerate(data.nmem_captions[: args.unseen_rewrite]):
            plain = pipe(caption, generator=torch.Generator().manual_seed(i), **call).images
            try:
                out = guard(prompt=caption, generator=torch.Generator().manual_seed(i), **call)
            except MemorizationBlocked as blocked:
                by[f"fell back ({blocked.decisions[0].action})"] += 1
                continue
            released += 1
            by[out.memguard.mitigations[0].released] += 1
            changes.append(float(cosine_rows(out.images, plain)[0]))
        print(f"\nunseen captions rewritten anyway ({args.policy}'s ladder forced): released {released}/"
              f"{args.unseen_rewrite}; cos of the released image to the unrewritten one: mean "
              f"{statistics.mean(changes) if changes else float('nan'):.3f}; released by {dict(by)}")
        lines["unseen_rewrite"] = {"released": released, "changes": changes, "by": dict(by)}
    if args.json:
        args.json.write_text(json.dumps({**lines, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
