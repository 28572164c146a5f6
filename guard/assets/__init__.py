"""Assets shipped inside the package: memguard's own memorizing model (the demo's default)."""

from __future__ import annotations

from pathlib import Path

SHIPPED_MODEL = Path(__file__).resolve().parent / "memorizer"


def shipped_calibration_path(model: Path = SHIPPED_MODEL) -> Path | None:
    """The calibration profile shipped beside a model directory, if there is one."""
    path = Path(model) / "calibration.json"
    return path if path.exists() else None
