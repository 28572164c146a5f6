"""Detection metrics of the papers (docs/scoring.md, "Metrics"): ROC curve, AUROC, TPR at a target FPR.

Higher scores mean "memorized" (positive). Pure numpy, so evaluation needs no scikit-learn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["roc_auc", "roc_curve", "tpr_at_fpr"]

_EPS = 1e-12


def _arrays(positives: Sequence[float], negatives: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    pos = np.asarray(positives, dtype=np.float64).ravel()
    neg = np.asarray(negatives, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError("need at least one positive and one negative score")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("scores must be finite")
    return pos, neg


def roc_curve(positives: Sequence[float], negatives: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``: one point per distinct score (flagging ``score >= threshold``), from (0, 0).

    Tied scores form one point, so a tie between a positive and a negative never counts as separated.
    """
    pos, neg = _arrays(positives, negatives)
    thresholds = np.unique(np.concatenate([pos, neg]))[::-1]
    pos_sorted, neg_sorted = np.sort(pos), np.sort(neg)
    tpr = (pos.size - np.searchsorted(pos_sorted, thresholds, side="left")) / pos.size
    fpr = (neg.size - np.searchsorted(neg_sorted, thresholds, side="left")) / neg.size
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr]), np.concatenate([[np.inf], thresholds])


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Area under the ROC curve: P(positive > negative) + P(tie) / 2 (Mann-Whitney U)."""
    pos, neg = _arrays(positives, negatives)
    neg_sorted = np.sort(neg)
    below = np.searchsorted(neg_sorted, pos, side="left")
    tied = np.searchsorted(neg_sorted, pos, side="right") - below
    return float((below.sum() + 0.5 * tied.sum()) / (pos.size * neg.size))


def tpr_at_fpr(positives: Sequence[float], negatives: Sequence[float], target_fpr: float) -> float:
    """The highest TPR among ROC points whose FPR is <= ``target_fpr`` (Wen et al.'s rule).

    Not the reference code's "point with the FPR closest to the target", which on small negative sets
    picks (0, 0) and reports 0 for a perfect detector.
    """
    if not 0.0 <= target_fpr <= 1.0:
        raise ValueError(f"target_fpr must be in [0, 1], got {target_fpr}")
    fpr, tpr, _ = roc_curve(positives, negatives)
    return float(tpr[fpr <= target_fpr + _EPS].max())
