"""Folds of train+val for threshold=cross_val, and the fold models' test scores as one ensemble.
The fold models themselves are trained by pipeline/cross_val.py."""

from __future__ import annotations

import logging
import random
from collections import defaultdict

import numpy as np
import pandas as pd

from defect_detection.base import UserError
from defect_detection.data.records import ImageRecord

log = logging.getLogger(__name__)


def folds(records: list[ImageRecord], k: int, seed: int) -> list[list[ImageRecord]]:
    """k folds, each (category, label) stratum dealt round-robin after a seeded shuffle."""
    if k < 2:
        raise UserError(f"threshold.folds={k}: cross-validation needs at least 2 folds.")
    strata: dict[tuple[str, int], list[ImageRecord]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r.path):
        strata[(r.category, int(r.label))].append(r)
    out: list[list[ImageRecord]] = [[] for _ in range(k)]
    rng, start = random.Random(seed), 0
    for key in sorted(strata):
        items = strata[key]
        rng.shuffle(items)
        for i, r in enumerate(items):
            out[(start + i) % k].append(r)
        start += len(items)  # small strata do not all land in fold 0
    for i, fold in enumerate(out):
        labels = {int(r.label) for r in fold}
        if labels != {0, 1}:
            raise UserError(f"threshold.folds={k}: fold {i} of train+val has no "
                            f"{'defect' if 1 not in labels else 'good'} image; use fewer folds.")
    return out


def ensemble_scores(fold_test: pd.DataFrame) -> pd.DataFrame:
    """The k fold models as one ensemble: the mean of their log-odds per image."""
    keys = ["path", "category", "defect_type", "label"]
    out = fold_test.groupby(keys, sort=False, as_index=False).log_odds.mean()
    out["p_defect"] = 1.0 / (1.0 + np.exp(-out.log_odds))
    return out[[*keys, "p_defect", "log_odds"]]
