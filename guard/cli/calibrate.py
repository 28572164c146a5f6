"""``memguard calibrate``: a model's calibration profile from data, optionally with fitted score weights.

Scoring is resumable: each finished batch is appended to ``OUT.partial.jsonl`` (a header naming the
settings, then one row per prompt). A rerun with the same settings keeps the batches already complete
and rescores only the others, with the same batch boundaries, so the result is identical to an
uninterrupted run. The sidecar is removed once the profile is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from ..loading import load_pipeline
from ..prompts_io import read_prompts

__all__ = ["WeightReport", "calibrate", "fit_weights", "policy_from_profile", "score_sets"]

DEFAULT_FPRS = "0.001,0.01,0.05"
_REPORT_FPRS = (0.01, 0.03)
_MIN_AUROC_GAIN = 0.005


@dataclass(frozen=True)
class Features:
    """Measured ``norm`` and ``cos`` per prompt of one prompt set, in file order."""

    norms: list[float]
    coses: list[float]

    def scores(self, g_norm: float, g_cos: float) -> list[float]:
        return [g_norm * n + g_cos * c for n, c in zip(self.norms, self.coses)]


def _sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".partial.jsonl")


def _settings(scorer: Any, sets: dict[str, list[str]]) -> dict[str, Any]:
    """Everything that changes a measured value: a partial file made otherwise is not reused."""
    adapter = scorer.adapter
    return {
        "fingerprint": adapter.fingerprint(),
        "samples": scorer.samples,
        "seed": scorer.seed,
        "steps": scorer.inference_steps,
        "prediction_space": scorer.prediction_space,
        "batch_size": scorer.batch_size,
        "device": str(adapter.device),
        "dtype": str(adapter.dtype),
        "sets": {name: _digest("\n".join(prompts)) for name, prompts in sets.items()},
    }


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _read_partial(path: Path, settings: dict[str, Any]) -> dict[tuple[str, int, str], tuple[float, float]]:
    """Rows of a partial file made with ``settings``; empty (and the file truncated) otherwise."""
    from ..prompts_io import completed_rows

    rows = completed_rows(path)
    header = next(rows, None)
    if header is None or header.get("settings") != settings:
        path.unlink(missing_ok=True)
        return {}
    return {(r["set"], r["index"], r["prompt"]): (r["norm"], r["cos"]) for r in rows}


def score_sets(scorer: Any, sets: dict[str, list[str]], partial: Path, *, progress: bool = True) -> dict[str, Features]:
    """``norm``/``cos`` of every prompt of every set, batched, resuming from (and appending to) ``partial``."""
    from tqdm import tqdm

    from ..prompts_io import truncate_to_complete_rows

    settings = _settings(scorer, sets)
    truncate_to_complete_rows(partial)
    done = _read_partial(partial, settings)
    size = scorer.batch_size
    total = sum(len(p) for p in sets.values())
    results: dict[str, Features] = {}
    fresh = not partial.exists()
    with partial.open("a", encoding="utf-8") as sink, tqdm(
        total=total, unit="prompt", desc="calibrate", disable=None if progress else True
    ) as bar:
        if fresh:
            sink.write(json.dumps({"settings": settings}) + "\n")
            sink.flush()
        for name, prompts in sets.items():
            measured: list[tuple[float, float]] = []
            for start in range(0, len(prompts), size):
                chunk = prompts[start : start + size]
                keys = [(name, start + i, p) for i, p in enumerate(chunk)]
                if all(k in done for k in keys):
                    measured.extend(done[k] for k in keys)
                else:
                    scored = [(r.norm, r.cos) for r in scorer.score(chunk)]
                    sink.write("".join(
                        json.dumps({"set": k[0], "index": k[1], "prompt": k[2], "norm": n, "cos": c},
                                   ensure_ascii=False) + "\n"
                        for k, (n, c) in zip(keys, scored)
                    ))
                    sink.flush()
                    measured.extend(scored)
                bar.update(len(chunk))
            results[name] = Features([m[0] for m in measured], [m[1] for m in measured])
    return results


@dataclass(frozen=True)
class WeightReport:
    """Reference vs fitted weights: in-sample and held-out (k-fold) metrics, and which were chosen."""

    reference: tuple[float, float]
    fitted: tuple[float, float]
    in_sample: dict[str, dict[str, float]]
    held_out: dict[str, dict[str, float]]
    folds: int
    chosen: str
    why: str

    @property
    def weights(self) -> tuple[float, float]:
        return self.fitted if self.chosen == "fitted" else self.reference

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": list(self.reference), "fitted": list(self.fitted), "in_sample": self.in_sample,
            "held_out": self.held_out, "folds": self.folds, "chosen": self.chosen, "why": self.why,
        }


def _metrics(pos: list[float], neg: list[float]) -> dict[str, float]:
    from ..metrics import roc_auc, tpr_at_fpr

    out = {"auroc": roc_auc(pos, neg)}
    out.update({f"tpr@{f:g}": tpr_at_fpr(pos, neg, f) for f in _REPORT_FPRS})
    return out


def _fit(norms: Any, coses: Any, labels: Any, scale_to: tuple[float, float]) -> tuple[float, float]:
    """Logistic-regression weights, rescaled (ranking unchanged) to the reference's g_norm where possible."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    x = np.column_stack([norms, coses])
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    model = LogisticRegression(C=1.0).fit((x - mean) / std, np.asarray(labels))
    g = model.coef_[0] / std
    if g[0] > 0 and scale_to[0] > 0:
        g = g * (scale_to[0] / g[0])
    elif np.abs(g).sum() > 0:
        g = g * (abs(scale_to[0]) + abs(scale_to[1])) / np.abs(g).sum()
    return float(f"{g[0]:.4g}"), float(f"{g[1]:.4g}")


def fit_weights(mem: Features, nmem: Features, reference: tuple[float, float], *, folds: int = 5,
                seed: int = 0) -> WeightReport:
    """Fit ``(g_norm, g_cos)`` and keep them only if they beat ``reference`` on held-out folds.

    Fitted weights are chosen when their mean held-out AUROC exceeds the reference's by more than
    0.005 and their mean held-out TPR@1%FPR is not lower; otherwise the reference weights stay, since a
    fit on a few hundred prompts can overfit what it cannot improve.
    """
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    norms, coses = mem.norms + nmem.norms, mem.coses + nmem.coses
    labels = [1] * len(mem.norms) + [0] * len(nmem.norms)
    fitted = _fit(norms, coses, labels, reference)
    k = min(folds, len(mem.norms), len(nmem.norms))
    both = {"reference": reference, "fitted": fitted}
    in_sample = {name: _metrics(mem.scores(*w), nmem.scores(*w)) for name, w in both.items()}
    held: dict[str, list[dict[str, float]]] = {"reference": [], "fitted": []}
    if k >= 2:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        x, y = np.column_stack([norms, coses]), np.asarray(labels)
        for train, test in splitter.split(x, y):
            weights = {"reference": reference, "fitted": _fit(x[train, 0], x[train, 1], y[train], reference)}
            for name, (gn, gc) in weights.items():
                s = gn * x[test, 0] + gc * x[test, 1]
                held[name].append(_metrics(list(s[y[test] == 1]), list(s[y[test] == 0])))
    held_out = {name: {m: float(np.mean([f[m] for f in rows])) for m in rows[0]} for name, rows in held.items() if rows}
    if not held_out:
        return WeightReport(reference, fitted, in_sample, {}, 0, "reference",
                            "too few prompts for held-out folds; reference weights kept")
    ref, fit = held_out["reference"], held_out["fitted"]
    gain = fit["auroc"] - ref["auroc"]
    if gain > _MIN_AUROC_GAIN and fit["tpr@0.01"] >= ref["tpr@0.01"]:
        why = f"fitted weights raise held-out AUROC by {gain:+.4f} without lowering TPR@1%FPR"
        return WeightReport(reference, fitted, in_sample, held_out, k, "fitted", why)
    why = f"fitting does not help on held-out folds (AUROC {gain:+.4f}); reference weights kept"
    return WeightReport(reference, fitted, in_sample, held_out, k, "reference", why)


def _gte_threshold(profile: Any, fpr: float) -> float:
    """The ``gte`` bound flagging exactly what ``above_fpr: fpr`` flags on this profile."""
    return math.nextafter(profile.threshold_at_fpr(fpr), math.inf)


def policy_from_profile(profile: Any, fprs: list[float], *, name: str, weights_named: bool,
                        calibration: str) -> dict[str, Any]:
    """A policy dict with absolute thresholds: block at the lowest FPR, warn at the highest, rewrite between."""
    fprs = sorted(set(fprs))
    rules = []
    warn_at = _gte_threshold(profile, fprs[-1])
    for i, fpr in enumerate(fprs):
        bound = _gte_threshold(profile, fpr)
        label = f"{fpr:g}"
        if i == 0:
            rule = {"name": f"block-fpr-{label}", "when": {"score": {"gte": bound}}, "action": "block"}
        elif i == len(fprs) - 1:
            rule = {"name": f"warn-fpr-{label}", "when": {"score": {"gte": bound}}, "action": "warn"}
        else:
            rule = {"name": f"rewrite-fpr-{label}", "when": {"score": {"gte": bound}}, "action": "rewrite",
                    "rewrite": {"method": "prompt_embedding", "target": {"score": warn_at}, "fallback": "warn"}}
        rules.append(rule)
    return {
        "name": name,
        "version": "1",
        "description": (f"Written by memguard calibrate from calibration {profile.id} "
                        f"({profile.n_prompts} prompts): absolute thresholds at FPR {', '.join(map(str, fprs))}."),
        "scoring": {"noise_seed": profile.seed, "samples": profile.samples, "inference_steps": profile.steps,
                    "prediction_space": profile.prediction_space},
        "profile": profile.profile if weights_named else {"g_norm": profile.g_norm, "g_cos": profile.g_cos},
        "calibration": calibration,
        "rules": rules,
        "default": "allow",
        "on_error": "block",
    }


def _parse_fprs(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"not a comma-separated list of numbers: {text!r}", param_hint="--fprs") from None
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise click.BadParameter("give false-positive rates in (0, 1), e.g. 0.001,0.01", param_hint="--fprs")
    return values


def _file_source(path: str, prompts: list[str]) -> str:
    return f"{Path(path).name}-{_digest(chr(10).join(prompts))[:12]}"


def _plot(path: Path, nmem: list[float], mem: list[float] | None, curves: dict[str, tuple[list[float], list[float]]],
          thresholds: dict[float, float]) -> None:
    """ROC curves (when memorized prompts are given) beside the score histograms with the thresholds drawn."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..metrics import roc_curve

    panels = 2 if curves else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    if curves:
        ax = axes[0][0]
        for label, (pos, neg) in curves.items():
            fpr, tpr, _ = roc_curve(pos, neg)
            ax.step(fpr, tpr, where="post", label=label)
        diagonal = np.linspace(0, 1, 201)
        ax.plot(diagonal, diagonal, ls=":", c="grey", label="chance")
        ax.set_xscale("symlog", linthresh=0.01)
        ax.set_xlim(0, 1)
        ax.set_xlabel("false-positive rate")
        ax.set_ylabel("true-positive rate")
        ax.set_title("ROC")
        ax.legend(loc="lower right")
    ax = axes[0][-1]
    bins = np.histogram_bin_edges(nmem + (mem or []), bins=40)
    ax.hist(nmem, bins=bins, alpha=0.6, label=f"non-memorized (n={len(nmem)})")
    if mem:
        ax.hist(mem, bins=bins, alpha=0.6, label=f"memorized (n={len(mem)})")
    styles = ["-", "--", "-.", ":"]
    for i, (fpr, value) in enumerate(sorted(thresholds.items())):
        ax.axvline(value, ls=styles[i % len(styles)], c="k", lw=1, label=f"threshold at FPR {fpr:g}: {value:.4g}")
    ax.set_xlabel("score (chosen weights)")
    ax.set_ylabel("prompts")
    ax.set_title("score distribution")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _metrics_table(report: WeightReport) -> str:
    lines = [f"{'weights':<10} {'g_norm':>8} {'g_cos':>8} {'set':<10} {'AUROC':>7} {'TPR@1%':>7} {'TPR@3%':>7}"]
    for name, (gn, gc) in (("reference", report.reference), ("fitted", report.fitted)):
        for where, table in (("all", report.in_sample), (f"{report.folds}-fold", report.held_out)):
            if name in table:
                m = table[name]
                lines.append(f"{name:<10} {gn:>8.4g} {gc:>8.4g} {where:<10} {m['auroc']:>7.4f} "
                             f"{m['tpr@0.01']:>7.3f} {m['tpr@0.03']:>7.3f}")
    return "\n".join(lines)


@click.command()
@click.option("--model", "model_path", required=True, help="Diffusers pipeline directory (or hub id).")
@click.option("--nmem", "nmem_path", type=click.Path(dir_okay=False), default=None,
              help="Non-memorized prompts, one per line (default: memguard's built-in generic captions).")
@click.option("--mem", "mem_path", type=click.Path(dir_okay=False), default=None,
              help="Memorized prompts: also evaluate the score and fit g_norm/g_cos.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Calibration profile to write (JSON); policies point their `calibration:` at it.")
@click.option("--samples", default=1, show_default=True, type=click.IntRange(1), help="Noise draws per prompt.")
@click.option("--seed", default=51, show_default=True, type=click.IntRange(0), help="Seed of the detection noise.")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(3),
              help="DDIM schedule length that t_hi/t_lo come from (the policy's scoring.inference_steps).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1), help="Prompts per UNet call.")
@click.option("--device", default=None, help="torch device (default: cuda, mps or cpu, whichever exists).")
@click.option("--dtype", default=None, type=click.Choice(["float32", "float16", "bfloat16"]),
              help="Model dtype (default: float16 on CUDA, float32 elsewhere).")
@click.option("--profile", "profile_name", default=None,
              help="Reference weights by profile name (default: the model family's, e.g. sd1).")
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
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def calibrate(model_path, nmem_path, mem_path, out_path, samples, seed, steps, batch_size, device, dtype,
              profile_name, weights, folds, plot_path, policy_path, fprs, progress) -> None:
    """Measure MODEL's scores on non-memorized prompts and write its calibration profile.

    Relative policy thresholds (above_fpr) are read off this profile. Interrupted runs resume from
    OUT.partial.jsonl when rerun with the same arguments.
    """
    from ..calibrator import calibration_settings
    from ..data import generic_captions, generic_captions_id
    from ..policy import CalibrationProfile, load_policy
    from ..scoring import Scorer

    fpr_list = _parse_fprs(fprs)
    if weights == "fitted" and mem_path is None:
        raise click.UsageError("--weights fitted needs --mem")
    if nmem_path is not None:
        nmem_prompts = read_prompts(nmem_path)
        source = _file_source(nmem_path, nmem_prompts)
    else:
        nmem_prompts, source = generic_captions(), generic_captions_id()
    sets = {"nmem": nmem_prompts}
    if mem_path is not None:
        sets["mem"] = read_prompts(mem_path)
    scorer = Scorer(load_pipeline(model_path, device=device, dtype=dtype), samples=samples, seed=seed,
                    inference_steps=steps, batch_size=batch_size, profile=profile_name)
    partial = _sidecar(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    features = score_sets(scorer, sets, partial, progress=progress)
    nmem = features["nmem"]
    reference = (scorer.profile.g_norm, scorer.profile.g_cos)
    report = None
    if "mem" in features:
        report = fit_weights(features["mem"], nmem, reference, folds=folds, seed=seed)
        chosen = report.chosen if weights == "auto" else weights
    else:
        chosen = "reference"
    g_norm, g_cos = report.fitted if (report and chosen == "fitted") else reference
    settings = calibration_settings(scorer)
    settings.update(profile=settings["profile"] if chosen == "reference" else "fitted", g_norm=g_norm, g_cos=g_cos)
    profile = CalibrationProfile.from_scores(
        nmem.scores(g_norm, g_cos), norms=nmem.norms, coses=nmem.coses, source=source, **settings
    )
    profile.save(out_path)
    click.echo(f"calibration {profile.id}: {profile.n_prompts} prompts, weights g_norm={g_norm:g} g_cos={g_cos:g} "
               f"({chosen}) -> {out_path}")
    for fpr in fpr_list:
        note = "" if fpr >= profile.resolution else f" (below resolution 1/{profile.n_prompts}: maximum score)"
        click.echo(f"  threshold at FPR {fpr:g}: {profile.threshold_at_fpr(fpr):.6g}{note}")
    if report is not None:
        click.echo(_metrics_table(report))
        click.echo(f"  chosen: {chosen} ({report.why if weights == 'auto' else 'forced by --weights'})")
        report_path = out_path.with_name(out_path.name + ".weights.json")
        report_path.write_text(json.dumps({**report.to_dict(), "used": chosen}, indent=1) + "\n", encoding="utf-8")
    if plot_path is not None:
        mem_scores = features["mem"].scores(g_norm, g_cos) if "mem" in features else None
        curves = {}
        if report is not None:
            for name, w in (("reference", report.reference), ("fitted", report.fitted)):
                curves[f"{name} ({w[0]:g}, {w[1]:g})"] = (features["mem"].scores(*w), nmem.scores(*w))
        _plot(plot_path, list(profile.scores), mem_scores, curves,
              {f: profile.threshold_at_fpr(f) for f in fpr_list})
        click.echo(f"plot -> {plot_path}")
    if policy_path is not None:
        _write_policy(policy_path, profile, fpr_list, out_path, Path(model_path).name, chosen == "reference")
        load_policy(policy_path)
        click.echo(f"policy -> {policy_path}")
    partial.unlink(missing_ok=True)


def _write_policy(path: Path, profile: Any, fprs: list[float], profile_path: Path, model_name: str,
                  weights_named: bool) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(profile_path.resolve(), path.resolve().parent)
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in model_name).strip("-.") or "model"
    data = policy_from_profile(profile, fprs, name=f"calibrated-{slug}", weights_named=weights_named,
                               calibration=rel)
    header = "# memguard policy written by `memguard calibrate`; thresholds are absolute (gte).\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
