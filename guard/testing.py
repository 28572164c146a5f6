"""Small, real diffusers pipelines with random weights, for tests and offline demos.

They are built from configs in a second or two and need no hub: the tokenizer is a
word-level one made locally. Scores from these models are meaningless as detection
results but exercise exactly the code paths a full-size checkpoint does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

DEFAULT_WORDS: tuple[str, ...] = tuple(
    """a an the of on in with and at by photo painting drawing portrait landscape city street house
    cat dog bird horse car boat tree flower mountain river lake sea beach forest sky cloud sun moon
    red blue green yellow black white golden small large old new young happy quiet bright dark
    watercolor oil sketch render style art poster cover wallpaper close up view night morning
    man woman child people girl boy face hat coat dress table chair window door garden road""".split()
)


def build_word_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 16):
    """A CLIP-like word-level tokenizer: ``<bos> words <eos>``, padded with ``<pad>``.

    The end-of-text token has the highest id, as in CLIP, so text encoders pool on it.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    vocab["<eos>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def _text_config(tokenizer, hidden_size: int, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu",
    )


def _ddim_scheduler(prediction_type: str):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )


def _unet_layout(sample_size: int) -> dict:
    """Two resolution levels, cross-attention only at the lower one (about 1M parameters)."""
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    }


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )


def tiny_sd_pipeline(prediction_type: str = "epsilon", seed: int = 0, sample_size: int = 8):
    """A random-weight ``StableDiffusionPipeline``: SD 1.x layout (epsilon) or SD 2.x-style (v-prediction)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_size=32))
    v_style = prediction_type == "v_prediction"
    unet = UNet2DConditionModel(
        **_unet_layout(sample_size),
        cross_attention_dim=32,
        attention_head_dim=(2, 4) if v_style else 8,
        use_linear_projection=v_style,
    )
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(seed: int = 0, sample_size: int = 8, force_zeros_for_empty_prompt: bool = True):
    """A random-weight ``StableDiffusionXLPipeline`` with two text encoders and ``text_time`` conditioning."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer()
    tokenizer_2 = build_word_tokenizer()
    unet = UNet2DConditionModel(
        **_unet_layout(sample_size),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
    )
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer, hidden_size=32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_size=32, projection_dim=32)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_ddim_scheduler("epsilon"),
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def words_in(text: str) -> list[str]:
    """Lower-cased words of ``text``, as the word-level tokenizer splits them."""
    return re.findall(r"\w+", text.lower())
