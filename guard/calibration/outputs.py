"""What a calibration run writes beside its profile: a plot, a weights table, a policy with absolute thresholds."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from .fitting import WeightReport
from .profile import CalibrationProfile

__all__ = ["metrics_table", "plot_calibration", "policy_from_profile", "write_policy"]


def _gte_threshold(profile: CalibrationProfile, fpr: float) -> float:
    """The ``gte`` bound flagging exactly what ``above_fpr: fpr`` flags on this profile."""
    return math.nextafter(profile.threshold_at_fpr(fpr), math.inf)


def policy_from_profile(profile: CalibrationProfile, fprs: list[float], *, name: str, weights_named: bool,
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
        "scoring": {"noise_seed": profile.seed, "inference_steps": profile.steps,
                    "prediction_space": profile.prediction_space,
                    **({"samples": "adaptive", "max_samples": profile.samples} if profile.sampling == "adaptive"
                       else {"samples": profile.samples})},
        "profile": profile.profile if weights_named else {"g_norm": profile.g_norm, "g_cos": profile.g_cos},
        "calibration": calibration,
        "rules": rules,
        "default": "allow",
        "on_error": "block",
    }


def plot_calibration(
    path: Path,
    nmem: list[float],
    mem: list[float] | None,
    curves: dict[str, tuple[list[float], list[float]]],
    thresholds: dict[float, float],
) -> None:
    """A PNG: ROC curves (when memorized prompts are given) beside the score histograms with the thresholds drawn."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from guard.roc import roc_curve

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


def metrics_table(report: WeightReport) -> str:
    """Reference and fitted weights' metrics, in-sample and held-out, as a text table."""
    lines = [f"{'weights':<10} {'g_norm':>8} {'g_cos':>8} {'set':<10} {'AUROC':>7} {'TPR@1%':>7} {'TPR@3%':>7}"]
    for name, (gn, gc) in (("reference", report.reference), ("fitted", report.fitted)):
        for where, table in (("all", report.in_sample), (f"{report.folds}-fold", report.held_out)):
            if name in table:
                m = table[name]
                lines.append(f"{name:<10} {gn:>8.4g} {gc:>8.4g} {where:<10} {m['auroc']:>7.4f} "
                             f"{m['tpr@0.01']:>7.3f} {m['tpr@0.03']:>7.3f}")
    return "\n".join(lines)


def write_policy(path: Path, profile: CalibrationProfile, fprs: list[float], profile_path: Path, model_name: str,
                 weights_named: bool) -> None:
    """A policy YAML with ``policy_from_profile``'s absolute thresholds, naming the profile file relatively."""
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    rel = os.path.relpath(profile_path.resolve(), path.resolve().parent)
    slug = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in model_name).strip("-.") or "model"
    data = policy_from_profile(profile, fprs, name=f"calibrated-{slug}", weights_named=weights_named,
                               calibration=rel)
    header = "# memguard policy written by `memguard calibrate`; thresholds are absolute (gte).\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
