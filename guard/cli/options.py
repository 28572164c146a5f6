"""Scoring options shared by ``scan`` and ``calibrate``: explicit options, else a policy's, else the defaults."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..scoring import DEFAULT_INFERENCE_STEPS, DEFAULT_SEED, Scorer, make_scorer

__all__ = ["policy_scoring_option", "scorer_from_options", "scoring_settings"]

_DEFAULTS = {
    "samples": 1,
    "max_samples": None,
    "seed": DEFAULT_SEED,
    "steps": DEFAULT_INFERENCE_STEPS,
    "batch_size": 16,
    "profile": None,
    "prediction_space": "auto",
}


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
    """``Scorer`` keyword arguments: each option as given, else the policy's setting, else the default."""
    from ..policy import load_policy

    resolved = dict(_DEFAULTS)
    policy_name = options.get("scoring_policy")
    if policy_name:
        policy = load_policy(policy_name)
        scoring = policy.scoring
        resolved.update(samples=scoring.samples, seed=scoring.noise_seed, steps=scoring.inference_steps,
                        prediction_space=scoring.prediction_space,
                        max_samples=scoring.max_samples if scoring.samples == "adaptive" else None)
        if scoring.batch_size:
            resolved["batch_size"] = scoring.batch_size
        weights = policy.score_weights()
        if weights is not None:
            resolved["profile"] = weights
    resolved.update({k: v for k, v in options.items() if k in _DEFAULTS and v is not None})
    if resolved["samples"] != "adaptive":
        if options.get("max_samples") is not None:
            raise click.UsageError("--max-samples is only for --samples adaptive")
        resolved["max_samples"] = None
    return {
        "samples": resolved["samples"],
        "max_samples": resolved["max_samples"],
        "seed": resolved["seed"],
        "inference_steps": resolved["steps"],
        "batch_size": resolved["batch_size"],
        "profile": resolved["profile"],
        "prediction_space": resolved["prediction_space"],
    }


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
