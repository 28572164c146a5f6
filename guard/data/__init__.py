"""Data shipped with memguard: the generic captions used for automatic calibration."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib.resources import files

__all__ = ["generic_captions", "generic_captions_id"]


@lru_cache(maxsize=1)
def _text() -> str:
    return files(__name__).joinpath("generic_captions.txt").read_text(encoding="utf-8")


def generic_captions() -> list[str]:
    """Everyday captions no model has memorized (made by ``make_generic_captions.py``), for calibration."""
    return [line for line in _text().splitlines() if line.strip()]


def generic_captions_id() -> str:
    """Identifies this caption set, so calibrations cached from an older set are not reused."""
    return f"generic-captions-{hashlib.sha256(_text().encode('utf-8')).hexdigest()[:12]}"
