"""PixArt-alpha and PixArt-Sigma: a DiT with T5 conditioning on a discrete eps schedule (docs/scoring.md, "Per family").

Section 1 applies unchanged: t_hi/t_lo from a 50-step DDIM schedule built from the pipeline's scheduler
config (not the pipeline's own DPM-Solver), the first ``in_channels`` output channels of a learned-sigma
transformer, T5 embeddings with their attention masks (u = the pipeline's own embedding of ""), and for
PixArt-alpha at 1024 px the resolution / aspect-ratio inputs its pipeline passes at the native size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ...compat import pixart_text_preprocessing
from ..conditioning import TextConditioning
from .flow import call_default, require_components
from .stable_diffusion import DiscreteDiffusionAdapter, require_prediction_type

#: The resolution bins (diffusers' names) each pipeline's ``use_resolution_binning`` uses, by transformer
#: ``sample_size``; a size not listed is the call's own "Invalid sample size" error.
_BINS = {
    "alpha": {128: "ASPECT_RATIO_1024_BIN", 64: "ASPECT_RATIO_512_BIN", 32: "ASPECT_RATIO_256_BIN"},
    "sigma": {
        256: "ASPECT_RATIO_2048_BIN", 128: "ASPECT_RATIO_1024_BIN", 64: "ASPECT_RATIO_512_BIN",
        32: "ASPECT_RATIO_256_BIN",
    },
}


class PixArtAdapter(DiscreteDiffusionAdapter):
    """``PixArtAlphaPipeline`` and ``PixArtSigmaPipeline``, with their call defaults (T5 length 120 / 300,
    ``clean_caption=True``, which the pipeline itself turns off when bs4/ftfy are missing)."""

    family = "pixart"
    default_profile = "pixart"
    leading_bos = False  # T5 embeddings
    text_encoders = ("text_encoder",)
    prompt_arguments = ("prompt",)

    def __init__(self, pipe: Any) -> None:
        require_components(pipe, ("transformer", "scheduler", "encode_prompt"), "PixArt")
        super().__init__(pipe, pipe.transformer)
        self.transformer = pipe.transformer
        self.prediction_type = require_prediction_type(pipe.scheduler.config, self.model_class)
        config = self.transformer.config
        size = int(config.sample_size)
        self.latent_shape = (int(config.in_channels), size, size)
        self.learned_sigma = int(config.out_channels) // 2 == int(config.in_channels)
        from diffusers import PixArtAlphaPipeline

        self.kind = "alpha" if isinstance(pipe, PixArtAlphaPipeline) else "sigma"
        #: PixArt-alpha's call passes resolution / aspect-ratio inputs for a 1024 px transformer; Sigma's never.
        self.resolution_inputs = self.kind == "alpha" and size == 128

    def _options(self, encode_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        options = dict(encode_kwargs)
        for name in ("clean_caption", "max_sequence_length"):
            if options.get(name) is None:
                options[name] = call_default(self.pipe, name)
        return options

    def encode(self, prompts: Sequence[str], **encode_kwargs: Any) -> TextConditioning:
        options = self._options(encode_kwargs)
        embeds, mask, _, _ = self.pipe.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, num_images_per_prompt=1, device=self.device, **options
        )
        texts = pixart_text_preprocessing(self.pipe, list(prompts), clean_caption=options["clean_caption"])
        truncated = self.truncated(texts, [("tokenizer", int(options["max_sequence_length"]))])
        return TextConditioning(embeds, mask=mask, truncated=truncated)

    @torch.no_grad()
    def unconditional(self) -> TextConditioning:
        """Computed without autograd, as the pipeline's ``__call__`` computes it: grad mode changes T5's
        kernels at the 1e-6 level, and nothing is ever differentiated through u."""
        _, _, negative, negative_mask = self.pipe.encode_prompt(
            [""],
            do_classifier_free_guidance=True,
            negative_prompt=call_default(self.pipe, "negative_prompt"),
            num_images_per_prompt=1,
            device=self.device,
            **self._options({}),
        )
        return TextConditioning(negative, mask=negative_mask)

    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if self.resolution_inputs:  # the call passes its (binned) size: the native size when scoring
            scale = int(getattr(self.pipe, "vae_scale_factor", 8))
            height, width = sample.shape[-2] * scale, sample.shape[-1] * scale
            rows, options = sample.shape[0], {"dtype": cond.embeds.dtype, "device": sample.device}
            added = {
                "resolution": torch.tensor([height, width]).repeat(rows, 1).to(**options),
                "aspect_ratio": torch.tensor([float(height / width)]).repeat(rows, 1).to(**options),
            }
        output = self.transformer(
            sample,
            encoder_hidden_states=cond.embeds,
            encoder_attention_mask=cond.mask,
            timestep=timesteps,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return output.chunk(2, dim=1)[0] if self.learned_sigma else output

    def encode_options(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        names = ("clean_caption", "max_sequence_length")
        return {name: arguments[name] for name in names if arguments.get(name) is not None}

    def call_size(self, arguments: Mapping[str, Any]) -> tuple[Any, Any]:
        """The call's size after its resolution binning (on by default), which decides the latents' shape."""
        height, width = super().call_size(arguments)
        binning = arguments.get("use_resolution_binning")
        if binning is None:
            binning = call_default(self.pipe, "use_resolution_binning")
        if not binning:
            return height, width
        from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma

        name = _BINS[self.kind].get(int(self.transformer.config.sample_size))
        if name is None:
            raise ValueError("Invalid sample size")
        ratios = getattr(pipeline_pixart_sigma, name)
        return self.pipe.image_processor.classify_height_width_bin(height, width, ratios=ratios)
