"""Text conditioning as the UNet consumes it, batched along dim 0."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TextConditioning:
    """Token embeddings (``[B, L, D]``) and, for SDXL-like models, pooled embeddings (``[B, P]``)."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    truncated: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.truncated:
            self.truncated = [False] * self.embeds.shape[0]

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def select(self, index: slice | list[int]) -> TextConditioning:
        if isinstance(index, slice):
            pooled = None if self.pooled is None else self.pooled[index]
            return TextConditioning(self.embeds[index], pooled, self.truncated[index])
        rows = list(index)
        pooled = None if self.pooled is None else self.pooled[rows]
        return TextConditioning(self.embeds[rows], pooled, [self.truncated[i] for i in rows])

    def repeat_each(self, times: int) -> TextConditioning:
        """Each row ``times`` times in a row (row j becomes rows j*times .. j*times+times-1)."""
        if times == 1:
            return self
        pooled = None if self.pooled is None else self.pooled.repeat_interleave(times, dim=0)
        flags = [flag for flag in self.truncated for _ in range(times)]
        return TextConditioning(self.embeds.repeat_interleave(times, dim=0), pooled, flags)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextConditioning:
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return TextConditioning(self.embeds.to(device=device, dtype=dtype), pooled, list(self.truncated))

    def detach(self) -> TextConditioning:
        pooled = None if self.pooled is None else self.pooled.detach()
        return TextConditioning(self.embeds.detach(), pooled, list(self.truncated))

    @staticmethod
    def cat(parts: list[TextConditioning]) -> TextConditioning:
        embeds = torch.cat([part.embeds for part in parts])
        pooled = None if parts[0].pooled is None else torch.cat([part.pooled for part in parts])
        return TextConditioning(embeds, pooled, [flag for part in parts for flag in part.truncated])
