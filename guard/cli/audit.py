"""``memguard audit``: commands that inspect audit logs."""

from __future__ import annotations

from pathlib import Path

import click

from guard.audit.verify import verify_log

__all__ = ["audit", "verify"]


@click.group(name="audit")
def audit() -> None:
    """Inspect memguard audit logs."""


@audit.command(name="verify")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
def verify(file: Path) -> None:
    """Check FILE's hash chain: exit 0 if intact, 1 naming the first bad line, 2 if unreadable."""
    try:
        report = verify_log(file)
    except OSError as err:
        click.echo(f"{file}: cannot read: {err.strerror or err}", err=True)
        raise SystemExit(2) from None
    if report.ok:
        click.echo(str(report))
        return
    click.echo(str(report), err=True)
    raise SystemExit(1)
