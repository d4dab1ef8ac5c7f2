"""Classification metrics, computed with numpy (`classification_metrics` says why)."""

from __future__ import annotations

import math

import numpy as np

from fedmed.errors import FedmedError

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error


def calibration(y_true: np.ndarray, probs: np.ndarray, bins: int = ECE_BINS) -> tuple[float, float]:
    """(expected calibration error, Brier score). ECE: over `bins` equal-width bins of the
    top-class confidence, the share of images in each bin times |its accuracy - its mean
    confidence| (Guo et al. 2017). Brier: the mean over images of sum_k (p_k - [y = k])^2."""
    if len(y_true) == 0:
        return math.nan, math.nan
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    correct = predicted == y_true
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    ece = sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * (which == b).mean() for b in range(bins) if (which == b).any())
    onehot = np.eye(probs.shape[1])[y_true]
    return float(ece), float(((probs - onehot) ** 2).sum(axis=1).mean())


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, object]:
    """Loss, accuracy, macro-F1, per-class precision, recall and F1, one-vs-rest AUROC,
    calibration (ECE over ECE_BINS bins, Brier score), confusion.

    AUROC is the mean one-vs-rest AUROC over the classes present in `y_true`
    (None with fewer than two: it is undefined). A class never predicted has no
    precision (None); one absent from `y_true` no recall. Macro-F1 is over the classes
    present, a class never predicted counting 0.

    numpy, not scikit-learn: a deployed hospital evaluates in a fresh ClientApp process
    for every request, and importing scikit-learn (with scipy.stats) costs each one 2-3 s
    of CPU. tests/test_metrics.py holds every figure to scikit-learn's.
    """
    if not np.isfinite(probs).all():
        raise FedmedError("training diverged (the model outputs NaN): lower train.lr")
    num_classes = probs.shape[1]
    classes = np.arange(num_classes)
    y_pred = probs.argmax(axis=1)
    cm = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    recall = [float(cm[k, k] / support[k]) if support[k] else None for k in classes]
    precision = [float(cm[k, k] / predicted[k]) if predicted[k] else None for k in classes]
    f1 = [2 * p * r / (p + r) if p is not None and r is not None and p + r > 0 else (0.0 if support[k] else None) for k, (p, r) in enumerate(zip(precision, recall, strict=True))]
    ece, brier = calibration(y_true, probs)
    present = np.unique(y_true)
    auroc: float | None = None
    if len(present) >= 2:
        auroc = float(np.mean([_auroc(y_true == k, probs[:, k]) for k in present]))
    eps = np.finfo(probs.dtype).eps
    return {
        "loss": float(-np.log(np.clip(probs[np.arange(len(y_true)), y_true], eps, 1.0)).mean()) if len(y_true) else math.nan,
        "accuracy": float((y_pred == y_true).mean()),
        "macro_f1": from_confusion(cm)["macro_f1"],
        "auroc": auroc,
        "per_class_recall": recall,
        "per_class_precision": precision,
        "per_class_f1": f1,
        "ece": ece,
        "brier": brier,
        "confusion": cm.tolist(),
        "examples": int(len(y_true)),
    }


def _auroc(positive: np.ndarray, scores: np.ndarray) -> float:
    """The area under the ROC curve as the Mann-Whitney statistic: the chance that a
    positive outscores a negative, a tie counting half (average ranks)."""
    order = np.argsort(scores, kind="stable")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def from_confusion(cm: np.ndarray) -> dict[str, object]:
    """Accuracy, macro-F1 and recall from summed confusion counts (federated evaluation)."""
    cm = np.asarray(cm, dtype=np.int64)
    total = cm.sum()
    tp = np.diag(cm).astype(float)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    present = support > 0
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=present)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(tp), where=(precision + recall) > 0)
    return {
        "accuracy": float(tp.sum() / total) if total else math.nan,
        "macro_f1": float(f1[present].mean()) if present.any() else math.nan,
        "per_class_recall": [float(r) if p else None for r, p in zip(recall, present, strict=True)],
        "examples": int(total),
    }
