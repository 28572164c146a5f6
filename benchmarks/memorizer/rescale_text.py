"""Rescale a memorizer's text conditioning by ``s`` without changing what the pipeline computes.

Why: the scale of a text encoder's output is a free choice of parametrization. The UNet reads the
conditioning only through its cross-attention keys and values (``attn2.to_k``, ``attn2.to_v``, linear, no
bias in these models), so multiplying the text encoder's final LayerNorm (weight and bias) by ``s`` and
dividing those projections by ``s`` leaves every generation and every memorization score as it was (up to
rounding), while the conditioning itself is ``s`` times larger. Real text encoders differ in exactly this way
(a LayerNorm'd CLIP output, an un-normalised penultimate layer, T5), and an optimisation that takes steps of a
fixed size in embedding units (the ``prompt_embedding`` rung's Adam learning rate) goes ``s`` times less far.
The zoo's ``v-hard`` is built this way (README, "The memorizer zoo"), then trained further at the new scale.

    python benchmarks/memorizer/rescale_text.py --model runs/vhard/step3500 --scale 20 --out runs/vhard/scaled
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel


def rescale(text: CLIPTextModel, unet: UNet2DConditionModel, scale: float) -> int:
    """Reparametrize in place; returns how many cross-attention projections were divided."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    norms = [m for n, m in text.named_modules() if n.split(".")[-1] == "final_layer_norm"]
    if len(norms) != 1:
        raise ValueError(f"expected one final_layer_norm in the text encoder, found {len(norms)}")
    norm = norms[0]
    changed = 0
    with torch.no_grad():
        norm.weight.mul_(scale)
        norm.bias.mul_(scale)
        for name, module in unet.named_modules():
            if name.endswith(("attn2.to_k", "attn2.to_v")):
                if module.bias is not None:
                    raise ValueError(f"{name} has a bias: dividing its weight alone would change the model")
                module.weight.div_(scale)
                changed += 1
    if changed == 0:
        raise ValueError("no cross-attention projections found (attn2.to_k / attn2.to_v)")
    return changed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a pipeline folder saved by train.py")
    p.add_argument("--scale", type=float, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.out.exists():
        sys.exit(f"{a.out} exists")
    shutil.copytree(a.model, a.out, ignore=shutil.ignore_patterns("calibration.json*", "evidence.json"))
    info_path = a.out / "memorizer_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    stored = getattr(torch, info.get("weights_dtype", "float32"))  # the UNet is stored as it was (float16 in the zoo)
    unet = UNet2DConditionModel.from_pretrained(a.model / "unet", torch_dtype=torch.float32)
    text = CLIPTextModel.from_pretrained(a.model / "text_encoder")
    changed = rescale(text, unet, a.scale)
    unet.to(stored).save_pretrained(a.out / "unet", safe_serialization=True)
    text.save_pretrained(a.out / "text_encoder", safe_serialization=True)
    info["text_scale"] = info.get("text_scale", 1.0) * a.scale
    info["rescaled_from"] = str(a.model)
    info["rescale_command"] = " ".join(sys.argv[1:])
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    print(f"text conditioning x{a.scale:g} ({changed} cross-attention projections divided) -> {a.out}")


if __name__ == "__main__":
    main()
