"""Fake of ComfyUI v0.3.64's comfy package (tests only)."""
