"""fp_rate_bound / cross_val thresholds, the Clopper-Pearson bound and the fragility warning."""

import numpy as np
import pytest
from scipy import stats

from defect_detection import UserError
from defect_detection.evaluation.fp_rate import fp_rate_threshold, fp_rate_upper_bound, logit, sigmoid
from defect_detection.evaluation.thresholds import choose_threshold


def _normal_val(n_good=80, n_defect=20, outlier=None, seed=0):
    rng = np.random.default_rng(seed)
    good = sigmoid(rng.normal(-4.0, 1.0, n_good))
    defect = sigmoid(rng.normal(3.0, 1.0, n_defect))
    if outlier is not None:
        good[0] = outlier
    scores = np.concatenate([good, defect])
    return scores, np.array([0] * n_good + [1] * n_defect)


def test_clopper_pearson_zero_in_80_is_about_3_7_percent():
    assert fp_rate_upper_bound(0, 80) == pytest.approx(1 - 0.05 ** (1 / 80), rel=1e-9)
    assert 0.036 < fp_rate_upper_bound(0, 80) < 0.038
    assert fp_rate_upper_bound(2, 40) > fp_rate_upper_bound(0, 40) > fp_rate_upper_bound(0, 400)


def test_exp_tail_hits_the_target_on_an_exponential_tail():
    z = np.random.default_rng(2).exponential(1.3, 20000) - 5.0
    t = logit(fp_rate_threshold(sigmoid(z), 0.05, "exp_tail"))
    assert t == pytest.approx(-5.0 + 1.3 * np.log(20), abs=0.1)
    assert np.mean(z >= t) == pytest.approx(0.05, abs=0.01)


@pytest.mark.parametrize("estimator", ["normal", "robust_normal", "bootstrap"])
def test_fp_rate_threshold_hits_the_target_on_a_large_normal_sample(estimator):
    z = np.random.default_rng(1).normal(-2.0, 1.5, 20000)
    t = fp_rate_threshold(sigmoid(z), 0.05, estimator)
    expected = -2.0 + 1.5 * stats.norm.ppf(0.95)
    assert logit(t) == pytest.approx(expected, abs=0.1)
    assert np.mean(z >= logit(t)) == pytest.approx(0.05, abs=0.01)


def test_one_odd_val_good_moves_max_recall_at_fp_but_not_robust_fp_rate_bound():
    clean, labels = _normal_val()
    odd, _ = _normal_val(outlier=0.99)
    k0 = [choose_threshold("max_recall_at_fp", s, labels).value for s in (clean, odd)]
    robust = [choose_threshold("fp_rate_bound", s, labels, estimator="robust_normal").value
              for s in (clean, odd)]
    assert logit(k0[1]) - logit(k0[0]) > 3  # the single odd good image decides k=0
    assert abs(logit(robust[1]) - logit(robust[0])) < 0.3


def test_fragility_warning_names_the_image_that_fixes_the_threshold():
    scores, labels = _normal_val(outlier=0.99)
    paths = [f"img{i}.png" for i in range(len(scores))]
    choice = choose_threshold("max_recall_at_fp", scores, labels, paths=paths)
    assert choice.fragile["images"] == 1 and choice.fragile["paths"] == ["img0.png"]
    assert any("alone fix the threshold" in w and "img0.png" in w for w in choice.warnings)
    assert not choose_threshold("fp_rate_bound", scores, labels, estimator="robust_normal").fragile


def test_choice_reports_bound_and_margin():
    scores, labels = _normal_val()
    choice = choose_threshold("max_recall_at_fp", scores, labels)
    assert choice.counts["fp"] == 0
    assert choice.fp_rate_upper_bound == pytest.approx(fp_rate_upper_bound(0, 80))
    assert choice.margin["to_good"] > 0 and choice.margin["to_defect"] > 0
    fields = choice.log_fields()
    assert {"policy", "fp_rate_upper_bound", "margin", "fragile"} <= set(fields)


def test_cross_val_uses_the_fp_rate_estimator_and_ignores_folds():
    scores, labels = _normal_val()
    a = choose_threshold("cross_val", scores, labels, folds=5)
    b = choose_threshold("fp_rate_bound", scores, labels)
    assert a.value == b.value and a.policy == "cross_val"


def test_bad_fp_rate_settings_are_one_clear_error():
    scores, labels = _normal_val()
    with pytest.raises(UserError, match="max_fp_rate"):
        choose_threshold("fp_rate_bound", scores, labels, max_fp_rate=0.0)
    with pytest.raises(UserError, match="estimator"):
        choose_threshold("fp_rate_bound", scores, labels, estimator="gev")


def test_cross_val_folds_are_stratified_disjoint_and_refuse_a_fold_without_defects():
    from defect_detection.data.records import ImageRecord
    from defect_detection.evaluation.cross_val import folds

    recs = [ImageRecord(path=f"g{i}.png", label=0, category="c", defect_type="good") for i in range(9)]
    recs += [ImageRecord(path=f"d{i}.png", label=1, category="c", defect_type="x") for i in range(6)]
    parts = folds(recs, 3, seed=0)
    assert sorted(r.path for p in parts for r in p) == sorted(r.path for r in recs)
    assert [sum(r.label for r in p) for p in parts] == [2, 2, 2]
    with pytest.raises(UserError, match="fold .* has no defect"):
        folds(recs[:9] + recs[9:11], 3, seed=0)
