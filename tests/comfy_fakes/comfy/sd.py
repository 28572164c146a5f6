"""Fake of ``comfy.sd.CLIP`` over a diffusers pipeline's tokenizer and text encoder."""

from __future__ import annotations

from typing import Any

import torch


class CLIP:
    """``tokenize`` then ``encode_from_tokens(..., return_pooled=True)`` -> ``(cond [1, L, D], pooled)``.

    The embeddings are those of the pipeline's own ``encode_prompt``, so a test can compare with memguard's
    diffusers adapter for the same text embeddings.
    """

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.cond_stage_model = pipe.text_encoder
        self.encoded: list[str] = []

    def tokenize(self, text: str, return_word_ids: bool = False, **kwargs: Any) -> dict[str, str]:
        return {"l": text}

    def encode_from_tokens(self, tokens: dict[str, str], return_pooled: bool = False, return_dict: bool = False):
        text = tokens["l"]
        self.encoded.append(text)
        with torch.no_grad():
            cond, _ = self.pipe.encode_prompt([text], torch.device("cpu"), 1, False)
        if return_pooled:
            return cond, None
        return cond
