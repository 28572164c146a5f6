"""A plain, obviously-correct implementation of the score, written like the reference code.

One prompt at a time, one noise sample at a time, two UNet calls of batch 2 (uncond + cond) per
timestep, no cache, no batching across prompts. The fast path in ``guard.scoring`` must match it.
"""

import math

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler


def reference_score(pipe, prompt, *, samples=1, seed=51, steps=50, weights=(1.0, 2.0), space="eps"):
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    t_hi, t_lo = int(scheduler.timesteps[0]), int(scheduler.timesteps[-3])
    unet = pipe.unet
    size = unet.config.sample_size
    noise = torch.randn(
        (samples, unet.config.in_channels, size, size), generator=torch.Generator("cpu").manual_seed(seed)
    )
    is_xl = hasattr(pipe, "text_encoder_2")
    with torch.no_grad():
        if is_xl:
            cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
                prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
            )
            native = size * pipe.vae_scale_factor
            time_ids = torch.tensor([[native, native, 0, 0, native, native]] * 2, dtype=torch.float32)
            added = {"text_embeds": torch.cat([uncond_pooled, pooled]), "time_ids": time_ids}
        else:
            cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
            added = None
        context = torch.cat([uncond, cond])
        v_pred = pipe.scheduler.config.prediction_type == "v_prediction"
        alphas = pipe.scheduler.alphas_cumprod
        norms, cosines = [], []
        for i in range(samples):
            x = noise[i : i + 1]
            outputs = {}
            for t in (t_hi, t_lo):
                kwargs = {"added_cond_kwargs": added} if added else {}
                out = unet(torch.cat([x, x]), t, encoder_hidden_states=context, **kwargs).sample
                out_u, out_c = out.chunk(2)
                if v_pred and space == "eps":
                    a = float(alphas[t])
                    out_u = math.sqrt(a) * out_u + math.sqrt(1 - a) * x
                    out_c = math.sqrt(a) * out_c + math.sqrt(1 - a) * x
                outputs[t] = (out_u, out_c)
            u_hi, c_hi = outputs[t_hi]
            diff = c_hi - u_hi
            if v_pred and space == "native":
                a = float(alphas[t_hi])
                diff = math.sqrt(a) * diff / (1 - a)
            norms.append(diff.flatten().norm().item())
            u_lo, c_lo = outputs[t_lo]
            cosines.append(F.cosine_similarity(u_lo, c_lo - u_lo, dim=1).mean().item())
    norm, cos = sum(norms) / samples, sum(cosines) / samples
    return norm, cos, weights[0] * norm + weights[1] * cos, (t_hi, t_lo)
