"""The torchmetrics collections logged per stage."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryAveragePrecision,
    BinaryF1Score,
    BinaryPrecision,
    BinaryRecall,
)


def decision_metrics(prefix: str) -> MetricCollection:
    """Metrics of hard decisions (fed 0/1 predictions made at the stage's threshold)."""
    return MetricCollection({
        "accuracy": BinaryAccuracy(),
        "precision": BinaryPrecision(zero_division=0),
        "recall": BinaryRecall(zero_division=0),
        "f1": BinaryF1Score(zero_division=0),
    }, prefix=prefix)


def ranking_metrics(prefix: str) -> MetricCollection:
    """Threshold-free metrics of the defect probability."""
    return MetricCollection({"auroc": BinaryAUROC(), "ap": BinaryAveragePrecision()}, prefix=prefix)


def separation_margin(log_odds: torch.Tensor, labels: torch.Tensor) -> float:
    """Lowest defect score minus highest good score, in log-odds of p_defect.

    Positive: the split is perfectly separated and any threshold in the gap is exact on it; the
    wider the gap, the more room a threshold chosen there has for images it has not seen (AUROC
    stays 1.000 however thin the gap is). Negative: the classes overlap by that much. NaN when a
    class is missing."""
    good, defect = log_odds[labels == 0], log_odds[labels == 1]
    if len(good) == 0 or len(defect) == 0:
        return float("nan")
    return float(defect.min() - good.max())
