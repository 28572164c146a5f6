"""Reading prompt files and writing score files (JSONL), shared by the CLI commands."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from .errors import MemguardError


class PromptFileError(MemguardError, ValueError):
    """A prompt file is missing, unreadable or empty."""


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Every non-blank line of ``path``, as given (without its newline)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"prompt file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PromptFileError(f"cannot read prompt file {path}: {error}") from None
    prompts = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise PromptFileError(f"prompt file {path} has no non-blank lines")
    return prompts


def _complete_lines(path: Path) -> Iterator[tuple[bytes, dict]]:
    """Each complete JSON line with its parsed row, stopping at a torn or unparsable one."""
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.endswith(b"\n"):
                return
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                return
            yield raw, row


def completed_rows(path: str | os.PathLike) -> Iterator[dict]:
    """Complete JSON rows already in a results file; a torn last line (interrupted write) is ignored."""
    path = Path(path)
    if path.exists():
        yield from (row for _, row in _complete_lines(path))


def truncate_to_complete_rows(path: str | os.PathLike) -> int:
    """Cut a results file after its last complete row; returns how many rows remain."""
    path = Path(path)
    if not path.exists():
        return 0
    keep, rows = 0, 0
    for raw, _ in _complete_lines(path):
        keep += len(raw)
        rows += 1
    with path.open("r+b") as handle:
        handle.truncate(keep)
    return rows
