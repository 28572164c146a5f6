"""Evidence that a memorizer model memorizes its duplicated captions and not the rest.

Why: detection benchmarks on these models only mean something if the "memorized" prompts really reproduce their
training latent under ordinary sampling. This runs real 50-step generations (latent output) and compares the
generated latent with (a) the caption's own training latent for duplicated captions, (b) the nearest training
latent for unseen captions. It works for every model of this folder: the shipped SD 1.x model, the zoo's
epsilon / v-prediction ``StableDiffusionPipeline`` models (50 DDIM steps, guidance 7.5) and its rectified-flow
``StableDiffusion3Pipeline`` model (50 flow-Euler steps, the pipeline's default guidance 7.0). The data regime and
seed are read from the model's ``memorizer_info.json``.

``--detector`` also scores the memorized and the unseen evaluation captions with memguard's current detector
(``guard.score_prompts``, default settings) and reports the AUROC of memorized vs unseen.

    python benchmarks/memorizer/evidence.py --model guard/assets/memorizer --threads 2
    python benchmarks/memorizer/evidence.py --model benchmarks/memorizer/models/eps-strong --detector \\
        --json benchmarks/memorizer/models/eps-strong/evidence.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import REGIMES, build  # noqa: E402

SD_GUIDANCE = 7.5  # the guard's generation setting for SD 1.x/2.x models
SD3_DEFAULT_GUIDANCE = 7.0  # StableDiffusion3Pipeline.__call__'s default


def load(model: Path) -> DiffusionPipeline:
    """Any pipeline of this folder, weights upcast to float32 (the zoo stores float16).

    Components saved as ``[null, null]`` in ``model_index.json`` are passed as ``None``: diffusers saves the flow
    model's absent T5 that way but refuses to load it unless told (``text_encoder_3=None, tokenizer_3=None``).
    """
    index = json.loads((model / "model_index.json").read_text())
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v == [None, None]}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def model_info(model: Path) -> dict:
    """The training record saved beside the weights (empty if there is none)."""
    path = model / "memorizer_info.json"
    return json.loads(path.read_text()) if path.exists() else {}


@torch.no_grad()
def generate(
    pipe: DiffusionPipeline,
    captions: list[str],
    seeds: list[int],
    steps: int,
    guidance: float,
    chunk: int = 128,
) -> torch.Tensor:
    """Latents of shape (len(captions), len(seeds), C, H, W); each (caption, seed) has its own generator.

    ``output_type="latent"`` returns the sampler's latents as they are (neither pipeline un-scales them), i.e.
    the "scaled" space the training latents live in (every model here has ``scaling_factor`` 1, shift 0).
    """
    pairs = [(c, s) for c in captions for s in seeds]
    out = []
    for i in range(0, len(pairs), chunk):
        part = pairs[i : i + chunk]
        gens = [torch.Generator("cpu").manual_seed(s) for _, s in part]
        res = pipe(
            [c for c, _ in part],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            output_type="latent",
        )
        out.append(res.images.float().cpu())
    lat = torch.cat(out)
    return lat.view(len(captions), len(seeds), *lat.shape[1:])


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix between flattened rows of `a` (n, ...) and `b` (m, ...)."""
    a = torch.nn.functional.normalize(a.flatten(1), dim=1)
    b = torch.nn.functional.normalize(b.flatten(1), dim=1)
    return a @ b.T


def summary(x: torch.Tensor) -> dict[str, float]:
    """Mean / std / median / min / max / share >= 0.9 and >= 0.97 of a set of cosines."""
    x = x.flatten()
    return {
        "n": x.numel(),
        "mean": x.mean().item(),
        "std": x.std().item(),
        "median": x.median().item(),
        "min": x.min().item(),
        "max": x.max().item(),
        "frac_ge_0.9": (x >= 0.9).float().mean().item(),
        "frac_ge_0.97": (x >= 0.97).float().mean().item(),
    }


@torch.no_grad()
def dc_diagnostic(pipe: DiffusionPipeline, t: int = 981, n: int = 32) -> dict[str, float]:
    """How well an SD UNet passes each channel's spatial mean (DC) of pure noise through, at timestep `t`.

    For `n` pure-noise inputs (seed 0) and the "" prompt: the regression slope of the x0 prediction's
    per-channel DC on the input's, and the std of that DC. At t = 981 the input is almost all noise, so an
    ideal model predicts an x0 DC close to the data's mean (slope near 1, std near 0.06; the data's per-channel
    means themselves have a std near 0.25). A UNet that cannot see DC leaves the noise's DC in x0, amplified by
    1/sqrt(alpha_bar_t) ~ 15 (slope ~ 15, std ~ 0.9): generations then carry a per-channel offset.
    """
    tok = pipe.tokenizer
    ids = tok([""], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    ctx = pipe.text_encoder(ids)[0].expand(n, -1, -1)
    cfg = pipe.unet.config
    x = torch.randn((n, cfg.in_channels, cfg.sample_size, cfg.sample_size), generator=torch.Generator().manual_seed(0))
    out = pipe.unet(x, torch.full((n,), t), encoder_hidden_states=ctx).sample
    a = pipe.scheduler.alphas_cumprod[t]
    if pipe.scheduler.config.prediction_type == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * out
    else:
        x0 = (x - (1 - a).sqrt() * out) / a.sqrt()
    dx, d0 = x.mean(dim=(2, 3)).flatten(), x0.mean(dim=(2, 3)).flatten()
    return {"t": t, "n": n, "x0_dc_slope": ((d0 * dx).sum() / (dx * dx).sum()).item(), "x0_dc_std": d0.std().item()}


def detector_auroc(pipe: DiffusionPipeline, mem: list[str], nmem: list[str]) -> dict:
    """memguard's current detector (default settings) on memorized vs unseen captions: AUROC per statistic."""
    from guard import score_prompts
    from guard.roc import roc_auc

    try:
        pos = score_prompts(pipe, mem)
        neg = score_prompts(pipe, nmem)
    except Exception as exc:  # an unsupported pipeline family is a result, not a crash
        return {"error": f"{type(exc).__name__}: {exc}"}
    out: dict = {"profile": pos[0].profile, "n_mem": len(pos), "n_unseen": len(neg)}
    for key in ("score", "norm", "cos"):
        p = [getattr(s, key) for s in pos]
        n = [getattr(s, key) for s in neg]
        out[key] = {
            "auroc": roc_auc(p, n),
            "mem_mean": sum(p) / len(p),
            "unseen_mean": sum(n) / len(n),
        }
    return out


def main() -> None:
    """CLI entry point: prints a markdown table and writes a JSON record."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("guard/assets/memorizer"))
    p.add_argument("--regime", choices=sorted(REGIMES), default=None, help="default: the model's training record")
    p.add_argument("--data-seed", type=int, default=None, help="default: the model's training record, else 0")
    p.add_argument("--mem-seeds", type=int, default=3)
    p.add_argument("--nmem-seeds", type=int, default=2)
    p.add_argument("--max-unseen", type=int, default=None, help="only the first N unseen captions (quick checks)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=None, help="default 7.5 (SD), 7.0 (SD3 pipeline default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the shipped evidence used 2)")
    p.add_argument("--detector", action="store_true", help="also report memguard's detection AUROC")
    p.add_argument("--dc-only", action="store_true", help="only the DC pass-through check (SD UNets), no generation")
    p.add_argument("--json", type=Path, default=None, help="where to write the numbers (default: print only)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    info = model_info(a.model)
    regime = a.regime or info.get("regime", "shipped")
    data_seed = a.data_seed if a.data_seed is not None else info.get("data_seed", 0)
    data = build(data_seed, regime)
    if a.max_unseen is not None:
        data.nmem_captions = data.nmem_captions[: a.max_unseen]
    pipe = load(a.model)
    family = type(pipe).__name__
    dc = dc_diagnostic(pipe) if hasattr(pipe, "unet") else None
    if a.dc_only:
        print(json.dumps({"model": str(a.model), "dc": dc}))
        return
    guidance = a.guidance
    if guidance is None:
        guidance = SD3_DEFAULT_GUIDANCE if family == "StableDiffusion3Pipeline" else SD_GUIDANCE
    t0 = time.time()
    rows: dict[str, dict[str, float]] = {}
    mem = generate(pipe, data.mem_captions, list(range(a.mem_seeds)), a.steps, guidance)
    own = data.train_latents[data.mem_latent_index]
    cos_own = torch.stack([cosine(mem[i], own[i : i + 1])[:, 0] for i in range(len(own))])
    levels = torch.tensor(data.mem_levels)
    for lvl in sorted(set(data.mem_levels)):
        rows[f"memorized, {lvl} copies (own latent)"] = summary(cos_own[levels == lvl])
    rows["memorized, all (own latent)"] = summary(cos_own)
    nmem = generate(pipe, data.nmem_captions, list(range(a.nmem_seeds)), a.steps, guidance)
    flat = nmem.flatten(0, 1)
    rows["unseen (nearest training latent)"] = summary(cosine(flat, data.train_latents).max(1).values)
    comp = torch.stack([data.compositional_latent(c) for c in data.nmem_captions])
    cos_comp = torch.stack([cosine(nmem[i], comp[i : i + 1])[:, 0] for i in range(len(comp))])
    rows["unseen (own compositional target)"] = summary(cos_comp)
    secs = time.time() - t0
    detection = None
    if a.detector:
        t1 = time.time()
        detection = detector_auroc(pipe, data.mem_captions, data.nmem_captions)
        detection["seconds"] = round(time.time() - t1, 1)

    sampler = "flow-Euler" if family == "StableDiffusion3Pipeline" else type(pipe.scheduler).__name__
    print(f"model {a.model} ({family}, regime {regime}), {a.steps} {sampler} steps, guidance {guidance}, ", end="")
    print(f"generation {secs:.0f}s on {a.threads} thread(s)\n")
    print("| captions | samples | mean cos | std | median | min | max | share >= 0.9 | share >= 0.97 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(
            f"| {k} | {r['n']} | {r['mean']:.3f} | {r['std']:.3f} | {r['median']:.3f} | {r['min']:.3f} | "
            f"{r['max']:.3f} | {r['frac_ge_0.9']:.2f} | {r['frac_ge_0.97']:.2f} |"
        )
    if dc is not None:
        print(f"\nDC pass-through at t=981 (dc_diagnostic): {json.dumps(dc)}")
    if detection is not None:
        print(f"\nmemguard detector (score_prompts defaults): {json.dumps(detection)}")
    if a.json:
        record = {
            "model": str(a.model),
            "pipeline": family,
            "regime": regime,
            "data_seed": data_seed,
            "train_step": info.get("step"),
            "steps": a.steps,
            "guidance": guidance,
            "mem_seeds": a.mem_seeds,
            "nmem_seeds": a.nmem_seeds,
            "unseen_captions": len(data.nmem_captions),
            "threads": a.threads,
            "seconds": round(secs, 1),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d"),
            "rows": rows,
        }
        if dc is not None:
            record["dc_diagnostic"] = dc
        if detection is not None:
            record["detector"] = detection
        a.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
