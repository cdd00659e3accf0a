"""The torchmetrics collections logged per stage."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
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

log = logging.getLogger(__name__)


class _Undefined:
    """compute() is NaN when the targets hold one class: torchmetrics returns 0 (AUROC) or -0 (AP)
    there, a number that looks like a (terrible) score though the metric is undefined."""

    def compute(self) -> torch.Tensor:
        target = self.target if isinstance(self.target, torch.Tensor) else (
            torch.cat([t.flatten() for t in self.target]) if self.target else torch.empty(0))
        if target.numel() == 0 or bool((target == target.flatten()[0]).all()):
            return torch.tensor(float("nan"))
        return super().compute()


class DefinedAUROC(_Undefined, BinaryAUROC):
    pass


class DefinedAveragePrecision(_Undefined, BinaryAveragePrecision):
    pass


def auroc_of(scores, labels) -> float:
    """AUROC of any real-valued scores (NaN when the labels hold one class). Their ranks go to the
    metric, not the scores: torchmetrics squashes scores outside [0, 1] through a sigmoid, which
    ties large ones (log-odds, distances, standardised scores) that were not tied."""
    ranks = pd.Series(np.asarray(scores, dtype=float)).rank(method="average").to_numpy()
    metric = DefinedAUROC()
    metric.update(torch.tensor(ranks / max(1, len(ranks))), torch.tensor(np.asarray(labels, dtype=int)))
    return float(metric.compute())


def ranking_metrics(prefix: str) -> MetricCollection:
    """Threshold-free metrics of the defect probability (NaN when the split holds one class)."""
    return MetricCollection({"auroc": DefinedAUROC(), "ap": DefinedAveragePrecision()}, prefix=prefix)


def undefined_metrics(metrics: Mapping[str, float]) -> list[str]:
    """Names of the NaN (undefined) values, e.g. val/auroc when val holds a single class."""
    return sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and math.isnan(v)
                  or isinstance(v, torch.Tensor) and v.numel() == 1 and bool(torch.isnan(v)))


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
