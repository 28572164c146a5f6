"""Fake of ``comfy.model_management``: records which patchers were loaded."""

from __future__ import annotations

from typing import Any

loaded: list[Any] = []


def load_models_gpu(
    models: list[Any],
    memory_required: int = 0,
    force_patch_weights: bool = False,
    minimum_memory_required: int | None = None,
    force_full_load: bool = False,
) -> None:
    for model in models:
        if model not in loaded:
            loaded.append(model)
