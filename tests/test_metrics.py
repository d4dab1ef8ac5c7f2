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


def test_fairness_names_the_worst_hospital_and_the_gap():
    out = fairness({"hospital-01": 0.9, "hospital-02": 0.6, "hospital-03": 0.75})
    assert out["worst_hospital"] == "hospital-02" and out["worst_accuracy"] == 0.6
    assert out["gap"] == pytest.approx(0.3) and out["std"] == pytest.approx(np.std([0.9, 0.6, 0.75]))
    assert fairness({}) is None
