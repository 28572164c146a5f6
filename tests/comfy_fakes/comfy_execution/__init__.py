"""Fake of ComfyUI v0.3.64's comfy_execution package (tests only)."""
