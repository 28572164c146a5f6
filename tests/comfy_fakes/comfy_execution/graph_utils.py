"""Fake of ComfyUI v0.3.64's ``comfy_execution.graph_utils.ExecutionBlocker``: a node output value that stops the
nodes downstream of it (with a message, they report an error event; without one, they stay silent)."""

from __future__ import annotations


class ExecutionBlocker:
    def __init__(self, message: str | None) -> None:
        self.message = message
