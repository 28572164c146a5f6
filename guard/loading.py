"""Loading pipelines from disk through the normal diffusers ``from_pretrained`` path."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .errors import MemguardError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(MemguardError, RuntimeError):
    """A pipeline could not be loaded; the message says from where and why."""


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def _saved_without(path: Path | None) -> dict[str, None]:
    """Components a local pipeline was saved without (``[null, null]`` in model_index.json, e.g. SD3 with
    ``text_encoder_3=None``): diffusers only loads such a directory when they are passed as None again."""
    if path is None:
        return {}
    index = json.loads((path / "model_index.json").read_text())
    return {
        name: None
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and len(value) == 2 and value == [None, None]
    }


def load_pipeline(model: str | os.PathLike, *, device: str | None = None, dtype: str | None = None) -> Any:
    """A diffusers pipeline from a local directory (or a hub id where a hub is reachable).

    ``dtype`` defaults to float16 on CUDA and float32 elsewhere.
    """
    from diffusers import DiffusionPipeline

    device = device or default_device()
    dtype_name = dtype or ("float16" if device.startswith("cuda") else "float32")
    if dtype_name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype_name!r}; choose one of {', '.join(DTYPES)}")
    path = Path(model)
    looks_local = path.exists() or str(model).startswith((".", "/", "~")) or os.sep in str(model).strip("/")
    if looks_local and not (path / "model_index.json").is_file():
        reason = "does not exist" if not path.exists() else "has no model_index.json"
        raise ModelLoadError(f"cannot load model from {model}: the directory {reason} (expected a diffusers pipeline)")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = DiffusionPipeline.from_pretrained(
                str(model), torch_dtype=DTYPES[dtype_name], **_saved_without(path if looks_local else None)
            )
    except Exception as error:  # diffusers raises many kinds; the caller needs one clear line
        raise ModelLoadError(f"cannot load model from {model}: {type(error).__name__}: {error}") from error
    pipe.to(device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    return pipe
