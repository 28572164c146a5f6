"""Fake of ``comfy.model_management``: loading a patcher applies its patches (unpatching the one that held the
model before, as ComfyUI does when another clone of the same model is loaded) and is recorded."""

from __future__ import annotations

from typing import Any

loaded: list[Any] = []
load_calls: list[Any] = []


def load_models_gpu(
    models: list[Any],
    memory_required: int = 0,
    force_patch_weights: bool = False,
    minimum_memory_required: int | None = None,
    force_full_load: bool = False,
) -> None:
    for model in models:
        load_calls.append(model)
        if model in loaded:
            continue
        for other in [m for m in loaded if m.model is model.model]:
            other.unpatch_model()
            loaded.remove(other)
        model.patch_model()
        loaded.append(model)
