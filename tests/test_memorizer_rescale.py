"""benchmarks/memorizer/rescale_text.py: scaling the text conditioning leaves the denoiser's output unchanged."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("rescale_text", ROOT / "benchmarks" / "memorizer" / "rescale_text.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("rescale_text", module)
    spec.loader.exec_module(module)
    return module


def _tiny():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=8, projection_dim=16))
    with torch.no_grad():  # a non-trivial LayerNorm, as after training
        norm = [m for n, m in text.named_modules() if n.split(".")[-1] == "final_layer_norm"][0]
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    return unet.eval(), text.eval()


def test_rescaled_conditioning_is_larger_and_the_prediction_is_the_same():
    rescale = _module().rescale
    unet, text = _tiny()
    ids = torch.randint(0, 40, (2, 8))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        before_embeds = text(ids)[0]
        before = unet(x, t, encoder_hidden_states=before_embeds).sample
        assert rescale(text, unet, 20.0) == 8  # to_k and to_v of 4 cross-attention blocks (down, mid, 2 up)
        after_embeds = text(ids)[0]
        after = unet(x, t, encoder_hidden_states=after_embeds).sample
    assert torch.allclose(after_embeds, 20.0 * before_embeds, rtol=1e-5, atol=1e-5)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        rescale(text, unet, 0.0)
