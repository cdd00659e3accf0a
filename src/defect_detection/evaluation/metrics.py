"""The torchmetrics collections logged per stage."""

from __future__ import annotations

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
