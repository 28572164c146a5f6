"""guard.roc against hand-computed cases (and scikit-learn where it is installed)."""

import numpy as np
import pytest

from guard.roc import roc_auc, roc_curve, tpr_at_fpr


def test_perfect_separation():
    pos, neg = [3.0, 4.0], [1.0, 2.0]
    assert roc_auc(pos, neg) == 1.0
    assert tpr_at_fpr(pos, neg, 0.0) == 1.0
    assert tpr_at_fpr(pos, neg, 0.01) == 1.0


def test_perfect_detector_on_small_negative_set_is_not_zero():
    # The reference "closest FPR" rule would pick (0, 0) for a 1% target with 10 negatives.
    pos = [10.0] * 5
    neg = list(range(10))
    assert tpr_at_fpr(pos, neg, 0.01) == 1.0


def test_hand_computed_curve():
    pos = [0.9, 0.8, 0.4]
    neg = [0.7, 0.3, 0.2, 0.1]
    fpr, tpr, thr = roc_curve(pos, neg)
    assert list(thr[1:]) == [0.9, 0.8, 0.7, 0.4, 0.3, 0.2, 0.1]
    assert list(tpr) == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1, 1])
    assert list(fpr) == pytest.approx([0, 0, 0, 0.25, 0.25, 0.5, 0.75, 1])
    # pairs: 0.9 and 0.8 beat all 4; 0.4 beats 3 of 4 -> 11/12
    assert roc_auc(pos, neg) == pytest.approx(11 / 12)
    assert tpr_at_fpr(pos, neg, 0.0) == pytest.approx(2 / 3)
    assert tpr_at_fpr(pos, neg, 0.2) == pytest.approx(2 / 3)
    assert tpr_at_fpr(pos, neg, 0.25) == 1.0


def test_ties_count_half_and_are_not_separated():
    pos, neg = [1.0, 2.0], [1.0, 0.0]
    # (1>1: tie 0.5) + (1>0: 1) + (2>1: 1) + (2>0: 1) = 3.5 of 4
    assert roc_auc(pos, neg) == pytest.approx(3.5 / 4)
    assert tpr_at_fpr(pos, neg, 0.0) == 0.5
    assert tpr_at_fpr(pos, neg, 0.5) == 1.0


def test_inverted_detector():
    assert roc_auc([0.0], [1.0]) == 0.0
    assert tpr_at_fpr([0.0], [1.0], 0.5) == 0.0


def test_errors():
    with pytest.raises(ValueError):
        roc_auc([], [1.0])
    with pytest.raises(ValueError):
        tpr_at_fpr([1.0], [float("nan")], 0.1)
    with pytest.raises(ValueError):
        tpr_at_fpr([1.0], [0.0], 1.5)


def test_matches_sklearn_auc():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pos = np.round(rng.normal(1.0, 1.0, 300), 1)
    neg = np.round(rng.normal(0.0, 1.0, 500), 1)
    labels = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    expected = sklearn_metrics.roc_auc_score(labels, np.r_[pos, neg])
    assert roc_auc(pos, neg) == pytest.approx(expected, abs=1e-12)
    fpr, tpr, _ = sklearn_metrics.roc_curve(labels, np.r_[pos, neg], drop_intermediate=False)
    assert tpr_at_fpr(pos, neg, 0.03) == pytest.approx(tpr[fpr <= 0.03].max())
