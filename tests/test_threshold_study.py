"""scripts/threshold_study.py: the oracle, the gap and the default rule on hand-made scores."""

from __future__ import annotations

import argparse

import pandas as pd
import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def study():
    return load_script("threshold_study")


def _frame(good, defect):
    return pd.DataFrame({"p_defect": good + defect, "label": [0] * len(good) + [1] * len(defect)})


def test_oracle_is_the_best_test_recall_at_no_more_false_positives(study):
    test = _frame([0.1, 0.2, 0.3, 0.5], [0.4, 0.6, 0.7, 0.9])
    high = study.judge(0.8, test)  # 0 FP, 1 of 4 defects; 0.55 finds 3 of 4 at 0 FP
    assert high["fp"] == 0 and high["recall"] == 0.25 and high["oracle"] == 0.75
    assert high["gap"] == pytest.approx(0.5)
    low = study.judge(0.35, test)  # 1 FP (0.5), all 4 defects
    assert low["fp"] == 1 and low["fp_rate"] == 0.25 and low["gap"] == 0


def test_default_rule_takes_the_smallest_worst_gap_among_policies_within_target(study):
    rows = pd.DataFrame([
        {"policy": "a", "dataset": "x", "seed": 0, "fp": 0, "n_good": 20, "gap": 0.3},
        {"policy": "a", "dataset": "y", "seed": 0, "fp": 1, "n_good": 20, "gap": 0.0},
        {"policy": "b", "dataset": "x", "seed": 0, "fp": 0, "n_good": 20, "gap": 0.1},
        {"policy": "b", "dataset": "y", "seed": 0, "fp": 0, "n_good": 20, "gap": 0.1},
        {"policy": "c", "dataset": "x", "seed": 0, "fp": 5, "n_good": 20, "gap": 0.0},
        {"policy": "c", "dataset": "y", "seed": 0, "fp": 0, "n_good": 20, "gap": 0.0},
        {"policy": "d", "dataset": "x", "seed": 0, "fp": 0, "n_good": 20, "gap": 0.0},  # not everywhere
    ])
    chosen, table = study.default_rule(rows, 0.05)
    assert chosen == "b"
    assert not table.loc["c", "eligible"] and "d" not in table.index


def test_report_reads_collected_scores_and_writes_the_table(study, tmp_path):
    for seed in (0, 1):
        folder = tmp_path / "synthetic" / f"seed{seed}"
        folder.mkdir(parents=True)
        _frame([0.1, 0.2, 0.3], [0.6, 0.8]).to_csv(folder / "val_scores.csv", index=False)
        _frame([0.1, 0.25, 0.7], [0.5, 0.9]).to_csv(folder / "test_scores.csv", index=False)
    args = argparse.Namespace(datasets=["synthetic"], seeds=[0, 1], work=str(tmp_path), cv_folds=3,
                              max_fp_rate=0.05, out=str(tmp_path / "t.md"))
    rows = study.evaluate_policies(args)
    k0 = rows[rows.policy == "max_recall_at_fp k=0"].iloc[0]
    assert k0.threshold == pytest.approx(0.45) and k0.fp == 1 and k0.recall == 1.0
    text = study.markdown(args, rows, "python scripts/threshold_study.py report")
    assert "| max_recall_at_fp k=0 | synthetic | 2 |" in text and "cross_val" not in text.split("## Per")[1]
