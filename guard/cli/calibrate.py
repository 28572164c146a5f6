"""``memguard calibrate``: a model's calibration profile from data, optionally with fitted score weights.

A thin shell over ``guard.calibration``: scoring is resumable through ``OUT.partial.jsonl`` (removed once
the profile is written), and the scoring settings come from the options or from ``--policy``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..loading import load_pipeline
from ..prompts_io import read_prompts
from .from_audit import calibrate_from_audit, from_audit_options
from .options import policy_scoring_option, scorer_from_options

__all__ = ["calibrate"]

DEFAULT_FPRS = "0.001,0.01,0.05"


def _parse_fprs(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of numbers: {text!r}", param_hint="--fprs") from None
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise click.BadParameter("give false-positive rates in (0, 1), e.g. 0.001,0.01", param_hint="--fprs")
    return values


@click.command()
@click.option("--model", "model_path", default=None,
              help="Diffusers pipeline directory (or hub id); with --from-audit it picks that model's records.")
@click.option("--nmem", "nmem_path", type=click.Path(dir_okay=False), default=None,
              help="Non-memorized prompts, one per line (default: memguard's built-in generic captions).")
@click.option("--mem", "mem_path", type=click.Path(dir_okay=False), default=None,
              help="Memorized prompts: also evaluate the score and fit g_norm/g_cos.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Calibration profile to write (JSON); policies point their `calibration:` at it.")
@policy_scoring_option
@click.option("--device", default=None, help="torch device (default: cuda, mps or cpu, whichever exists).")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Model dtype (default: float16 on CUDA, float32 elsewhere).")
@click.option("--weights", type=click.Choice(["auto", "reference", "fitted"]), default="auto", show_default=True,
              help="With --mem: which weights the profile uses (auto: fitted only if they win on held-out folds).")
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2), help="Folds of the held-out check.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG: ROC curves (with --mem) and score histograms with the thresholds.")
@click.option("--policy-out", "policy_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a policy YAML with absolute (gte) thresholds at the --fprs rates.")
@click.option("--fprs", default=DEFAULT_FPRS, show_default=True,
              help="False-positive rates of --policy-out's rules: block at the lowest, warn at the highest, "
                   "rewrite between.")
@click.option("--verification", "verification_prompts", default=0, show_default=True, type=click.IntRange(0),
              help="Also measure the rewrite verification calibration on this many of the non-memorized prompts "
                   "(each costs about two generations).")
@click.option("--verify-probes", default=2, show_default=True, type=click.IntRange(1, 8),
              help="Probe generations per prompt (the policy's rewrite.verify.probes).")
@click.option("--verify-probe-steps", default=25, show_default=True, type=click.IntRange(2),
              help="Steps of each probe generation (the policy's rewrite.verify.probe_steps).")
@click.option("--generation-steps", default=None, type=click.IntRange(1),
              help="Steps of the ordinary generations for --verification (default: the pipeline's default).")
@click.option("--guidance-scale", default=None, type=float,
              help="Guidance scale of the generations for --verification (default: the pipeline's default).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
@from_audit_options
def calibrate(model_path, nmem_path, mem_path, out_path, device, dtype, weights, folds, plot_path, policy_path,
              fprs, verification_prompts, verify_probes, verify_probe_steps, generation_steps, guidance_scale,
              progress, audit_path, since, until, fence, exclude_above, exclude_actions, exclude_rules,
              **scoring) -> None:
    """Measure MODEL's scores on non-memorized prompts and write its calibration profile.

    Relative policy thresholds (above_fpr) are read off this profile; a guard only uses a profile measured
    with its own scoring settings, so pass the policy you will use (--policy) or the same options.
    Interrupted runs resume from OUT.partial.jsonl when rerun with the same arguments.

    With --from-audit the profile is made from the scores of real requests in an audit log instead (no
    prompts needed, so `audit.prompt: hash` logs work); --model is then optional and picks that model's
    records when the log holds several.
    """
    if audit_path:
        if nmem_path is not None or mem_path is not None:
            raise click.UsageError("--from-audit takes its scores from the log: drop --nmem/--mem")
        if weights == "fitted":
            raise click.UsageError("--weights fitted needs --mem, which --from-audit does not take")
        calibrate_from_audit(
            audit_path, out_path, model_path=model_path, device=device, dtype=dtype, since=since, until=until,
            fence=fence, exclude_above=exclude_above, exclude_actions=exclude_actions, exclude_rules=exclude_rules,
            fprs=_parse_fprs(fprs), plot_path=plot_path, policy_path=policy_path, scoring=scoring)
        return
    if model_path is None:
        raise click.UsageError("give --model (or --from-audit AUDIT.jsonl)")
    from ..calibration import CalibrationProfile, fit_weights, prompt_set_id, score_sets, spread_stages
    from ..calibration.outputs import metrics_table, plot_calibration, write_policy
    from ..data import generic_captions, generic_captions_id
    from ..policy import load_policy
    from ..scoring import ModelProfile

    fpr_list = _parse_fprs(fprs)
    if weights == "fitted" and mem_path is None:
        raise click.UsageError("--weights fitted needs --mem")
    if nmem_path is not None:
        nmem_prompts = read_prompts(nmem_path)
        source = prompt_set_id(Path(nmem_path).name, nmem_prompts)
    else:
        nmem_prompts, source = generic_captions(), generic_captions_id()
    sets = {"nmem": nmem_prompts}
    if mem_path is not None:
        sets["mem"] = read_prompts(mem_path)
    scorer = scorer_from_options(load_pipeline(model_path, device=device, dtype=dtype), scoring)
    partial = out_path.with_name(out_path.name + ".partial.jsonl")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    features = score_sets(scorer, sets, partial, progress=None if progress else False)
    nmem = features["nmem"]
    reference = (scorer.profile.g_norm, scorer.profile.g_cos)
    report = None
    chosen = "reference"
    if "mem" in features:
        report = fit_weights(features["mem"], nmem, reference, folds=folds, seed=scorer.seed)
        chosen = report.chosen if weights == "auto" else weights
    g_norm, g_cos = report.fitted if (report and chosen == "fitted") else reference
    weights_used = ModelProfile(scorer.profile.name if chosen == "reference" else "fitted", g_norm, g_cos)
    measurement = scorer.measurement().model_copy(
        update={"profile": weights_used.name, "g_norm": g_norm, "g_cos": g_cos})
    stages = spread_stages(scorer)  # adaptive sampling: the spread its bands are read from, with these weights
    profile = CalibrationProfile.from_measurement(
        measurement, nmem.scores(weights_used), norms=nmem.norms, coses=nmem.coses, source=source,
        spread=nmem.spread(weights_used, stages) if stages else None,
    )
    if verification_prompts:
        profile = profile.with_verification(_verification(
            scorer, nmem_prompts[:verification_prompts], source, probes=verify_probes,
            probe_steps=verify_probe_steps, steps=generation_steps, guidance_scale=guidance_scale,
        ))
        values = profile.verification
        click.echo(f"verification on {len(values.nearest)} prompts ({values.steps} steps, guidance "
                   f"{values.guidance_scale:g}): probe similarity at FPR 0.01 {values.threshold_at_fpr(0.01):.4f} "
                   f"(an unrelated prompt), {values.threshold_at_fpr(0.01, 'nearest'):.4f} (nearest other prompt), "
                   f"{values.threshold_at_fpr(0.01, 'same'):.4f} (same prompt)")
    profile.save(out_path)
    click.echo(f"calibration {profile.id}: {profile.n_prompts} prompts, weights g_norm={g_norm:g} g_cos={g_cos:g} "
               f"({chosen}) -> {out_path}")
    for fpr in fpr_list:
        note = "" if fpr >= profile.resolution else f" (below resolution 1/{profile.n_prompts}: maximum score)"
        click.echo(f"  threshold at FPR {fpr:g}: {profile.threshold_at_fpr(fpr):.6g}{note}")
    if report is not None:
        click.echo(metrics_table(report))
        click.echo(f"  chosen: {chosen} ({report.why if weights == 'auto' else 'forced by --weights'})")
        report_path = out_path.with_name(out_path.name + ".weights.json")
        report_path.write_text(json.dumps({**report.to_dict(), "used": chosen}, indent=1) + "\n", encoding="utf-8")
    if plot_path is not None:
        mem_scores = features["mem"].scores(weights_used) if "mem" in features else None
        curves = {}
        if report is not None:
            for name, pair in (("reference", report.reference), ("fitted", report.fitted)):
                curve_weights = ModelProfile(name, *pair)
                curves[f"{name} ({pair[0]:g}, {pair[1]:g})"] = (
                    features["mem"].scores(curve_weights), nmem.scores(curve_weights)
                )
        plot_calibration(plot_path, list(profile.scores), mem_scores, curves,
                         {f: profile.threshold_at_fpr(f) for f in fpr_list})
        click.echo(f"plot -> {plot_path}")
    if policy_path is not None:
        write_policy(policy_path, profile, fpr_list, out_path, Path(model_path).name, chosen == "reference")
        load_policy(policy_path)
        click.echo(f"policy -> {policy_path}")
    partial.unlink(missing_ok=True)


def _verification(scorer, prompts: list[str], source: str, *, probes: int, probe_steps: int, steps: int | None,
                  guidance_scale: float | None):
    """The rewrite verification calibration on ``prompts`` (``docs/mitigation.md``)."""
    from ..actions.verification import measure_verification
    from ..guard import PipelineGenerator
    from ..policy import VerifySettings

    adapter = scorer.adapter
    arguments = {}
    if steps is not None:
        arguments["num_inference_steps"] = steps
    if guidance_scale is not None:
        arguments["guidance_scale"] = guidance_scale
    generation = PipelineGenerator(adapter.pipe, adapter, arguments, 0, redact=False)
    settings = VerifySettings(probes=probes, probe_steps=probe_steps)
    return measure_verification(generation, scorer.encode(prompts), settings, seed=scorer.seed, source=source)
