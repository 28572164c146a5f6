"""``memguard audit``: commands that inspect audit logs."""

from __future__ import annotations

from pathlib import Path

import click

from guard.audit.verify import verify_log

__all__ = ["audit", "report", "summary", "verify"]


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


def _filter_options(command):
    """The record filters shared by ``summary`` and ``report``."""
    options = [
        click.option("--since", default=None, help="Only records at or after this ISO 8601 time (UTC if no zone)."),
        click.option("--until", default=None, help="Only records before this ISO 8601 time (UTC if no zone)."),
        click.option("--action", "actions", multiple=True, type=click.Choice(["allow", "warn", "rewrite", "block"]),
                     help="Only records with this action (repeatable)."),
        click.option("--policy", "policies", multiple=True, help="Only records of this policy name (repeatable)."),
        click.option("--bucket", default="auto", show_default=True, type=click.Choice(["auto", "hour", "day"]),
                     help="Timeline bucket (auto: hourly for spans up to 3 days, else daily)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _summarize(file: Path, since, until, actions, policies):
    from guard.audit.review import AuditFilter, parse_time, summarize

    try:
        filters = AuditFilter(
            since=parse_time(since) if since else None,
            until=parse_time(until) if until else None,
            actions=frozenset(actions),
            policies=frozenset(policies),
        )
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--since/--until") from None
    try:
        return summarize(file, filters)
    except OSError as err:
        raise click.ClickException(f"{file}: cannot read: {err.strerror or err}") from None


@audit.command(name="summary")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@_filter_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def summary(file: Path, since, until, actions, policies, bucket, as_json) -> None:
    """Counts per action and rule, score quantiles, blocked/rewritten over time and errors of FILE.

    One streaming pass with bounded memory, so logs of millions of records work; quantiles are exact
    up to 100 000 scores and estimated from a uniform sample beyond.
    """
    import json

    from guard.audit.review import render_text

    result = _summarize(file, since, until, actions, policies)
    if as_json:
        click.echo(json.dumps(result.to_dict(bucket), indent=1, ensure_ascii=False))
    else:
        click.echo(render_text(result, bucket))


@audit.command(name="report")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="HTML file to write.")
@_filter_options
def report(file: Path, out: Path, since, until, actions, policies, bucket) -> None:
    """Write a self-contained HTML report of FILE: chain status, score histogram with the policy thresholds,
    decisions over time, blocked/rewritten requests and errors (no scripts, no network resources)."""
    from guard.audit.report import write_report

    result = _summarize(file, since, until, actions, policies)
    written = write_report(result, verify_log(file), out, bucket=bucket)
    click.echo(f"report of {result.matched} records -> {written}")
