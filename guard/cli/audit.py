"""``memguard audit``: commands that inspect audit logs."""

from __future__ import annotations

from pathlib import Path

import click

from guard.audit.verify import VerifyReport, verify_log

__all__ = ["audit", "keygen", "report", "summary", "verify"]


@click.group(name="audit")
def audit() -> None:
    """Inspect memguard audit logs."""


@audit.command(name="keygen")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for NAME.key (private, mode 0600) and NAME.pub (public).")
@click.option("--name", default="memguard-audit", show_default=True, help="File name stem of the key pair.")
@click.option("--force", is_flag=True, help="Replace an existing key pair (its checkpoints then need the old .pub).")
def keygen(out_dir: Path, name: str, force: bool) -> None:
    """Make an Ed25519 key pair for signed audit checkpoints.

    Point MEMGUARD_AUDIT_SIGNING_KEY (or the policy's audit.signing_key) at the .key file on the machines
    that write the log; verify with the .pub file, kept where reviewers are.
    """
    from guard.audit.signing import KeyFileError, generate_keypair, key_id_of, load_public_key

    try:
        private, public = generate_keypair(out_dir, name, overwrite=force)
    except KeyFileError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"key id {key_id_of(load_public_key(public))}\nprivate key: {private} (mode 0600; keep it secret)\n"
               f"public key:  {public}")


def _public_key_option(command):
    return click.option(
        "--public-key", "public_keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
        help="Verify checkpoint signatures with this public key (.pub); repeat for rotated keys.")(command)


def _target(paths: tuple[Path, ...]) -> Path | list[Path]:
    """One log file as itself; a directory or several paths as one trail."""
    return paths[0] if len(paths) == 1 and not paths[0].is_dir() else list(paths)


def _verify(paths: tuple[Path, ...], public_keys, strict: bool = False, anchors=()):
    """``verify_log`` (one file) or ``verify_trail`` (a directory or several paths) with CLI errors: an unreadable
    log exits 2, an unusable key or anchor file is a one-line error."""
    from guard.audit.signing import KeyFileError
    from guard.audit.trail_verify import load_trail_anchors, verify_trail
    from guard.audit.verify import load_anchors

    target = _target(paths)
    keys = list(public_keys) or None
    try:
        if isinstance(target, Path):
            shipped = load_anchors(anchors) if anchors else None
            return verify_log(target, public_keys=keys, strict=strict, anchors=shipped)
        return verify_trail(target, public_keys=keys, strict=strict,
                            anchors=load_trail_anchors(anchors) if anchors else None)
    except KeyFileError as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:
        click.echo(f"memguard: error: {err.filename or ', '.join(map(str, paths))}: cannot read: "
                   f"{err.strerror or err}", err=True)
        raise SystemExit(2) from None
    except ValueError as err:
        raise click.ClickException(str(err)) from None


_PATHS = click.argument("paths", nargs=-1, required=True, metavar="PATH...", type=click.Path(path_type=Path))


@audit.command(name="verify")
@_PATHS
@_public_key_option
@click.option("--strict", is_flag=True, help="Also fail if records follow the last checkpoint (not yet signed).")
@click.option("--anchors", "anchors", multiple=True, type=click.Path(path_type=Path),
              help="Checkpoints kept elsewhere (audit.checkpoint_copy, a file or, for a trail, a folder): each must "
                   "be in the log, unchanged.")
def verify(paths: tuple[Path, ...], public_keys, strict: bool, anchors) -> None:
    """Check a log's hash chain, and with --public-key its signed checkpoints: exit 0 if intact, 1 naming each
    bad line, 2 if unreadable. Without a key only integrity is checked, not who wrote the log.

    PATH is a log file, or a trail: a directory of segments (one per writer), or several files. A trail is
    verified segment by segment and as a whole: its writers are listed, and a segment that is missing, cut back
    or rewritten, as other segments' signed witnesses (or --anchors) show, fails it.
    """
    report = _verify(paths, public_keys, strict, anchors)
    if report.ok:
        click.echo(str(report))
        return
    if isinstance(report, VerifyReport):
        click.echo(str(report), err=True)
    else:
        click.echo("\n".join([report.headline()] + [f"  {s.describe()}" for s in report.segments if s.report.ok]))
        for problem in report.problems:
            click.echo(str(problem), err=True)
    raise SystemExit(1)


def _filter_options(command):
    """The record filters shared by ``summary`` and ``report``."""
    options = [
        click.option("--since", default=None, help="Only records at or after this ISO 8601 time (UTC if no zone)."),
        click.option("--until", default=None, help="Only records before this ISO 8601 time (UTC if no zone)."),
        click.option("--action", "actions", multiple=True, type=click.Choice(["allow", "warn", "rewrite", "block"]),
                     help="Only records with this action (repeatable)."),
        click.option("--policy", "policies", multiple=True, help="Only records of this policy name (repeatable)."),
        click.option("--key", "key_ids", multiple=True, help="Only records of requests with this API key id "
                                                             "(repeatable)."),
        click.option("--bucket", default="auto", show_default=True, type=click.Choice(["auto", "hour", "day"]),
                     help="Timeline bucket (auto: hourly for spans up to 3 days, else daily)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _summarize(paths: tuple[Path, ...], since, until, actions, policies, key_ids=()):
    from guard.audit.review import AuditFilter, parse_time, summarize

    try:
        filters = AuditFilter(
            since=parse_time(since) if since else None,
            until=parse_time(until) if until else None,
            actions=frozenset(actions),
            policies=frozenset(policies),
            key_ids=frozenset(key_ids),
        )
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--since/--until") from None
    try:
        return summarize(_target(paths), filters)
    except OSError as err:
        raise click.ClickException(f"{err.filename or ', '.join(map(str, paths))}: cannot read: "
                                   f"{err.strerror or err}") from None


@audit.command(name="summary")
@_PATHS
@_filter_options
@_public_key_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of tables.")
def summary(paths: tuple[Path, ...], since, until, actions, policies, key_ids, bucket, public_keys, as_json) -> None:
    """Counts per action and rule, score quantiles, blocked/rewritten over time and errors of a log or trail.

    PATH is a log file, or a trail (a directory of segments, or several files): its records are merged by time
    and every writer is listed. One streaming pass with bounded memory, so logs of millions of records work;
    quantiles are exact up to 100 000 scores and estimated from a uniform sample beyond.
    """
    import json

    from guard.audit.review import render_text

    result = _summarize(paths, since, until, actions, policies, key_ids)
    result.verification = _verify(paths, public_keys) if public_keys else None
    if as_json:
        click.echo(json.dumps(result.to_dict(bucket), indent=1, ensure_ascii=False))
    else:
        click.echo(render_text(result, bucket))


@audit.command(name="report")
@_PATHS
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="HTML file to write.")
@_filter_options
@_public_key_option
def report(paths: tuple[Path, ...], out: Path, since, until, actions, policies, key_ids, bucket, public_keys) -> None:
    """Write a self-contained HTML report of a log or trail: chain status (per writer, for a trail), score
    histogram with the policy thresholds, decisions over time, blocked/rewritten requests and errors (no
    scripts, no network resources)."""
    from guard.audit.report import write_report

    result = _summarize(paths, since, until, actions, policies, key_ids)
    written = write_report(result, _verify(paths, public_keys), out, bucket=bucket)
    click.echo(f"report of {result.matched} records -> {written}")
