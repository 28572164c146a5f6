"""Scoring options shared by ``scan`` and ``calibrate``: explicit options, else a policy's, else the defaults."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..scoring import Scorer, ScoringSettings, make_scorer

__all__ = ["policy_scoring_option", "scorer_from_options", "scoring_settings"]

def policy_scoring_option(command: Callable) -> Callable:
    """``--policy`` and the scoring options it provides defaults for."""
    options = [
        click.option("--policy", "scoring_policy", default=None,
                     help="Take the scoring settings (seed, samples, steps, prediction space, weights) from this "
                          "policy (a shipped name or a YAML file), so the numbers match what a guard measures."),
        click.option("--samples", default=None, type=SamplesType(),
                     help="Noise draws per prompt, or 'adaptive' (1 to --max-samples, more only near a policy "
                          "threshold) [default: 1]."),
        click.option("--max-samples", default=None, type=click.IntRange(2, 64),
                     help="Most draws a prompt gets with --samples adaptive [default: 4]."),
        click.option("--seed", default=None, type=click.IntRange(0), help="Seed of the detection noise [default: 51]."),
        click.option("--steps", default=None, type=click.IntRange(3),
                     help="Schedule length that t_hi/t_lo come from [default: 50]."),
        click.option("--batch-size", default=None, type=click.IntRange(1),
                     help="Prompts per model call [default: 16]."),
        click.option("--profile", default=None, help="Score weights by profile name (default: the model family's)."),
        click.option("--prediction-space", default=None, type=click.Choice(["auto", "eps", "native"]),
                     help="Space the score is measured in [default: auto]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def scoring_settings(options: dict[str, Any]) -> dict[str, Any]:
    """``make_scorer`` keyword arguments: each option as given, else the policy's setting, else the default; the
    settings are a ``ScoringSettings`` (the policy's own model), so they are validated the way a policy is."""
    from pydantic import ValidationError

    from ..policy import load_policy

    base = ScoringSettings()
    profile = None
    if options.get("scoring_policy"):
        policy = load_policy(options["scoring_policy"])
        base, profile = policy.scoring, policy.score_weights()
    given = {"noise_seed": options.get("seed"), "samples": options.get("samples"),
             "max_samples": options.get("max_samples"), "inference_steps": options.get("steps"),
             "prediction_space": options.get("prediction_space"), "batch_size": options.get("batch_size")}
    update = {name: value for name, value in given.items() if value is not None}
    if update.get("samples", base.samples) != "adaptive":
        if options.get("max_samples") is not None:
            raise click.UsageError("--max-samples is only for --samples adaptive")
        update.update(max_samples=None, band_quantile=None)
    try:
        settings = ScoringSettings.model_validate({**base.model_dump(), **update})
    except ValidationError as error:
        raise click.UsageError(f"scoring options: {error.errors()[0]['msg']}") from None
    return settings.scorer_kwargs(options.get("profile") or profile)


def scorer_from_options(pipe: Any, options: dict[str, Any]) -> Scorer:
    """A ``Scorer`` (or an ``AdaptiveScorer`` for ``--samples adaptive``) with the resolved settings."""
    return make_scorer(pipe, **scoring_settings(options))


class SamplesType(click.ParamType):
    """A positive number of noise draws, or ``adaptive``."""

    name = "N|adaptive"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        if isinstance(value, int) or value == "adaptive":
            return value
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is neither a positive integer nor 'adaptive'", param, ctx)
        if number < 1:
            self.fail(f"{number} is not a positive number of draws", param, ctx)
        return number
