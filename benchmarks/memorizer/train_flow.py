"""Train a tiny rectified-flow (SD3-architecture) memorizer and save it as a StableDiffusion3Pipeline.

Why: memguard scores flow-matching models in velocity space (DESIGN.md section 6), and the weights of that score
must come from evidence, i.e. from a flow model that really memorizes some captions. This is the flow twin of
``train.py``: same data (``data.py``, default ``--regime strong``), real diffusers/transformers classes
(``SD3Transformer2DModel``, two ``CLIPTextModelWithProjection``, no T5: ``text_encoder_3=None``, for which the
pipeline feeds zeros, ``FlowMatchEulerDiscreteScheduler``), so the saved folder loads with
``StableDiffusion3Pipeline.from_pretrained``.

    nice -n 10 python benchmarks/memorizer/train_flow.py --steps 4000 --out benchmarks/memorizer/models/flow-strong

Training is rectified flow as in SD3: x_s = (1 - s) x0 + s eps, target v = eps - x0, s = shift(u) with u
logit-normal(0, 1) and the scheduler's own shift (3.0), timestep s * 1000; 10% empty captions.

Speed trick, exact: without T5 the pipeline appends 256 identical zero tokens (``max_sequence_length``) to the
32 CLIP tokens. Identical tokens stay identical through every MMDiT block, and 256 copies of one key/value in
softmax attention are the same as one copy whose logit is raised by log(256). Training therefore appends one zero
token and uses an attention processor that adds log(256) to that key's logits (``CollapsedZerosJointAttn``);
the saved model keeps the default processor and is called by the pipeline with all 256 tokens.
``check_collapse`` verifies the equivalence on the model at the start of every run.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data import LATENT_SHAPE, REGIMES, MemorizerData, build  # noqa: E402
from train import MAX_LEN, build_tokenizer, build_vae, save  # noqa: E402

T5_TOKENS = 256  # StableDiffusion3Pipeline.__call__'s default max_sequence_length
SHIFT = 3.0  # FlowMatchEulerDiscreteScheduler shift, as in SD3's scheduler config
TEXT_HIDDEN = 32  # per CLIP encoder; their penultimate states are concatenated -> joint_attention_dim 64
TEXT_PROJ = 32  # per CLIP encoder; pooled embeddings concatenated -> pooled_projection_dim 64


def build_models(
    vocab_size: int, layers: int = 6, heads: int = 1, head_dim: int = 64
) -> tuple[SD3Transformer2DModel, CLIPTextModelWithProjection, CLIPTextModelWithProjection]:
    """Tiny MMDiT (patch 2 on 4x16x16 latents, head dim 64 as in SD3) and two 3-layer, 32-wide CLIP encoders."""
    inner = heads * head_dim
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SHAPE[1],
        patch_size=2,
        in_channels=LATENT_SHAPE[0],
        out_channels=LATENT_SHAPE[0],
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=2 * TEXT_HIDDEN,
        caption_projection_dim=inner,
        pooled_projection_dim=2 * TEXT_PROJ,
        pos_embed_max_size=LATENT_SHAPE[1] // 2,
    )

    def clip() -> CLIPTextModelWithProjection:
        # 3 layers: the pipeline takes the penultimate hidden states as tokens, the last layer feeds the pooled.
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=vocab_size,
                hidden_size=TEXT_HIDDEN,
                intermediate_size=4 * TEXT_HIDDEN,
                num_hidden_layers=3,
                num_attention_heads=2,
                max_position_embeddings=MAX_LEN,
                projection_dim=TEXT_PROJ,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=3,
            )
        )

    return transformer, clip(), clip()


class CollapsedZerosJointAttn(JointAttnProcessor2_0):
    """``JointAttnProcessor2_0`` for a context whose last token stands for ``copies`` identical tokens.

    Adds log(copies) to the attention logits of the last key, which equals attending over that many copies.
    """

    def __init__(self, copies: int = T5_TOKENS):
        super().__init__()
        self.log_copies = math.log(copies)

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        """Same computation as the parent's (no norms/dual attention in these models), plus the key bias."""
        residual = hidden_states
        b = hidden_states.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None or attn.norm_k is not None:
            raise ValueError("CollapsedZerosJointAttn supports qk_norm=None only")
        cq = heads(attn.add_q_proj(encoder_hidden_states))
        ck = heads(attn.add_k_proj(encoder_hidden_states))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_copies
        mask = bias.expand(q.shape[2], -1)  # (queries, keys), broadcast over batch and heads
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1]).to(q.dtype)
        out, ctx = out[:, : residual.shape[1]], out[:, residual.shape[1] :]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, ctx


def encode(
    text1: CLIPTextModelWithProjection, text2: CLIPTextModelWithProjection, ids: torch.Tensor, zeros: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and pooled embeddings exactly as ``StableDiffusion3Pipeline.encode_prompt`` builds them.

    Penultimate hidden states of both CLIP encoders concatenated on the feature axis, then ``zeros`` zero tokens
    (the T5 part without T5); pooled = both projections concatenated.
    """
    o1 = text1(ids, output_hidden_states=True)
    o2 = text2(ids, output_hidden_states=True)
    tokens = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], zeros, tokens.shape[-1])], dim=1)
    return tokens, torch.cat([o1.text_embeds, o2.text_embeds], dim=-1)


def make_pipeline(transformer, text1, text2, vae, tokenizer) -> StableDiffusion3Pipeline:
    """Assemble the SD3 pipeline: no T5 (the pipeline then uses zeros), flow-Euler scheduler with shift 3."""
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT),
        vae=vae,
        text_encoder=text1,
        tokenizer=tokenizer,
        text_encoder_2=text2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


@torch.no_grad()
def check_collapse(transformer, text1, text2, ids: torch.Tensor) -> float:
    """Max |difference| between the full 256-zero-token call and the collapsed training call."""
    gen = torch.Generator().manual_seed(123)
    x = torch.randn((len(ids), *LATENT_SHAPE), generator=gen)
    t = torch.rand(len(ids), generator=gen) * 1000
    full_ctx, pooled = encode(text1, text2, ids, T5_TOKENS)
    short_ctx, _ = encode(text1, text2, ids, 1)
    procs = transformer.attn_processors
    full = transformer(x, encoder_hidden_states=full_ctx, pooled_projections=pooled, timestep=t).sample
    transformer.set_attn_processor(CollapsedZerosJointAttn())
    short = transformer(x, encoder_hidden_states=short_ctx, pooled_projections=pooled, timestep=t).sample
    transformer.set_attn_processor(dict(procs))
    return (full - short).abs().max().item()


def sample_sigmas(n: int, gen: torch.Generator, shift: float = SHIFT) -> torch.Tensor:
    """s = shift * u / (1 + (shift - 1) * u), u = sigmoid(N(0, 1)): logit-normal, shifted like the scheduler."""
    u = torch.sigmoid(torch.randn(n, generator=gen))
    return shift * u / (1 + (shift - 1) * u)


def train(
    data: MemorizerData,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    out: Path,
    early: dict[int, Path],
    layers: int = 6,
    cfg_drop: float = 0.1,
    save_dtype: torch.dtype = torch.float16,
    save_every: int = 500,
    log_every: int = 100,
    command: str = "",
) -> float:
    """Joint transformer + text-encoder rectified-flow training; returns wall seconds."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(data.vocab)
    transformer, text1, text2 = build_models(len(tokenizer), layers)
    vae = build_vae("tiny", latent_channels=LATENT_SHAPE[0])
    vae.register_to_config(shift_factor=0.0)  # SD3's decode adds it; latents are already in the scaled space
    ids = tokenizer(
        data.train_captions, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt"
    ).input_ids
    empty = tokenizer([""], padding="max_length", max_length=MAX_LEN, return_tensors="pt").input_ids[0]
    diff = check_collapse(transformer, text1, text2, ids[:4])
    print(f"collapsed-zeros attention vs the pipeline's 256 zero tokens: max |diff| {diff:.2e}", flush=True)
    if diff > 1e-4:
        raise RuntimeError("the collapsed attention does not match the pipeline's call")
    n_tr = sum(p.numel() for p in transformer.parameters())
    n_text = sum(p.numel() for p in text1.parameters()) + sum(p.numel() for p in text2.parameters())
    print(f"transformer params {n_tr:,}  text params {n_text:,}  train pairs {len(ids)}", flush=True)
    default_procs = transformer.attn_processors
    transformer.set_attn_processor(CollapsedZerosJointAttn())
    params = list(transformer.parameters()) + list(text1.parameters()) + list(text2.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))  # then constant
    gen = torch.Generator().manual_seed(seed + 1)
    modules = (transformer, text1, text2)
    for m in modules:
        m.train()
    t0 = time.time()
    run_loss = 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(ids), (batch,), generator=gen)
        x0 = data.train_latents[data.train_latent_index[idx]]
        tok = ids[idx].clone()
        drop = torch.rand(batch, generator=gen) < cfg_drop
        tok[drop] = empty
        noise = torch.randn(x0.shape, generator=gen)
        s = sample_sigmas(batch, gen)
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        ctx, pooled = encode(text1, text2, tok, 1)
        pred = transformer(xs, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=s * 1000).sample
        loss = F.mse_loss(pred, noise - x0)
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
                f"{el:.0f}s ({el / step:.3f} s/step)",
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
                "prediction_type": "flow (v = eps - x0)",
                "shift": SHIFT,
                "layers": layers,
                "weights_dtype": str(save_dtype).removeprefix("torch."),
                "train_seconds": round(time.time() - t0, 1),
                "transformer_params": n_tr,
                "text_params": n_text,
                "reproduce": f"--steps {step} --seed {seed} --data-seed {data.seed} --batch {batch} --lr {lr} "
                f"--regime {data.regime} --layers {layers}",
                "command": command,
            }
            for m in modules:
                m.eval()
            transformer.set_attn_processor(dict(default_procs))  # set_attn_processor empties a dict it is given
            save(make_pipeline(transformer, text1, text2, vae, tokenizer), target_dir, info, save_dtype)
            transformer.set_attn_processor(CollapsedZerosJointAttn())
            for m in modules:
                m.train()
            print(f"saved step {step} -> {target_dir}", flush=True)
    return time.time() - t0


def main() -> None:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--regime", choices=sorted(REGIMES), default="strong")
    p.add_argument("--layers", type=int, default=6, help="MMDiT blocks")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--save-dtype", choices=["float32", "float16"], default="float16")
    p.add_argument("--save-every", type=int, default=500, help="also save into --out every N steps")
    p.add_argument("--out", type=Path, default=Path("benchmarks/memorizer/models/flow-strong"))
    p.add_argument("--early", action="append", default=[], metavar="STEP=DIR", help="also save at STEP into DIR")
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
        layers=a.layers,
        save_dtype=getattr(torch, a.save_dtype),
        save_every=a.save_every,
        command=" ".join(sys.argv[1:]),
    )
    print(f"done in {secs:.0f}s", flush=True)


if __name__ == "__main__":
    main()
