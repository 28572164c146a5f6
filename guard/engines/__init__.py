"""Scan engines: score a prompt file into JSONL, in one process (``local``) or on a Ray cluster (``ray``).

Both engines share the job description, the row format and the resume logic in ``base``, so their
output files are interchangeable and either can resume the other's interrupted run.
"""

from .base import ScanError, ScanJob, format_row
from .local import scan_local

__all__ = ["ScanError", "ScanJob", "format_row", "scan_local", "scan_ray"]


def __getattr__(name: str):
    # Ray is an optional extra: import it only when the Ray engine is asked for.
    if name == "scan_ray":
        from .ray_engine import scan_ray

        return scan_ray
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
