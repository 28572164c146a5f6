"""memguard's operational log events (not the audit trail): structured, through the standard ``logging``.

Events go to the ``memguard`` logger as ``key=value`` lines, rendered by a structlog processor chain of
memguard's own, so they show up in whatever logging the application set up and memguard configures
neither logging nor structlog globally.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog

__all__ = ["log_event"]

_logger = structlog.wrap_logger(
    logging.getLogger("memguard"),
    processors=[structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True)],
    wrapper_class=structlog.stdlib.BoundLogger,
    context_class=dict,
    cache_logger_on_first_use=False,
)


def log_event(event: str, *, level: str = "info", **fields: Any) -> None:
    """Log one structured event (``level``: debug, info, warning, error)."""
    getattr(_logger, level)(event, **fields)
