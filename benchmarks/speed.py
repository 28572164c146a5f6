"""memguard's cost, measured side by side in one run and reported as ratios.

    python benchmarks/speed.py                      # the shipped memorizing model, CPU
    python benchmarks/speed.py --full-size --device cuda --dtype float16   # SD-v1.4 architecture, random weights

Compares, on the same prompts and model: memguard's batched, cached scan vs a reference-style
implementation (two batch-2 UNet calls per prompt, one prompt at a time, no cache), vs the
Hessian-sharpness detector; and the guard's overhead on a 50-step generation.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from baselines import reference_style_scores, sharpness_scores
from common import MEMORIZER_PROMPTS, SHIPPED_MODEL, load, prompts_from, setup, table, timed

from guard import Guard
from guard.scoring import Scorer


def best_of(repeats: int, fn, device: str):
    """The fastest of ``repeats`` timed runs: the least disturbed by whatever else the machine does."""
    runs = [timed(fn, device) for _ in range(repeats)]
    return runs[0][0], min(seconds for _, seconds in runs)


def full_size_pipeline(device: str, dtype: torch.dtype):
    """An SD-v1.4-architecture pipeline with random weights: valid for timing, not for scores."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from guard.testing import build_word_tokenizer

    tokenizer = build_word_tokenizer(model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    unet = UNet2DConditionModel(
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
    )
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512,
    )
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHIPPED_MODEL))
    parser.add_argument("--prompts", default=str(MEMORIZER_PROMPTS / "nmem.txt"))
    parser.add_argument("--limit", type=int, default=200, help="prompts to scan")
    parser.add_argument("--sharpness-limit", type=int, default=50, help="prompts for the (slow) sharpness baseline")
    parser.add_argument("--generations", type=int, default=8, help="50-step generations to time, each way")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per scanner; the fastest counts")
    parser.add_argument("--full-size", action="store_true", help="SD-v1.4-architecture UNet, random weights")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    setup(args.threads)
    dtype = getattr(torch, args.dtype)

    if args.full_size:
        pipe = full_size_pipeline(args.device, dtype)
        model_name = "SD-v1.4 architecture (random weights)"
    else:
        pipe = load(args.model, args.device).to(dtype=dtype)
        model_name = args.model
    prompts = prompts_from(args.prompts, args.limit)
    device = args.device
    print(f"model: {model_name}; device {device}, {args.dtype}, {args.threads} CPU threads; {len(prompts)} prompts\n")

    scorer = Scorer(pipe, batch_size=args.batch_size)
    scorer.score(prompts)  # warm-up at full batch size: allocations and lazy initialisation are not timed
    reference_style_scores(scorer, prompts[:2])

    def cold_scan():
        scorer.clear_cache()
        return scorer.score(prompts)

    fast, fast_s = best_of(args.repeats, lambda: scorer.score(prompts), device)
    _, cold_s = best_of(args.repeats, cold_scan, device)
    ref, ref_s = best_of(args.repeats, lambda: reference_style_scores(scorer, prompts), device)
    worst = max(abs(f.score - r[2]) for f, r in zip(fast, ref))
    sharp_prompts = prompts[: args.sharpness_limit]
    _, sharp_s = timed(lambda: sharpness_scores(scorer, sharp_prompts), device)
    pipe.unet.set_default_attn_processor()
    rate = {
        "memguard (batched, uncond cached)": len(prompts) / fast_s,
        "memguard (first call, cache cold)": len(prompts) / cold_s,
        "reference-style (2 batch-2 calls/prompt)": len(prompts) / ref_s,
        "Hessian sharpness (1 JVP/prompt)": len(sharp_prompts) / sharp_s,
    }
    base = rate["memguard (batched, uncond cached)"]
    print(table(["scanner", "prompts/s", "memguard is x faster"], [[k, v, base / v] for k, v in rate.items()]))
    print(f"\nlargest score difference memguard vs reference-style: {worst:.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        policy = {"name": "bench", "version": 1, "calibration": "off", "audit": {"path": str(Path(tmp) / "a.jsonl")}}
        guard = Guard(pipe, policy)
        prompt = prompts[0]
        guard.check(prompt)

        def generate(target):
            return target(prompt=prompt, num_inference_steps=50, output_type="latent",
                          generator=torch.Generator("cpu").manual_seed(0))

        generate(pipe)
        generate(guard)
        plain_runs, guarded_runs = [], []
        for _ in range(args.generations):  # interleaved, so drift in machine speed hits both alike
            plain_runs.append(timed(lambda: generate(pipe), device)[1])
            guarded_runs.append(timed(lambda: generate(guard), device)[1])
        plain_s, guarded_s = min(plain_runs), min(guarded_runs)
        check_s = min(timed(lambda: guard.check(prompt), device)[1] for _ in range(5))
    print()
    print(table(["one request", "seconds", "share of a plain 50-step generation"], [
        ["plain 50-step generation", plain_s, 1.0],
        ["guard.check (encode + score + audit)", check_s, check_s / plain_s],
        ["guarded 50-step generation", guarded_s, guarded_s / plain_s],
        ["guard overhead (guarded - plain)", guarded_s - plain_s, (guarded_s - plain_s) / plain_s],
    ]))


if __name__ == "__main__":
    main()
