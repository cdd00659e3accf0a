import numpy as np
import pytest

from defect_detection import UserError
from defect_detection.evaluation.thresholds import choose_threshold, counts_at

GOOD = [0.05, 0.1, 0.2, 0.6]
DEFECT = [0.3, 0.5, 0.7, 0.9, 0.95]


def _data():
    scores = np.array(GOOD + DEFECT)
    labels = np.array([0] * len(GOOD) + [1] * len(DEFECT))
    return scores, labels


def test_fixed_is_taken_as_given():
    choice = choose_threshold("fixed", *_data(), value=0.2)
    assert choice.value == 0.2 and choice.counts == {"tp": 5, "fp": 2, "fn": 0, "tn": 2}


def test_max_recall_at_zero_fp_sits_between_worst_good_and_next_defect():
    choice = choose_threshold("max_recall_at_fp", *_data(), max_fp=0)
    assert choice.value == pytest.approx(0.65)  # midpoint of 0.6 (good) and 0.7 (defect)
    assert choice.counts == {"tp": 3, "fp": 0, "fn": 2, "tn": 4}


def test_max_recall_at_one_fp():
    choice = choose_threshold("max_recall_at_fp", *_data(), max_fp=1)
    assert choice.value == pytest.approx(0.25) and choice.counts["fp"] == 1 and choice.counts["tp"] == 5


def test_min_fp_at_recall():
    choice = choose_threshold("min_fp_at_recall", *_data(), min_recall=0.8)
    assert choice.counts == {"tp": 4, "fp": 1, "fn": 1, "tn": 3}
    assert choice.value == pytest.approx(0.4)


def test_f1_max():
    choice = choose_threshold("f1_max", *_data())
    # tp=5, fp=1 (F1 0.909) beats tp=4, fp=1 and tp=3, fp=0 (0.75)
    assert choice.counts == {"tp": 5, "fp": 1, "fn": 0, "tn": 3}
    assert choice.value == pytest.approx(0.25)


def test_cost_weighs_misses_against_false_alarms():
    cheap_misses = choose_threshold("cost", *_data(), cost_fp=10, cost_fn=1)
    assert cheap_misses.counts["fp"] == 0
    costly_misses = choose_threshold("cost", *_data(), cost_fp=1, cost_fn=10)
    assert costly_misses.counts["fn"] == 0 and costly_misses.counts["fp"] == 1


def test_perfect_separation_gets_the_middle_of_the_gap():
    scores, labels = np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])
    for policy in ("max_recall_at_fp", "f1_max", "cost"):
        assert choose_threshold(policy, scores, labels).value == pytest.approx(0.5)


def test_no_defects_on_val_falls_back_with_warning(caplog):
    choice = choose_threshold("f1_max", np.array([0.1, 0.4]), np.array([0, 0]), fallback=0.5)
    assert choice.value == 0.5 and "no defect images" in choice.warnings[0]
    assert "no defect images" in caplog.text


def test_all_scores_equal_is_defined_and_warned():
    scores, labels = np.full(6, 0.5), np.array([0, 0, 0, 1, 1, 1])
    choice = choose_threshold("max_recall_at_fp", scores, labels)
    assert choice.counts["fp"] == 0 and choice.counts["tp"] == 0 and choice.value > 0.5
    assert any("all val scores are equal" in w for w in choice.warnings)


def test_ties_prefer_fewer_false_positives_then_higher_threshold():
    # both t=0.35 (tp 2, fp 1) and t=0.65 (tp 1, fp 0) give cost 1 with unit costs
    scores, labels = np.array([0.3, 0.4, 0.6, 0.7]), np.array([1, 0, 1, 1])
    choice = choose_threshold("cost", scores, labels, cost_fp=1, cost_fn=1)
    assert choice.counts["fp"] == 0


def test_bad_values_are_refused():
    with pytest.raises(UserError, match=r"threshold.value=1.5"):
        choose_threshold("fixed", *_data(), value=1.5)
    with pytest.raises(UserError, match="unknown"):
        choose_threshold("median", *_data())


def test_counts_use_greater_or_equal():
    c = counts_at(np.array([0.5, 0.5]), np.array([0, 1]), np.array([0.5]))
    assert (c["tp"][0], c["fp"][0]) == (1, 1)


def test_saturated_good_scores_fall_back_to_the_fewest_false_positives_with_a_warning():
    scores = np.array([0.1, 0.2, 1.0, 1.0, 1.0, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1])
    choice = choose_threshold("max_recall_at_fp", scores, labels, max_fp=0)
    assert choice.counts["fp"] == 1 and choice.counts["fn"] == 0  # fewest FP, then most recall
    assert any("p_defect = 1.0" in w for w in choice.warnings)
