"""Text conditioning as a denoiser consumes it, batched along dim 0."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TextConditioning:
    """Token embeddings (``[B, L, D]``) and what some families add to them.

    ``pooled`` (``[B, P]``) is the pooled text embedding of SDXL, SD3 and FLUX; ``mask`` (``[B, L]``)
    the attention mask PixArt's T5 conditioning comes with. ``truncated`` says, per row, whether the
    prompt was longer than the tokenizer's limit.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    truncated: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.truncated:
            self.truncated = [False] * self.embeds.shape[0]

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        return fn(self.embeds), _maybe(fn, self.pooled), _maybe(fn, self.mask)

    def select(self, index: slice | list[int]) -> TextConditioning:
        """Rows ``index`` (a slice keeps views, a list copies)."""
        if isinstance(index, slice):
            return TextConditioning(*self._map(lambda t: t[index]), self.truncated[index])
        rows = list(index)
        return TextConditioning(*self._map(lambda t: t[rows]), [self.truncated[i] for i in rows])

    def repeat_each(self, times: int) -> TextConditioning:
        """Each row ``times`` times in a row (row j becomes rows j*times .. j*times+times-1)."""
        if times == 1:
            return self
        flags = [flag for flag in self.truncated for _ in range(times)]
        return TextConditioning(*self._map(lambda t: t.repeat_interleave(times, dim=0)), flags)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextConditioning:
        """Embeddings on ``device`` in ``dtype``; the mask keeps its integer dtype."""
        pooled = _maybe(lambda t: t.to(device=device, dtype=dtype), self.pooled)
        mask = _maybe(lambda t: t.to(device=device), self.mask)
        return TextConditioning(self.embeds.to(device=device, dtype=dtype), pooled, mask, list(self.truncated))

    def detach(self) -> TextConditioning:
        return TextConditioning(*self._map(torch.Tensor.detach), list(self.truncated))

    def clone(self) -> TextConditioning:
        return TextConditioning(*self._map(torch.Tensor.clone), list(self.truncated))

    @staticmethod
    def cat(parts: list[TextConditioning]) -> TextConditioning:
        def joined(name: str) -> torch.Tensor | None:
            tensors = [getattr(part, name) for part in parts]
            return None if tensors[0] is None else torch.cat(tensors)

        flags = [flag for part in parts for flag in part.truncated]
        return TextConditioning(joined("embeds"), joined("pooled"), joined("mask"), flags)


def _maybe(fn, tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else fn(tensor)
