"""Fake of the ``comfy.utils`` helpers the fakes use."""

from __future__ import annotations

import math

import torch

#: Whether samplers show progress bars (``comfy.utils.set_progress_bar_enabled``).
PROGRESS_BAR_ENABLED = True


def repeat_to_batch_size(tensor: torch.Tensor, batch_size: int, dim: int = 0) -> torch.Tensor:
    """Cut or repeat ``tensor`` along ``dim`` to ``batch_size`` rows (a no-op at the right size)."""
    if tensor.shape[dim] > batch_size:
        return tensor.narrow(dim, 0, batch_size)
    if tensor.shape[dim] < batch_size:
        repeats = [1] * tensor.ndim
        repeats[dim] = math.ceil(batch_size / tensor.shape[dim])
        return tensor.repeat(repeats).narrow(dim, 0, batch_size)
    return tensor
