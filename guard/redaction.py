"""Keeping prompt text out of libraries' logs when the policy does not log prompts in plain text.

diffusers warns with the cut-off part of an over-long prompt ("The following part of your input was
truncated ..."). With ``audit.prompt: hash`` or ``redact`` that text must not reach any log, so while the
guard encodes and generates, such records from the pipeline's modules are rewritten without the text.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

__all__ = ["RedactPromptText", "redacted_library_logs"]

REDACTED_MESSAGE = "part of a prompt was truncated by the tokenizer (text redacted by memguard's audit policy)"
_MARKERS = ("truncated", "input was cut")


class RedactPromptText(logging.Filter):
    """Replaces log messages that quote prompt text with a fixed one."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record is left for logging to report
            return True
        if any(marker in message for marker in _MARKERS):
            record.msg, record.args = REDACTED_MESSAGE, ()
        return True


def _module_loggers(model: Any) -> list[logging.Logger]:
    """The loggers of every module the pipeline's class (and its bases) is defined in; ``model`` is a pipeline
    or an adapter holding one (``.pipe``)."""
    pipe = getattr(model, "pipe", model)
    names = {cls.__module__ for cls in type(pipe).__mro__ if cls.__module__.startswith(("diffusers", "transformers"))}
    return [logging.getLogger(name) for name in sorted(names)]


@contextlib.contextmanager
def redacted_library_logs(model: Any, enabled: bool = True) -> Iterator[None]:
    """While active, the pipeline's modules log no prompt text."""
    if not enabled:
        yield
        return
    loggers = _module_loggers(model)
    redactor = RedactPromptText()
    for logger in loggers:
        logger.addFilter(redactor)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(redactor)
