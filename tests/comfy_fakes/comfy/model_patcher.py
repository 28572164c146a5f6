"""Fake of ``comfy.model_patcher.ModelPatcher``: the MODEL object nodes receive, with object patches (what the
``ModelSamplingSD3`` / ``ModelSamplingFlux`` nodes add) applied when the model is loaded, as in ComfyUI. Clones
share the model and the backup of patched attributes, so ``get_model_object`` answers each clone's own object
even while another clone's patch is applied to the shared model."""

from __future__ import annotations

import uuid
from typing import Any

import torch


class ModelPatcher:
    def __init__(self, model: Any, load_device: torch.device | str = "cpu", offload_device: Any = "cpu") -> None:
        self.model = model
        self.load_device = torch.device(load_device)
        self.offload_device = offload_device
        self.model_options: dict[str, Any] = {"transformer_options": {}}
        self.object_patches: dict[str, Any] = {}
        self.object_patches_backup: dict[str, Any] = {}
        self.patches_uuid = uuid.uuid4()

    def clone(self) -> ModelPatcher:
        clone = ModelPatcher(self.model, self.load_device, self.offload_device)
        clone.model_options = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.model_options.items()}
        clone.object_patches = dict(self.object_patches)
        clone.object_patches_backup = self.object_patches_backup
        clone.patches_uuid = self.patches_uuid
        return clone

    def set_model_sampler_cfg_function(self, sampler_cfg_function: Any, disable_cfg1_optimization: bool = False
                                       ) -> None:
        """The CFG hook samplers call instead of ``uncond + (cond - uncond) * cfg`` (``samplers.cfg_function``)."""
        self.model_options["sampler_cfg_function"] = sampler_cfg_function
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def add_object_patch(self, name: str, obj: Any) -> None:
        self.object_patches[name] = obj

    def get_model_object(self, name: str) -> Any:
        """The object the sampler will see: an object patch, else the model's own attribute."""
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        obj = self.model
        for part in name.split("."):
            obj = getattr(obj, part)
        return obj

    def patch_model(self) -> None:
        for name, obj in self.object_patches.items():
            if name not in self.object_patches_backup:
                self.object_patches_backup[name] = getattr(self.model, name)
            setattr(self.model, name, obj)

    def unpatch_model(self) -> None:
        for name, obj in self.object_patches_backup.items():
            setattr(self.model, name, obj)
        self.object_patches_backup.clear()
