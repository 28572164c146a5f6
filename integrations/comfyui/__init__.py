"""memguard for ComfyUI: the Memorization-Guarded KSampler, Memorization Guard and Memorization Score nodes.

ComfyUI loads this folder from ``custom_nodes/`` and calls ``comfy_entrypoint`` (V3 node API). There is
deliberately no ``NODE_CLASS_MAPPINGS``: ComfyUI would then take the V1 path and ignore the entry point.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .memguard_comfy.nodes import NODES


class MemguardExtension(ComfyExtension):
    """The node pack as ComfyUI's V3 loader sees it."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> MemguardExtension:
    return MemguardExtension()
