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


# ---------------------------------------------------------------------------------------------- DiT / flow families


def build_t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 512):
    """A T5 tokenizer over ``words`` (one Unigram piece per word, ``</s>`` appended, ``<pad>`` = 0).

    It is transformers' own ``T5Tokenizer`` class, so pipelines save and reload it like a real T5 tokenizer;
    unknown words become ``<unk>``.
    """
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word.lower(), -5.0) for word in dict.fromkeys(words)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _t5_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=d_model,
            d_kv=8,
            d_ff=2 * d_model,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    )


def _vae_x8(shift_factor: float | None = None, scaling_factor: float = 0.18215):
    """A tiny VAE with four levels, so ``vae_scale_factor`` is 8 as in the full-size models
    (PixArt's resolution bins and FLUX's packing are defined in pixels)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=32,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def tiny_sd3_pipeline(seed: int = 0, three_encoders: bool = True):
    """A random-weight ``StableDiffusion3Pipeline``: two CLIP encoders and, unless ``three_encoders`` is
    False (``text_encoder_3=None``, as SD3 can be run without T5), a T5 encoder. Native size 256 px."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_word_tokenizer(), build_word_tokenizer()
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae_x8(shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, hidden_size=32)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_size=32)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(build_t5_tokenizer(), d_model=64) if three_encoders else None,
        tokenizer_3=build_t5_tokenizer() if three_encoders else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A random-weight ``FluxPipeline``: FLUX.1-dev style (guidance embedding, resolution-dependent shift)
    or, with ``guidance_embeds=False``, schnell style (no guidance input, shift 1).

    Native size is FluxPipeline's own: a 128 x 128 latent (4096 tokens). Tests that need speed lower
    ``pipe.default_sample_size`` on their copy; ``from_pretrained`` always restores 128.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_word_tokenizer(), build_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
        guidance_embeds=guidance_embeds,
    )
    if guidance_embeds:
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        )
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=_vae_x8(shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=CLIPTextModel(_text_config(tokenizer, hidden_size=32)),
        tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(tokenizer_2, d_model=32),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_pipeline(kind: str = "alpha", seed: int = 0):
    """A random-weight ``PixArtAlphaPipeline`` (``kind="alpha"``: 1024 px layout, ``sample_size`` 128, so it
    takes resolution / aspect-ratio inputs) or ``PixArtSigmaPipeline`` (``kind="sigma"``: 256 px layout).
    Both have a learned-sigma transformer (8 output channels for 4 latent channels) and PixArt's
    DPM-Solver scheduler config (spelled out, as PixArt's saved config spells it)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    if kind not in ("alpha", "sigma"):
        raise ValueError(f"kind must be 'alpha' or 'sigma', got {kind!r}")
    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer()
    alpha = kind == "alpha"
    transformer = PixArtTransformer2DModel(
        sample_size=128 if alpha else 32,
        patch_size=8 if alpha else 2,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        attention_head_dim=12,
        num_attention_heads=2,
        cross_attention_dim=24,
        caption_channels=32,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=None if alpha else False,
    )
    pipeline_class = PixArtAlphaPipeline if alpha else PixArtSigmaPipeline
    pipe = pipeline_class(
        tokenizer=tokenizer,
        text_encoder=_t5_encoder(tokenizer, d_model=32),
        vae=_vae_x8(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(
            beta_schedule="linear", beta_start=0.0001, beta_end=0.02, num_train_timesteps=1000,
            prediction_type="epsilon", solver_order=2, algorithm_type="dpmsolver++", timestep_spacing="linspace",
            steps_offset=0,
        ),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
