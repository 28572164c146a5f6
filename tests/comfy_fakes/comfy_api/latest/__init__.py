"""Fake of ComfyUI v0.3.64's ``comfy_api.latest``: ``io`` and ``ComfyExtension``."""

from __future__ import annotations

from abc import ABC, abstractmethod

from . import _io as io


class ComfyExtension(ABC):
    async def on_load(self) -> None:  # noqa: B027 (optional hook, as in ComfyUI)
        """Called when the extension is loaded."""

    @abstractmethod
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        """The nodes of the extension."""


__all__ = ["ComfyExtension", "io"]
