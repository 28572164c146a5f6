"""The ComfyUI side of memguard: a model adapter over ComfyUI's MODEL/CLIP, and the V3 nodes."""
