"""``memguard calibrate --from-audit``: a calibration profile from the scores of real requests in an audit log."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..calibration.checks import DEFAULT_FENCE

__all__ = ["calibrate_from_audit", "from_audit_options"]


def from_audit_options(command: Callable) -> Callable:
    """The options of the audit-log path of ``memguard calibrate``."""
    options = [
        click.option("--from-audit", "audit_path", multiple=True, type=click.Path(path_type=Path),
                     help="Build the profile from the scored decisions of this audit log (instead of prompts): a "
                          "log file, or a trail (a directory of writers' segments); repeat for several files."),
        click.option("--since", default=None, help="With --from-audit: only records at or after this ISO 8601 time."),
        click.option("--until", default=None, help="With --from-audit: only records before this ISO 8601 time."),
        click.option("--fence", default=DEFAULT_FENCE, show_default=True, type=click.FloatRange(min=0),
                     help="With --from-audit: exclude scores above median + FENCE * (P75 - median) of the records "
                          "the fence keeps (recomputed until it keeps the same ones) as likely memorized; larger "
                          "keeps more of a long ordinary tail and more mildly memorized prompts (0: no fence)."),
        click.option("--exclude-above", default=None, type=float,
                     help="With --from-audit: also exclude scores above this absolute value."),
        click.option("--exclude-action", "exclude_actions", multiple=True,
                     type=click.Choice(["allow", "warn", "rewrite", "block"]),
                     help="With --from-audit: also exclude records with this decision (repeatable), where the "
                          "decisions are consistent with the log's body (else not applied, and said)."),
        click.option("--exclude-rule", "exclude_rules", multiple=True,
                     help="With --from-audit: also exclude records matched by this rule (repeatable), e.g. a "
                          "loose monitoring threshold; a relative rule only where consistent with the log's body."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def calibrate_from_audit(
    audit_path: tuple[Path, ...],
    out_path: Path,
    *,
    model_path: str | None,
    device: str | None,
    dtype: str | None,
    since: str | None,
    until: str | None,
    fence: float,
    exclude_above: float | None,
    exclude_actions: tuple[str, ...],
    exclude_rules: tuple[str, ...],
    fprs: list[float],
    plot_path: Path | None,
    policy_path: Path | None,
    scoring: dict[str, Any],
) -> None:
    """Build, report and save the profile; the same threshold report, plot and policy as ``--nmem``."""
    from ..audit.from_audit import profile_from_audit, stability
    from ..audit.review import parse_time
    from ..calibration.outputs import plot_calibration, write_policy
    from ..policy import load_policy

    try:
        start = parse_time(since) if since else None
        end = parse_time(until) if until else None
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--since/--until") from None
    measurement = None
    if model_path is not None:
        from ..loading import load_pipeline
        from .options import scorer_from_options

        measurement = scorer_from_options(load_pipeline(model_path, device=device, dtype=dtype), scoring).measurement()
    source = audit_path[0] if len(audit_path) == 1 and not audit_path[0].is_dir() else list(audit_path)
    made = profile_from_audit(source, since=start, until=end, measurement=measurement,
                              fence=fence or None, exclude_above=exclude_above, exclude_actions=exclude_actions,
                              exclude_rules=exclude_rules)
    profile = made.profile
    profile.save(out_path)
    click.echo(f"calibration {profile.id}: {profile.n_prompts} requests, weights g_norm={profile.g_norm:g} "
               f"g_cos={profile.g_cos:g} ({profile.profile}) -> {out_path}")
    for line in made.lines():
        click.echo(line)
    for fpr in fprs:
        note = "" if fpr >= profile.resolution else f" (below resolution 1/{profile.n_prompts}: maximum score)"
        click.echo(f"  threshold at FPR {fpr:g}: {profile.threshold_at_fpr(fpr):.6g}{note}; "
                   f"{made.remaining(fpr).describe()}")
    if len(made.in_order) >= 2 * 20:
        click.echo("stability: thresholds from the first half of the log, crossed by the second half "
                   "(99% intervals)")
        for row in stability(made.in_order, fprs):
            verdict = "consistent" if row["consistent"] else "NOT consistent: traffic changed; try --since"
            click.echo(f"  FPR {row['above_fpr']:g}: {row['crossed']} of {row['later']} "
                       f"({100 * row['observed']:.2f}%), promised {100 * row['promised']:.2f}% "
                       f"[{100 * row['promised_low']:.2f}%, {100 * row['promised_high']:.2f}%]: {verdict}")
    if plot_path is not None:
        plot_calibration(plot_path, list(profile.scores), None, {}, {f: profile.threshold_at_fpr(f) for f in fprs})
        click.echo(f"plot -> {plot_path}")
    if policy_path is not None:
        name = Path(model_path).name if model_path else profile.model_class
        write_policy(policy_path, profile, fprs, out_path, name, weights_named=False)
        load_policy(policy_path)
        click.echo(f"policy -> {policy_path}")
