"""Evidence for the ``rewrite`` action: memorized prompts of the memorizing model stop reproducing their latent.

Why: a mitigation is only worth shipping if, on a model that really memorizes, it turns copies into new images
while leaving ordinary prompts alone. This runs real 50-step DDIM generations (CFG 7.5, latent output) and reports

* memorized prompts: cosine similarity of the generated latent to the prompt's own training latent without
  mitigation and through ``Guard`` with a rewrite rule for each method, with the score before/after and the share
  of prompts whose target was met;
* unseen prompts: how many the shipped policies would rewrite or block (with the model's calibration), and, when
  mitigation is forced for the full step budget, how much their output changes;
* the time each mitigation costs relative to one generation of one image.

    python benchmarks/mitigation.py --model guard/assets/memorizer \
        --mem benchmarks/memorizer/prompts/mem.txt --nmem benchmarks/memorizer/prompts/nmem.txt

``--model tiny`` runs the same code on a random-weight fixture pipeline (numbers meaningless; a smoke test).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks" / "memorizer"))

from data import build  # noqa: E402
from guard.calibrator import auto_calibration, calibrate  # noqa: E402

from guard import Guard  # noqa: E402
from guard.actions.mitigation import initial_latents, mitigate_initial_noise, mitigate_prompt_embedding  # noqa: E402
from guard.assets import shipped_calibration_path  # noqa: E402
from guard.policy import CalibrationProfile, decide, load_policy  # noqa: E402
from guard.scoring import Scorer  # noqa: E402

METHODS = ("prompt_embedding", "initial_noise")


def load_pipe(model: str):
    """The pipeline under test; ``tiny`` is a random-weight fixture at the memorizer's latent size."""
    if model == "tiny":
        from guard.testing import tiny_sd_pipeline

        return tiny_sd_pipeline(sample_size=16)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_prompts(path: Path, limit: int | None) -> list[str]:
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts[:limit] if limit else prompts


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of flattened latents."""
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)


def generate(pipe, prompt_or_embeds, seed: int, args: argparse.Namespace, **kwargs) -> torch.Tensor:
    """One image's latent, with the caller-style generator ``seed``."""
    if isinstance(prompt_or_embeds, str):
        kwargs["prompt"] = prompt_or_embeds
    else:
        kwargs["prompt_embeds"] = prompt_or_embeds
    out = pipe(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="latent",
        **kwargs,
    )
    return out.images.float().cpu()


def rewrite_guard(pipe, method: str, target: float, args: argparse.Namespace) -> Guard:
    """A guard that rewrites every prompt toward ``target`` (the strict policy's rewrite target, by default)."""
    policy = {
        "name": f"bench-{method}",
        "calibration": "off",
        "rules": [
            {
                "name": "rewrite-all",
                "when": {"score": {"gte": -1e9}},
                "action": "rewrite",
                "rewrite": {
                    "method": method,
                    "target": {"score": target},
                    "max_steps": args.max_steps,
                    "lr": args.lr,
                    "fallback": "warn",
                },
            }
        ],
        "default": "allow",
        "on_error": "block",
        "audit": {"path": str(args.audit_dir / f"{method}.jsonl"), "prompt": "hash"},
    }
    return Guard(pipe, policy, audit_path=args.audit_dir / f"{method}.jsonl")


def summary(values: list[float]) -> dict[str, float]:
    x = torch.tensor(values, dtype=torch.float64)
    return {
        "n": len(values),
        "mean": x.mean().item(),
        "median": x.median().item(),
        "min": x.min().item(),
        "max": x.max().item(),
        "share_ge_0.9": (x >= 0.9).double().mean().item(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "guard" / "assets" / "memorizer"), help="model dir, or 'tiny'")
    p.add_argument("--mem", type=Path, default=ROOT / "benchmarks" / "memorizer" / "prompts" / "mem.txt")
    p.add_argument("--nmem", type=Path, default=ROOT / "benchmarks" / "memorizer" / "prompts" / "nmem.txt")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--mem-limit", type=int, default=None, help="first N memorized prompts (default all)")
    p.add_argument("--nmem-limit", type=int, default=40, help="first N unseen prompts for forced mitigation")
    p.add_argument("--seeds", type=int, default=2, help="generator seeds per memorized prompt")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--target-fpr", type=float, default=0.05, help="rewrite target: score at this calibration FPR")
    p.add_argument("--target", type=float, default=None, help="absolute rewrite target (overrides --target-fpr)")
    p.add_argument("--calibration", type=Path, default=None, help="default: the model's own, else auto")
    p.add_argument(
        "--calibrate-on-train",
        type=int,
        default=0,
        help="calibrate on the first N ordinary (non-duplicated) training captions instead (the model's own prompts)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--audit-dir", type=Path, default=Path("/tmp/memguard-bench-mitigation"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.audit_dir.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()

    data = build(args.data_seed)
    own_latent = {c: data.train_latents[i] for c, i in zip(data.mem_captions, data.mem_latent_index)}
    mem = read_prompts(args.mem, args.mem_limit)
    nmem_all = read_prompts(args.nmem, None)
    nmem = nmem_all[: args.nmem_limit]
    pipe = load_pipe(args.model)
    scorer = Scorer(pipe)

    calibration_file = args.calibration or (
        None if args.model == "tiny" else shipped_calibration_path(Path(args.model))
    )
    if args.calibrate_on_train:
        ordinary = [c for c in dict.fromkeys(data.train_captions) if c not in own_latent][: args.calibrate_on_train]
        calibration = calibrate(scorer, ordinary, source=f"memorizer-train-{len(ordinary)}")
    elif calibration_file:
        calibration = CalibrationProfile.load(calibration_file)
    else:
        calibration = auto_calibration(scorer)
    target = args.target if args.target is not None else calibration.threshold_at_fpr(args.target_fpr)
    print(
        f"model {args.model}; calibration {calibration.id} ({len(calibration.scores)} prompts); "
        f"target = score at FPR {args.target_fpr} = {target:.4f}"
    )

    # ---- timing: one generation of one image, batch 1
    gen_times = []
    for seed in range(3):
        started = time.perf_counter()
        generate(pipe, mem[0], seed, args)
        gen_times.append(time.perf_counter() - started)
    gen_seconds = statistics.median(gen_times)

    # ---- memorized prompts
    mem_scores_full = scorer.score(mem)
    mem_scores = [s.score for s in mem_scores_full]
    guards = {m: rewrite_guard(pipe, m, target, args) for m in METHODS}
    rows: dict[str, dict] = {}
    sims: dict[str, list[float]] = {"none": [], **{m: [] for m in METHODS}}
    results: dict[str, list] = {m: [] for m in METHODS}
    for prompt in mem:
        reference = own_latent[prompt].unsqueeze(0)
        for seed in range(args.seeds):
            sims["none"].append(cosine(generate(pipe, prompt, seed, args), reference).item())
            for method, guard in guards.items():
                out = guard(
                    prompt=prompt,
                    num_inference_steps=args.steps,
                    guidance_scale=args.guidance,
                    generator=torch.Generator("cpu").manual_seed(seed),
                    output_type="latent",
                )
                sims[method].append(cosine(out.images.float().cpu(), reference).item())
                result = out.memguard.mitigations.get(0)
                results[method].append(result)
    rows["mem_similarity"] = {k: summary(v) for k, v in sims.items()}
    rows["mem_mitigation"] = {}
    for method in METHODS:
        done = [r for r in results[method] if r is not None]
        rows["mem_mitigation"][method] = {
            "met_share": len(done) / len(results[method]),
            "score_before_mean": statistics.mean(r.score_before for r in done) if done else None,
            "score_after_mean": statistics.mean(r.score_after for r in done) if done else None,
            "steps_mean": statistics.mean(r.steps for r in done) if done else None,
            "seconds_median": statistics.median(r.seconds for r in done) if done else None,
        }
    rows["mem_detection_score_mean"] = statistics.mean(mem_scores)

    # ---- unseen prompts: decisions under the shipped policies, then forced mitigation
    nmem_scores = scorer.score(nmem_all)
    triggered: dict[str, dict[str, int]] = {}
    for name in ("strict", "balanced"):
        policy = load_policy(name)
        counts: dict[str, int] = {}
        for prompt, score in zip(nmem_all, nmem_scores):
            action = decide(policy, score, prompt, calibration).action
            counts[action] = counts.get(action, 0) + 1
        mem_counts: dict[str, int] = {}
        for prompt, score in zip(mem, mem_scores_full):
            action = decide(policy, score, prompt, calibration).action
            mem_counts[action] = mem_counts.get(action, 0) + 1
        triggered[name] = {"unseen": counts, "memorized": mem_counts}
    rows["shipped_policies"] = triggered

    forced: dict[str, dict[str, list[float]]] = {
        m: {"vs_unmitigated": [], "comp_before": [], "comp_after": [], "seconds": []} for m in METHODS
    }
    for prompt in nmem:
        comp = data.compositional_latent(prompt).unsqueeze(0)
        plain = generate(pipe, prompt, 0, args)
        cond = scorer.encode([prompt])
        with torch.no_grad():
            result = mitigate_prompt_embedding(scorer, cond, target=-float("inf"), max_steps=args.max_steps, lr=args.lr)
        mitigated_pe = generate(pipe, result.cond.embeds.to(cond.embeds.dtype), 0, args)
        forced["prompt_embedding"]["seconds"].append(result.seconds)
        noise = initial_latents(pipe, scorer, 1, {"generator": torch.Generator("cpu").manual_seed(0)})
        result = mitigate_initial_noise(scorer, cond, noise, target=-float("inf"), max_steps=args.max_steps, lr=args.lr)
        mitigated_in = generate(pipe, prompt, 0, args, latents=result.latents.to(noise.dtype))
        forced["initial_noise"]["seconds"].append(result.seconds)
        for method, latent in (("prompt_embedding", mitigated_pe), ("initial_noise", mitigated_in)):
            forced[method]["vs_unmitigated"].append(cosine(latent, plain).item())
            forced[method]["comp_before"].append(cosine(plain, comp).item())
            forced[method]["comp_after"].append(cosine(latent, comp).item())
    rows["nmem_forced"] = {m: {k: summary(v) for k, v in d.items()} for m, d in forced.items()}
    rows["generation_seconds"] = gen_seconds

    # ---- report
    print(
        f"\n{len(mem)} memorized prompts x {args.seeds} seeds, {args.steps} DDIM steps, CFG {args.guidance}, "
        f"max {args.max_steps} mitigation steps, lr {args.lr}\n"
    )
    print(
        "| memorized prompts | cos to training latent (mean) | median | share >= 0.9 | target met | "
        "score before -> after | steps | s per prompt (x generation) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    none = rows["mem_similarity"]["none"]
    print(
        f"| no mitigation | {none['mean']:.3f} | {none['median']:.3f} | {none['share_ge_0.9']:.2f} | - | "
        f"{rows['mem_detection_score_mean']:.3f} (detection) | - | - |"
    )
    for method in METHODS:
        s, m = rows["mem_similarity"][method], rows["mem_mitigation"][method]
        before = f"{m['score_before_mean']:.3f} -> {m['score_after_mean']:.3f}" if m["score_before_mean"] else "-"
        secs = m["seconds_median"]
        cost = f"{secs:.2f} ({secs / gen_seconds:.2f}x)" if secs is not None else "-"
        steps = f"{m['steps_mean']:.1f}" if m["steps_mean"] is not None else "-"
        print(
            f"| {method} | {s['mean']:.3f} | {s['median']:.3f} | {s['share_ge_0.9']:.2f} | "
            f"{m['met_share']:.2f} | {before} | {steps} | {cost} |"
        )
    print(f"\none generation (1 image, batch 1): {gen_seconds:.2f} s\n")
    print("| policy | unseen prompts: actions | memorized prompts: actions |")
    print("|---|---|---|")
    for name, t in triggered.items():
        print(f"| {name} | {json.dumps(t['unseen'])} | {json.dumps(t['memorized'])} |")
    print(
        f"\n| unseen prompts, forced ({len(nmem)}, {args.max_steps} steps, no target) | cos to unmitigated output | "
        "cos to own compositional target: before -> after | s per prompt |"
    )
    print("|---|---|---|---|")
    for method in METHODS:
        f = rows["nmem_forced"][method]
        print(
            f"| {method} | {f['vs_unmitigated']['mean']:.3f} (min {f['vs_unmitigated']['min']:.3f}) | "
            f"{f['comp_before']['mean']:.3f} -> {f['comp_after']['mean']:.3f} | {f['seconds']['median']:.2f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "target": target,
                    "calibration": calibration.id,
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
