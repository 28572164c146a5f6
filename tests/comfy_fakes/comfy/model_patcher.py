"""Fake of ``comfy.model_patcher.ModelPatcher``: the MODEL object nodes receive."""

from __future__ import annotations

from typing import Any

import torch


class ModelPatcher:
    def __init__(self, model: Any, load_device: torch.device | str = "cpu", offload_device: Any = "cpu") -> None:
        self.model = model
        self.load_device = torch.device(load_device)
        self.offload_device = offload_device
        self.model_options: dict[str, Any] = {"transformer_options": {}}
