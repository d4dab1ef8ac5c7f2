"""The figures a run reports about its final model, against computations by hand."""

from __future__ import annotations

import numpy as np
import pytest

from fedmed.run.record import fairness
from fedmed.training.metrics import calibration, classification_metrics


def test_ece_and_brier_by_hand():
    # confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.55 (wrong): bins [0.867, 0.933) and [0.533, 0.6), [0.6, 0.667)
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.55, 0.45]])
    y = np.array([0, 1, 1, 1])
    ece, brier = calibration(y, probs)
    # bin of 0.9: accuracy 1/2, confidence 0.9 -> 2/4 * 0.4; bin of 0.6: 1 vs 0.6 -> 1/4 * 0.4; bin of 0.55: 0 vs 0.55 -> 1/4 * 0.55
    assert ece == pytest.approx(0.5 * 0.4 + 0.25 * 0.4 + 0.25 * 0.55)
    assert brier == pytest.approx(np.mean([0.02, 1.62, 0.32, 0.605]))


def test_a_perfect_confident_model_is_calibrated():
    probs = np.eye(3)[[0, 1, 2, 1]]
    assert calibration(np.array([0, 1, 2, 1]), probs) == (0.0, 0.0)


def test_per_class_precision_recall_and_f1():
    y = np.array([0, 0, 1, 1, 2])
    probs = np.eye(3)[[0, 1, 1, 1, 1]]  # class 2 never predicted
    m = classification_metrics(y, probs * 0.97 + 0.01)
    assert m["per_class_precision"] == [1.0, pytest.approx(2 / 4), None]
    assert m["per_class_recall"] == [0.5, 1.0, 0.0]
    assert m["per_class_f1"] == [pytest.approx(2 / 3), pytest.approx(2 / 3), 0.0]


@pytest.mark.parametrize("seed", range(4))
def test_every_figure_matches_scikit_learn(seed):
    from sklearn.metrics import confusion_matrix, f1_score, log_loss, precision_score, recall_score, roc_auc_score

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 60)
    y[y == 3] = 2  # class 3 absent: no recall, and left out of macro-F1 and AUROC
    logits = np.round(rng.normal(size=(60, 4)) + 2 * np.eye(4)[y] * (seed % 2), 1)  # rounded: tied scores
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = classification_metrics(y, probs)
    predicted = probs.argmax(axis=1)
    present = np.unique(y)
    assert m["confusion"] == confusion_matrix(y, predicted, labels=range(4)).tolist()
    assert m["loss"] == pytest.approx(log_loss(y, probs, labels=range(4)), rel=1e-9)
    assert m["macro_f1"] == pytest.approx(f1_score(y, predicted, labels=present, average="macro", zero_division=0))
    assert m["auroc"] == pytest.approx(np.mean([roc_auc_score(y == k, probs[:, k]) for k in present]))
    recall = recall_score(y, predicted, labels=present, average=None, zero_division=0)
    assert [m["per_class_recall"][k] for k in present] == pytest.approx(list(recall))
    precision = precision_score(y, predicted, labels=range(4), average=None, zero_division=0)
    assert [p if p is not None else 0.0 for p in m["per_class_precision"]] == pytest.approx(list(precision))


def test_fairness_names_the_worst_hospital_and_the_gap():
    out = fairness({"hospital-01": 0.9, "hospital-02": 0.6, "hospital-03": 0.75})
    assert out["worst_hospital"] == "hospital-02" and out["worst_accuracy"] == 0.6
    assert out["gap"] == pytest.approx(0.3) and out["std"] == pytest.approx(np.std([0.9, 0.6, 0.75]))
    assert fairness({}) is None
