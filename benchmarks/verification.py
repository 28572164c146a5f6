"""Which signal tells "still a copy" from "escaped" after a rewrite? Measured on a memorizing model.

Why: a rewrite must only be released when its image is not the training image, and at run time nothing but
the model is available. For every memorized caption and seed, each rung of the ladder is run alone (its
generation always released here) and its image is compared with the caption's own training latent: a
**copy** is above the unseen-caption level (unseen captions' cosine to their nearest training latent,
mean + 2.5 std), otherwise it **escaped**. Candidate run-time signals are then scored against that truth:

* ``probe_similarity``: the image's largest cosine to the probes (short generations of the original prompt
  from fixed seeds), the signal memguard verifies with;
* ``score_at_input``: the memorization score measured at the rung's own input (what "target met" means);
* ``guidance_norm``: the mean guidance-vector norm over the first 30% of the actual trajectory (free).

It prints each signal's AUROC (copy vs escaped), and what the two verification nulls measured on ordinary
prompts would do at FPR 1%: ``same``: an ordinary prompt's generation against its own probes; ``nearest``:
against the nearest of the *other* ordinary prompts' probes (how close an ordinary image comes to an
unrelated image the model draws: the run-time stand-in for "the nearest training image").

    python benchmarks/verification.py --model benchmarks/memorizer/models/eps-strong
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "benchmarks" / "memorizer"))

from common import load, setup, table  # noqa: E402
from data import build  # noqa: E402

from guard import Guard  # noqa: E402
from guard.actions.verification import NULL_SEED_OFFSET, probe_similarity, run_probes  # noqa: E402
from guard.calibration import CalibrationProfile, calibrate  # noqa: E402
from guard.guard import PipelineGeneration  # noqa: E402
from guard.metrics import roc_auc  # noqa: E402
from guard.policy import VerifySettings  # noqa: E402
from guard.scoring import Scorer  # noqa: E402

RUNGS = ("guidance_schedule", "prompt_embedding", "initial_noise", "combined")


def regime_of(model: Path) -> str:
    info = model / "memorizer_info.json"
    return json.loads(info.read_text()).get("regime", "shipped") if info.exists() else "shipped"


def cosine_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1)


def nearest(latents: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    a = F.normalize(latents.flatten(1).float(), dim=1)
    b = F.normalize(bank.flatten(1).float(), dim=1)
    return (a @ b.T).max(dim=1).values


class GuidanceNorm:
    """Mean ||e_c - e_u|| over the first ``share`` of the steps of single-image guided generations."""

    def __init__(self, denoiser: torch.nn.Module, share: float = 0.3) -> None:
        self.values: list[float] = []
        self.share = share
        self.handle = denoiser.register_forward_hook(self._hook)

    def _hook(self, module, args, output) -> None:
        tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        if isinstance(tensor, torch.Tensor) and tensor.shape[0] == 2:
            self.values.append(float((tensor[1] - tensor[0]).float().flatten().norm()))

    def take(self, steps: int) -> float:
        early = self.values[: max(1, int(self.share * steps))]
        self.values = []
        return sum(early) / len(early)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--seeds", type=int, default=2, help="generator seeds per memorized caption")
    p.add_argument("--mem-limit", type=int, default=None)
    p.add_argument("--unseen", type=int, default=100, help="unseen captions for the unseen-caption level")
    p.add_argument("--null-prompts", type=int, default=64, help="ordinary prompts for the verification nulls")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    setup(args.threads)

    data = build(0, regime_of(args.model)) if regime_of(args.model) != "shipped" else build(0)
    pipe = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    scorer = Scorer(pipe)
    adapter = scorer.adapter
    call = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    shape = adapter.latent_shape

    def generation(n: int) -> PipelineGeneration:
        return PipelineGeneration(pipe, adapter, dict(call), list(range(n)), shape, redact=False)

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
        from guard.actions.verification import GenerationRequest

        cond = scorer.encode(prompts)
        return generation(len(prompts))(GenerationRequest(cond=cond, latents=noise, images_per_prompt=1,
                                                          probe=True)).latents

    # unseen-caption level
    unseen = data.nmem_captions[: args.unseen]
    unseen_latents = torch.cat([generate(unseen[i : i + 16], [1000 + i + k for k in range(len(unseen[i : i + 16]))])
                                for i in range(0, len(unseen), 16)])
    unseen_cos = nearest(unseen_latents, data.train_latents).tolist()
    level = statistics.mean(unseen_cos) + 2.5 * statistics.pstdev(unseen_cos)
    print(f"unseen captions: cos to nearest training latent mean {statistics.mean(unseen_cos):.3f} "
          f"std {statistics.pstdev(unseen_cos):.3f} max {max(unseen_cos):.3f}; level (mean + 2.5 std) {level:.3f}")

    # verification nulls on ordinary prompts
    settings = VerifySettings(max_similarity=1.0)
    ordinary = data.calib_captions[: args.null_prompts]
    cond = scorer.encode(ordinary)
    probes = run_probes(generation(len(ordinary)), cond, shape, settings, scorer.seed)
    own = generate(ordinary, [scorer.seed + NULL_SEED_OFFSET + i for i in range(len(ordinary))])
    same = [float(probe_similarity(own[i : i + 1], probes[i])[0]) for i in range(len(ordinary))]
    others = [float(probe_similarity(own[i : i + 1], torch.cat([probes[j] for j in range(len(ordinary)) if j != i]))[0])
              for i in range(len(ordinary))]
    null = {"same": CalibrationThreshold(same), "nearest": CalibrationThreshold(others)}
    for name, values in null.items():
        print(f"null {name}: {values.describe()}")

    # rewrites
    calibration_path = args.model / "calibration.json"
    calibration = (CalibrationProfile.load(calibration_path) if calibration_path.exists()
                   else calibrate(scorer, data.calib_captions[:200], source="calib"))
    target = calibration.threshold_at_fpr(0.5)
    mem = list(zip(data.mem_captions, data.mem_levels, data.mem_latent_index))[: args.mem_limit]
    meter = GuidanceNorm(adapter.denoiser)
    rows: list[dict] = []
    for rung in ("none", *RUNGS):
        guard = None
        if rung != "none":
            policy = {"name": f"only-{rung}", "calibration": "off", "rules": [{
                "when": {"score": {"gte": -1e9}}, "action": "rewrite",
                "rewrite": {"ladder": [rung], "target": {"score": target}, "max_steps": args.max_steps,
                            "lr": args.lr, "verify": {"max_similarity": 1.0}, "fallback": "allow"}}]}
            guard = Guard(pipe, policy, audit_path=Path("/tmp") / f"verification-bench-{rung}.jsonl")
        for caption, copies, latent_index in mem:
            for seed in range(args.seeds):
                generator = torch.Generator().manual_seed(seed)
                if guard is None:
                    latents = pipe(caption, generator=generator, output_type="latent", **call).images
                    signal, input_score = None, None
                else:
                    out = guard(prompt=caption, generator=generator, output_type="latent", **call)
                    latents = out.images
                    ladder = out.memguard.mitigations[0]
                    signal = max(ladder.rungs[-1].similarity) if ladder.rungs[-1].similarity else None
                    scores = [m.score_after for m in ladder.rungs[-1].mitigations]
                    input_score = scores[-1] if scores else out.memguard.decisions[0].score.score
                norm = meter.take(args.steps)
                cos = float(cosine_rows(latents, data.train_latents[latent_index][None])[0])
                rows.append({"rung": rung, "caption": caption, "copies": copies, "seed": seed, "cos": cos,
                             "copy": cos > level, "probe_similarity": signal, "score_at_input": input_score,
                             "guidance_norm": norm})
        done = [r for r in rows if r["rung"] == rung]
        print(f"{rung}: mean cos {statistics.mean(r['cos'] for r in done):.3f}, "
              f"copies {sum(r['copy'] for r in done)}/{len(done)}", flush=True)
    meter.handle.remove()

    results = [["rung", "n", "cos to training latent (mean)", "copies (> level)"]]
    for rung in ("none", *RUNGS):
        done = [r for r in rows if r["rung"] == rung]
        results.append([rung, len(done), round(statistics.mean(r["cos"] for r in done), 3),
                        f"{sum(r['copy'] for r in done)}/{len(done)}"])
    print(table(results[0], results[1:]))
    rewritten = [r for r in rows if r["rung"] != "none"]
    signal_rows = [["signal", "AUROC copy vs escaped"]]
    for name in ("probe_similarity", "score_at_input", "guidance_norm"):
        pos = [r[name] for r in rewritten if r["copy"] and r[name] is not None]
        neg = [r[name] for r in rewritten if not r["copy"] and r[name] is not None]
        signal_rows.append([name, round(roc_auc(pos, neg), 3) if pos and neg else "n/a (one class)"])
    print(table(signal_rows[0], signal_rows[1:]))
    verdicts = [["null", "threshold (FPR 1%)", "copies released (must be 0)", "escaped released"]]
    for name, null_values in null.items():
        threshold = null_values.at(0.01)
        released = [r for r in rewritten if r["probe_similarity"] is not None and r["probe_similarity"] <= threshold]
        verdicts.append([name, round(threshold, 4), f"{sum(r['copy'] for r in released)}",
                         f"{sum(not r['copy'] for r in released)}/{sum(not r['copy'] for r in rewritten)}"])
    print(table(verdicts[0], verdicts[1:]))
    if args.json:
        args.json.write_text(json.dumps({"level": level, "null": {k: v.values for k, v in null.items()},
                                         "rows": rows}, indent=1))


class CalibrationThreshold:
    """Sorted null values and the memguard quantile rule."""

    def __init__(self, values: list[float]) -> None:
        self.values = sorted(values)

    def at(self, fpr: float) -> float:
        n = len(self.values)
        return self.values[n - 1 - min(math.floor(fpr * n + 1e-9), n - 1)]

    def describe(self) -> str:
        v = self.values
        return f"n {len(v)}, median {statistics.median(v):.3f}, at FPR 1% {self.at(0.01):.3f}, max {v[-1]:.3f}"


if __name__ == "__main__":
    main()
