"""Fake of ``comfy.conds`` (v0.3.64): the wrappers ``extra_conds`` returns and the sampler processes per batch."""

from __future__ import annotations

import math
from typing import Any

import torch

from .utils import repeat_to_batch_size


class CONDRegular:
    """A tensor input of ``apply_model``; ``process_cond`` repeats it to the batch size."""

    def __init__(self, cond: Any) -> None:
        self.cond = cond

    def _copy_with(self, cond: Any) -> CONDRegular:
        return self.__class__(cond)

    def process_cond(self, batch_size: int, **kwargs: Any) -> CONDRegular:
        return self._copy_with(repeat_to_batch_size(self.cond, batch_size))

    def can_concat(self, other: CONDRegular) -> bool:
        return self.cond.shape == other.cond.shape

    def concat(self, others: list[CONDRegular]) -> torch.Tensor:
        return torch.cat([self.cond] + [other.cond for other in others])


class CONDNoiseShape(CONDRegular):
    """An input shaped like the noise (``c_concat``); ``area`` crops it as the sampler's area conditioning does."""

    def process_cond(self, batch_size: int, area: Any, **kwargs: Any) -> CONDNoiseShape:
        data = self.cond
        if area is not None:
            dims = len(area) // 2
            for i in range(dims):
                data = data.narrow(i + 2, area[i + dims], area[i])
        return self._copy_with(repeat_to_batch_size(data, batch_size))


class CONDCrossAttn(CONDRegular):
    """Cross-attention context; different token lengths are concatenated by repeating up to their lcm."""

    def can_concat(self, other: CONDRegular) -> bool:
        a, b = self.cond.shape, other.cond.shape
        if a == b:
            return True
        return a[0] == b[0] and a[2] == b[2] and math.lcm(a[1], b[1]) // min(a[1], b[1]) <= 4

    def concat(self, others: list[CONDRegular]) -> torch.Tensor:
        conds = [self.cond] + [other.cond for other in others]
        length = math.lcm(*[c.shape[1] for c in conds])
        return torch.cat([c.repeat(1, length // c.shape[1], 1) for c in conds])


class CONDConstant(CONDRegular):
    """A non-tensor constant passed as is."""

    def process_cond(self, batch_size: int, **kwargs: Any) -> CONDConstant:
        return self._copy_with(self.cond)
