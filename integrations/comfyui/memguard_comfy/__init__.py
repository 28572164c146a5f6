"""The ComfyUI side of memguard: a model adapter over ComfyUI's MODEL/CLIP, ComfyUI's sampling as the core's
generator, and the V3 nodes."""
