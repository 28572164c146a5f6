"""Evidence that the reference model memorizes its duplicated captions and not the rest.

Why: detection benchmarks on this model only mean something if the "memorized" prompts really reproduce their
training latent under ordinary sampling. This runs real 50-step DDIM generations (CFG 7.5, latent output) and
compares the generated latent with (a) the caption's own training latent for duplicated captions, (b) the
nearest training latent for unseen captions. No detection score is computed here.

    python benchmarks/memorizer/evidence.py --model guard/assets/memorizer
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import build  # noqa: E402


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline,
    captions: list[str],
    seeds: list[int],
    steps: int,
    guidance: float,
    chunk: int = 128,
) -> torch.Tensor:
    """Latents of shape (len(captions), len(seeds), C, H, W); each (caption, seed) has its own generator."""
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
    """Mean / median / min / max / share >= 0.9 of a set of cosines."""
    x = x.flatten()
    return {
        "n": x.numel(),
        "mean": x.mean().item(),
        "median": x.median().item(),
        "min": x.min().item(),
        "max": x.max().item(),
        "frac_ge_0.9": (x >= 0.9).float().mean().item(),
    }


def main() -> None:
    """CLI entry point: prints a markdown table and writes a JSON record."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=Path("guard/assets/memorizer"))
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--mem-seeds", type=int, default=3)
    p.add_argument("--nmem-seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="where to write the numbers (default: print only)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    data = build(a.data_seed)
    pipe = StableDiffusionPipeline.from_pretrained(a.model)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    rows: dict[str, dict[str, float]] = {}
    mem = generate(pipe, data.mem_captions, list(range(a.mem_seeds)), a.steps, a.guidance)
    own = data.train_latents[data.mem_latent_index]
    cos_own = torch.stack([cosine(mem[i], own[i : i + 1])[:, 0] for i in range(len(own))])
    levels = torch.tensor(data.mem_levels)
    for lvl in sorted(set(data.mem_levels)):
        rows[f"memorized, {lvl} copies (own latent)"] = summary(cos_own[levels == lvl])
    nmem = generate(pipe, data.nmem_captions, list(range(a.nmem_seeds)), a.steps, a.guidance)
    flat = nmem.flatten(0, 1)
    rows["unseen (nearest training latent)"] = summary(cosine(flat, data.train_latents).max(1).values)
    comp = torch.stack([data.compositional_latent(c) for c in data.nmem_captions])
    cos_comp = torch.stack([cosine(nmem[i], comp[i : i + 1])[:, 0] for i in range(len(comp))])
    rows["unseen (own compositional target)"] = summary(cos_comp)
    secs = time.time() - t0

    print(f"model {a.model}, {a.steps} DDIM steps, guidance {a.guidance}, generation {secs:.0f}s\n")
    print("| captions | samples | mean cos | median | min | max | share >= 0.9 |")
    print("|---|---|---|---|---|---|---|")
    for k, r in rows.items():
        print(
            f"| {k} | {r['n']} | {r['mean']:.3f} | {r['median']:.3f} | {r['min']:.3f} | {r['max']:.3f} | "
            f"{r['frac_ge_0.9']:.2f} |"
        )
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "model": str(a.model),
                    "steps": a.steps,
                    "guidance": a.guidance,
                    "mem_seeds": a.mem_seeds,
                    "nmem_seeds": a.nmem_seeds,
                    "seconds": round(secs, 1),
                    "rows": rows,
                },
                indent=1,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
