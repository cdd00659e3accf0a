"""auto/fusion.py: two scores on one scale, the weight chosen on val, singles kept on ties."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from defect_detection import UserError
from defect_detection.auto.fusion import Standardiser, aligned, choose_fusion
from defect_detection.evaluation.metrics import auroc_of as auroc


def _split(seed: int, n_good: int = 60, n_defect: int = 40) -> pd.DataFrame:
    """A supervised score that sees defects of kind 0 and a good-only score that sees kind 1."""
    rng = np.random.default_rng(seed)
    label = np.r_[np.zeros(n_good, int), np.ones(n_defect, int)]
    kind = np.r_[np.full(n_good, -1), np.arange(n_defect) % 2]
    a = rng.normal(0, 1, len(label)) * 3 + 5 + 4 * (kind == 0)  # its own scale and offset
    b = rng.normal(0, 1, len(label)) * 0.2 - 1 + 0.8 * (kind == 1)
    paths = [f"{seed}/{k}.png" for k in range(len(label))]
    return pd.DataFrame({"path": paths, "label": label, "a": a, "b": b})


def test_fusion_puts_both_scores_on_the_val_goods_scale_and_mixes_what_each_misses():
    val, test = _split(0), _split(1)
    fusion = choose_fusion(val)
    goods = val[val.label == 0]
    assert fusion.a(goods.a).mean() == pytest.approx(0, abs=1e-9)
    assert fusion.b(goods.b).std(ddof=1) == pytest.approx(1)
    assert 0 < fusion.weight < 1  # neither alone: each misses half the defects
    fused = auroc(fusion(test.a, test.b), test.label)
    assert fused > max(auroc(test.a, test.label), auroc(test.b, test.label)) + 0.05


def test_a_single_score_is_kept_unless_the_mix_beats_it_by_more_than_the_allowance():
    val = _split(0)
    val["a"] = val["a"] + 20 * val["label"]  # the supervised score alone separates val perfectly
    assert choose_fusion(val).weight == 1.0
    mixed = choose_fusion(_split(0)).val_auroc
    best_single = max(mixed[1.0], mixed[0.0])
    # an allowance larger than the mix's gain keeps the first single within it
    assert choose_fusion(_split(0), allowance=max(mixed.values()) - best_single + 0.01).weight in (1.0, 0.0)


def test_fusion_refuses_runs_scored_on_different_images_and_val_without_goods():
    val = _split(0)
    a = val[["path", "label"]].assign(log_odds=val.a)
    b = val[["path", "label"]].assign(log_odds=val.b).iloc[:-3]
    with pytest.raises(UserError, match="same images: 100 and 97 rows"):
        aligned(a, b)
    assert list(aligned(a, a.assign(log_odds=val.b)).columns) == ["path", "label", "a", "b"]
    with pytest.raises(UserError, match="at least 2 good val images"):
        Standardiser.of_goods(np.array([1.0, 2.0]), np.array([0, 1]))
