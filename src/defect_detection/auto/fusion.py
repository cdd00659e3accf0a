"""Score fusion of two finished candidates, with the weight chosen on val.

PatchCore's distance to good parts and a supervised score err on different photos: a defect unlike
the labelled ones is far from every good patch, and a good photo with an odd texture can still be
scored good by a model that learned what defects look like (SuperSimpleNet-style methods combine
the two). Each score is standardised by its val goods (mean and standard deviation of their
log-odds), so the two are on one scale without looking at a defect, then mixed as
w * supervised + (1 - w) * good-only. The weight is chosen on val AUROC over a fixed grid; the
single models (w = 1, w = 0) come first, so a mix is only chosen when val shows it better by more
than the auto recipe's noise allowance (auto.tie_se standard errors, as for any candidate).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from defect_detection.base import UserError
from defect_detection.evaluation.metrics import auroc_of

WEIGHTS = (1.0, 0.0, 0.75, 0.5, 0.25)  # singles first: they win ties


@dataclass(frozen=True)
class Standardiser:
    """Log-odds -> standard units of the val goods' log-odds."""

    mean: float
    std: float

    @classmethod
    def of_goods(cls, log_odds: np.ndarray, labels: np.ndarray) -> Standardiser:
        goods = np.asarray(log_odds, float)[np.asarray(labels) == 0]
        if len(goods) < 2:
            raise UserError("Score fusion needs at least 2 good val images to put two scores on one scale.")
        return cls(float(goods.mean()), float(max(goods.std(ddof=1), 1e-6)))

    def __call__(self, log_odds: np.ndarray) -> np.ndarray:
        return (np.asarray(log_odds, float) - self.mean) / self.std


@dataclass(frozen=True)
class Fusion:
    """w * a + (1 - w) * b of the two standardised scores; `val_auroc` per weight tried."""

    weight: float
    a: Standardiser
    b: Standardiser
    val_auroc: dict[float, float]

    def __call__(self, a_log_odds: np.ndarray, b_log_odds: np.ndarray) -> np.ndarray:
        return self.weight * self.a(a_log_odds) + (1.0 - self.weight) * self.b(b_log_odds)


def aligned(a: pd.DataFrame, b: pd.DataFrame) -> pd.DataFrame:
    """Two runs' score tables of one split, joined on the image path (columns a, b, label)."""
    both = a[["path", "label", "log_odds"]].merge(b[["path", "log_odds"]], on="path", suffixes=("_a", "_b"))
    if len(both) != len(a) or len(both) != len(b):
        raise UserError(f"Score fusion needs both runs scored on the same images: {len(a)} and {len(b)} "
                        f"rows, {len(both)} in common. Fuse runs trained on one split (the same data and "
                        "split settings).")
    return both.rename(columns={"log_odds_a": "a", "log_odds_b": "b"})


def choose_fusion(val: pd.DataFrame, allowance: float = 0.0, weights: Sequence[float] = WEIGHTS) -> Fusion:
    """The first weight, in order, whose val AUROC is within `allowance` of the best one (auto's
    own rule for candidates: singles come first, so val noise keeps a single model)."""
    labels = val["label"].to_numpy()
    sa = Standardiser.of_goods(val["a"].to_numpy(), labels)
    sb = Standardiser.of_goods(val["b"].to_numpy(), labels)
    tried = {float(w): auroc_of(w * sa(val["a"].to_numpy()) + (1 - w) * sb(val["b"].to_numpy()), labels)
             for w in weights}
    finite = [v for v in tried.values() if not np.isnan(v)]
    if not finite:
        raise UserError("Score fusion needs good and defect images on val to choose a weight.")
    best = max(finite)
    weight = next(w for w, v in tried.items() if not np.isnan(v) and v >= best - allowance - 1e-9)
    return Fusion(weight, sa, sb, tried)
