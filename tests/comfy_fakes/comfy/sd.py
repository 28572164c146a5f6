"""Fake of ``comfy.sd.CLIP`` over a diffusers pipeline's tokenizers and text encoders.

``tokenize`` then ``encode_from_tokens(..., return_pooled=True)`` -> ``(cond [1, L, D], pooled)``, the pooled
output being None for SD 1.x/2.x here and the family's pooled text embedding for SDXL, SD3 and FLUX, as
ComfyUI's CLIP of each family returns them. The embeddings are those of the pipeline's own ``encode_prompt``
(with its ``__call__`` defaults), so a test can compare with memguard's diffusers adapter on the same embeddings.
"""

from __future__ import annotations

from typing import Any

import torch


class CLIP:
    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        self.cond_stage_model = torch.nn.ModuleList([m for m in encoders if isinstance(m, torch.nn.Module)])
        self.encoded: list[str] = []

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> dict[str, str]:
        return {"l": text}

    @torch.no_grad()
    def encode_from_tokens(self, tokens: dict[str, str], return_pooled: bool = False, return_dict: bool = False):
        text = tokens["l"]
        self.encoded.append(text)
        cpu = torch.device("cpu")
        name = type(self.pipe).__name__
        if name == "StableDiffusionXLPipeline":
            cond, _, pooled, _ = self.pipe.encode_prompt([text], device=cpu, num_images_per_prompt=1,
                                                         do_classifier_free_guidance=False)
        elif name == "StableDiffusion3Pipeline":
            cond, _, pooled, _ = self.pipe.encode_prompt(prompt=[text], prompt_2=None, prompt_3=None, device=cpu,
                                                         num_images_per_prompt=1, do_classifier_free_guidance=False,
                                                         max_sequence_length=256)
        elif name == "FluxPipeline":
            cond, pooled, _ = self.pipe.encode_prompt(prompt=[text], prompt_2=None, device=cpu,
                                                      num_images_per_prompt=1, max_sequence_length=512)
        else:
            cond, _ = self.pipe.encode_prompt([text], cpu, 1, False)
            pooled = None
        if return_pooled:
            return cond, pooled
        return cond
