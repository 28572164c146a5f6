"""Shared helpers for the benchmark scripts: loading, prompt files, timing, tables."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from guard.loading import load_pipeline
from guard.prompts_io import read_prompts

T = TypeVar("T")
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "guard" / "assets" / "memorizer"
MEMORIZER_PROMPTS = Path(__file__).resolve().parent / "memorizer" / "prompts"


def setup(threads: int) -> None:
    """Fix the thread count: timings on a shared CPU are meaningless otherwise (NOTES.md)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load(model: str | Path, device: str | None = None) -> Any:
    return load_pipeline(model, device=device or "cpu", dtype="float32")


def prompts_from(path: str | Path, limit: int | None = None) -> list[str]:
    prompts = read_prompts(path)
    return prompts[:limit] if limit else prompts


def timed(fn: Callable[[], T], device: str = "cpu") -> tuple[T, float]:
    """``(result, seconds)``, synchronizing the accelerator so GPU work is counted."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-flavoured Markdown table, so output pastes into the README as is."""
    cells = [[_cell(v) for v in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)
