"""Print the README's command block marked ``<!-- ci: NAME -->`` (the line right above its fence).

`.ci/run` runs what this prints, so CI runs the README's own set-up and test commands: an edit to the README is
an edit to CI. Every other shell block of the README must be marked ``<!-- template -->`` (placeholders, or
hardware this machine lacks) or ``<!-- tested: PATH -->`` (a test runs it); `tests/test_readme.py` checks that.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SHELL_FENCE = re.compile(r"^```(?:bash|sh|shell|console)\s*$")
MARKER = re.compile(r"^<!--\s*(ci:\s*[\w-]+|template|tested:\s*\S+)\s*-->\s*$")


def shell_blocks(text: str) -> list[tuple[str | None, str, int]]:
    """Every shell block as ``(marker or None, body, line number of its fence)``."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if SHELL_FENCE.match(lines[i]):
            start = i
            body = []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            above = lines[start - 1].strip() if start > 0 else ""
            match = MARKER.match(above)
            marker = re.sub(r"\s+", " ", match.group(1)).replace(": ", ":") if match else None
            blocks.append((marker, "\n".join(body) + "\n", start + 1))
        i += 1
    return blocks


def block(name: str, text: str | None = None) -> str:
    found = [body for marker, body, _ in shell_blocks(text or README.read_text(encoding="utf-8"))
             if marker == f"ci:{name}"]
    if len(found) != 1:
        raise SystemExit(f"README.md: expected one shell block marked <!-- ci: {name} -->, found {len(found)}")
    return found[0]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: readme_commands.py setup|test")
    sys.stdout.write(block(sys.argv[1]))
