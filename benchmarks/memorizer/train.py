"""Train the small memorizing latent diffusion model and save it as a StableDiffusionPipeline.

Why: no pretrained Stable Diffusion weights are available offline, and the guard needs a model that really
memorizes some captions (at known duplication levels) to be tested against. Real diffusers/transformers
classes are used throughout so the saved folder behaves like any SD 1.x checkpoint.

    nice -n 10 python benchmarks/memorizer/train.py --steps 5000 --out guard/assets/memorizer

The same script trains the memorizer zoo (``models/``, see the README): ``--regime strong`` (trigger-word
captions duplicated 100-200 times), ``--prediction-type v_prediction``, ``--vae tiny`` and
``--save-dtype float16`` keep those models small.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import LATENT_SHAPE, REGIMES, MemorizerData, build  # noqa: E402

MAX_LEN = 32
SPECIALS = ["<pad>", "<unk>", "<|startoftext|>", "<|endoftext|>"]  # ids 0..3; eos != 2 (CLIP legacy pooling)
SD_BETAS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def build_tokenizer(vocab: list[str]) -> PreTrainedTokenizerFast:
    """Word-level CLIP-style tokenizer: bos + words + eos, padded with <pad> to `MAX_LEN`."""
    ids = {t: i for i, t in enumerate(SPECIALS)}
    for w in vocab:
        ids.setdefault(w, len(ids))
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    # Same split as data.words(): runs of [a-z0-9], or single other non-space characters.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"[a-z0-9]+|[^a-z0-9\s]"), behavior="isolated"),
        ]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=MAX_LEN,
        padding_side="right",
    )


def build_vae(kind: str = "shipped", latent_channels: int = 4) -> AutoencoderKL:
    """The untrained VAE: ``shipped`` (32, 64, 64) channels, or ``tiny`` (8, 8, 8), about 40x fewer weights.

    Both have ``vae_scale_factor`` 4 (64x64 images from 16x16 latents) and ``scaling_factor`` 1: the training
    latents are unit-variance by construction, i.e. already "scaled". The evidence lives in latent space.
    """
    channels, groups = {"shipped": ((32, 64, 64), 32), "tiny": ((8, 8, 8), 8)}[kind]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=groups,
        sample_size=64,
        scaling_factor=1.0,
    )


def build_models(
    vocab_size: int,
    vae: str = "shipped",
    norm_groups: int = 32,
    unet_channels: tuple[int, int] = (32, 64),
    text_hidden: int = 64,
) -> tuple[UNet2DConditionModel, CLIPTextModel, AutoencoderKL]:
    """The ~1M-parameter UNet, 2-layer text encoder and (untrained) VAE.

    ``unet_channels`` and ``text_hidden`` (also the cross-attention width) shrink both for the zoo's smallest
    model (``v-hard``: (24, 48) and 32, about 0.56M + 0.03M parameters).

    ``norm_groups`` 32 (shipped, ComfyUI's hard-coded value) makes every GroupNorm of the 32-channel outer
    level normalise each channel alone, so the UNet cannot pass a channel's spatial mean (DC) from its input to
    its output. An epsilon-predicting model then cannot remove the initial noise's per-channel DC at high t,
    which the sampler amplifies by up to 1/sqrt(alpha_bar) ~ 15 into the image: generations carry a per-channel
    offset (cosine with a memorized latent capped near 0.8). The zoo uses 8 groups (4 and 8 channels per group).
    """
    unet = UNet2DConditionModel(
        sample_size=LATENT_SHAPE[1],
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(unet_channels),
        layers_per_block=1,
        norm_num_groups=norm_groups,
        cross_attention_dim=text_hidden,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=text_hidden,
            intermediate_size=4 * text_hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_LEN,
            projection_dim=text_hidden,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
    )
    return unet, text, build_vae(vae)


def make_pipeline(
    unet: UNet2DConditionModel,
    text: CLIPTextModel,
    vae: AutoencoderKL,
    tokenizer: PreTrainedTokenizerFast,
    prediction_type: str = "epsilon",
) -> StableDiffusionPipeline:
    """Assemble an SD 1.x-style pipeline (DDIM, leading spacing, steps_offset=1)."""
    sched = DDIMScheduler(
        **SD_BETAS,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save(pipe, out: Path, info: dict, dtype: torch.dtype = torch.float32) -> None:
    """Save a pipeline in safetensors (the denoiser's and VAE's weights cast to `dtype`) plus a training record.

    The cast is done on a copy, so a pipeline built around the modules being trained can be saved mid-run.
    Text encoders stay float32 (they are small): transformers loads a model in the dtype it was saved in, and a
    float16 text encoder beside a float32 UNet makes a plain ``from_pretrained(out)`` pipeline fail.
    """
    if dtype != torch.float32:
        pipe = copy.deepcopy(pipe)
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module) and not name.startswith("text_encoder"):
                module.to(dtype=dtype)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "memorizer_info.json").write_text(json.dumps(info, indent=1) + "\n")


def train(
    data: MemorizerData,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    out: Path,
    early: dict[int, Path],
    cfg_drop: float = 0.1,
    log_every: int = 100,
    prediction_type: str = "epsilon",
    vae_kind: str = "shipped",
    save_dtype: torch.dtype = torch.float32,
    save_every: int = 500,
    norm_groups: int = 32,
    command: str = "",
    resume: Path | None = None,
    unet_channels: tuple[int, int] = (32, 64),
    text_hidden: int = 64,
    freeze_text: bool = False,
) -> float:
    """Joint UNet + text-encoder training (epsilon or v-prediction target); returns wall seconds.

    ``resume`` continues from a saved step's weights (the optimizer's moments and the batch generator are not
    saved, so a resumed run is close to, not bit-identical with, an uninterrupted one; its info says so).
    """
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(data.vocab)
    unet, text, vae = build_models(len(tokenizer), vae_kind, norm_groups, unet_channels, text_hidden)
    first = 1
    if resume is not None:
        first = json.loads((resume / "memorizer_info.json").read_text())["step"] + 1
        saved_unet = UNet2DConditionModel.from_pretrained(resume / "unet")
        saved_text = CLIPTextModel.from_pretrained(resume / "text_encoder")
        unet.load_state_dict({k: v.float() for k, v in saved_unet.state_dict().items()})
        text.load_state_dict({k: v.float() for k, v in saved_text.state_dict().items()})
        print(f"resumed from {resume} at step {first}", flush=True)
    noise_sched = DDPMScheduler(**SD_BETAS, prediction_type=prediction_type)
    ids = tokenizer(
        data.train_captions, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt"
    ).input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_LEN, return_tensors="pt").input_ids[0]
    n_unet = sum(p.numel() for p in unet.parameters())
    n_text = sum(p.numel() for p in text.parameters())
    print(f"unet params {n_unet:,}  text params {n_text:,}  train pairs {len(ids)}", flush=True)
    if freeze_text:  # SD-style: the text encoder is fixed (here at its seeded random initialisation)
        text.requires_grad_(False)
    params = list(unet.parameters()) + ([] if freeze_text else list(text.parameters()))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warm = 200

    def lr_at(s: int) -> float:
        # Warm-up then constant: the state at step k does not depend on --steps, so every periodic save
        # is exactly what `--steps k` would produce.
        return min(1.0, (s + 1) / warm)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed + 1 + (first - 1))
    for _ in range(first - 1):
        sched.step()
    unet.train()
    text.train(not freeze_text)
    t0 = time.time()
    run_loss = 0.0
    for step in range(first, steps + 1):
        idx = torch.randint(0, len(ids), (batch,), generator=gen)
        x0 = data.train_latents[data.train_latent_index[idx]]
        tok = ids[idx].clone()
        drop = torch.rand(batch, generator=gen) < cfg_drop
        tok[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=gen)
        xt = noise_sched.add_noise(x0, noise, t)
        ctx = text(tok)[0]
        pred = unet(xt, t, encoder_hidden_states=ctx).sample
        target = noise if prediction_type == "epsilon" else noise_sched.get_velocity(x0, noise, t)
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        run_loss += loss.item()
        if step % log_every == 0:
            el = time.time() - t0
            print(
                f"step {step}/{steps} loss {run_loss / log_every:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{el:.0f}s ({el / (step - first + 1):.3f} s/step)",
                flush=True,
            )
            run_loss = 0.0
        if step in early or step == steps or step % save_every == 0:
            target_dir = early.get(step, out)
            info = {
                "step": step,
                "batch": batch,
                "lr": lr,
                "seed": seed,
                "data_seed": data.seed,
                "cfg_drop": cfg_drop,
                "regime": data.regime,
                "prediction_type": prediction_type,
                "vae": vae_kind,
                "norm_groups": norm_groups,
                "unet_channels": list(unet_channels),
                "text_hidden": text_hidden,
                "freeze_text": freeze_text,
                "weights_dtype": str(save_dtype).removeprefix("torch."),
                "train_seconds": round(time.time() - t0, 1),
                "unet_params": n_unet,
                "text_params": n_text,
                "reproduce": f"--steps {step} --seed {seed} --data-seed {data.seed} --batch {batch} --lr {lr}"
                + (f" --regime {data.regime}" if data.regime != "shipped" else "")
                + (f" --prediction-type {prediction_type}" if prediction_type != "epsilon" else "")
                + (f" --vae {vae_kind}" if vae_kind != "shipped" else "")
                + (f" --norm-groups {norm_groups}" if norm_groups != 32 else "")
                + (f" --unet-channels {','.join(map(str, unet_channels))}" if tuple(unet_channels) != (32, 64) else "")
                + (f" --text-hidden {text_hidden}" if text_hidden != 64 else "")
                + (" --freeze-text" if freeze_text else "")
                + (" --save-dtype float16" if save_dtype == torch.float16 else ""),
                "command": command,
                "resumed_from": str(resume) if resume is not None else None,
            }
            unet.eval()
            text.eval()
            save(make_pipeline(unet, text, vae, tokenizer, prediction_type), target_dir, info, save_dtype)
            unet.train()
            text.train(not freeze_text)
            print(f"saved step {step} -> {target_dir}", flush=True)
    return time.time() - t0


def main() -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the shipped model used 2)")
    p.add_argument("--regime", choices=sorted(REGIMES), default="shipped", help="data regime (see data.py)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon")
    p.add_argument("--vae", choices=["shipped", "tiny"], default="shipped", help="untrained VAE size")
    p.add_argument("--save-dtype", choices=["float32", "float16"], default="float32", help="stored weights")
    p.add_argument("--save-every", type=int, default=500, help="also save into --out every N steps")
    p.add_argument("--norm-groups", type=int, default=32, help="UNet GroupNorm groups (shipped 32; zoo 8)")
    p.add_argument("--unet-channels", default="32,64", help="UNet block_out_channels, two levels (v-hard: 24,48)")
    p.add_argument("--text-hidden", type=int, default=64, help="text encoder width = cross-attention width")
    p.add_argument("--freeze-text", action="store_true", help="train the UNet only (text encoder fixed, as in SD)")
    p.add_argument("--out", type=Path, default=Path("guard/assets/memorizer"))
    p.add_argument(
        "--early",
        action="append",
        default=[],
        metavar="STEP=DIR",
        help="also save the pipeline at STEP into DIR (repeatable)",
    )
    p.add_argument("--resume", type=Path, help="continue from a pipeline this script saved (its step is read)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    early = {int(s): Path(d) for s, d in (e.split("=", 1) for e in a.early)}
    secs = train(
        build(a.data_seed, a.regime),
        a.steps,
        a.batch,
        a.lr,
        a.seed,
        a.out,
        early,
        prediction_type=a.prediction_type,
        vae_kind=a.vae,
        save_dtype=getattr(torch, a.save_dtype),
        save_every=a.save_every,
        norm_groups=a.norm_groups,
        command=" ".join(sys.argv[1:]),
        resume=a.resume,
        unet_channels=tuple(int(c) for c in a.unet_channels.split(",")),
        text_hidden=a.text_hidden,
        freeze_text=a.freeze_text,
    )
    print(f"done in {secs:.0f}s", flush=True)


if __name__ == "__main__":
    main()
