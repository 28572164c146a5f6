"""Fitting the score weights ``(g_norm, g_cos)`` to a model from memorized and ordinary prompts.

The reference weights come from the paper's models; a fit on the user's model is kept only when it
beats them on held-out folds, since a fit on a few hundred prompts can overfit what it cannot improve.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from guard.scoring import ModelProfile

from .making import Features

__all__ = ["WeightReport", "fit_weights"]

_REPORT_FPRS = (0.01, 0.03)
_MIN_AUROC_GAIN = 0.005


def _weights(pair: tuple[float, float]) -> ModelProfile:
    return ModelProfile("weights", float(pair[0]), float(pair[1]))


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
    from guard.roc import roc_auc, tpr_at_fpr

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
    in_sample = {name: _metrics(mem.scores(_weights(w)), nmem.scores(_weights(w))) for name, w in both.items()}
    held: dict[str, list[dict[str, float]]] = {"reference": [], "fitted": []}
    if k >= 2:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
        x, y = np.column_stack([norms, coses]), np.asarray(labels)
        for train, test in splitter.split(x, y):
            weights = {"reference": reference, "fitted": _fit(x[train, 0], x[train, 1], y[train], reference)}
            for name, pair in weights.items():
                s = _weights(pair).combine(x[test, 0], x[test, 1])
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
