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
    chosen, unconstrained, table = study.default_rule(rows, 0.05)
    assert chosen == unconstrained == "b"
    assert not table.loc["c", "eligible"] and "d" not in table.index
    # a measured-only row (no threshold= option delivers it) is reported but never the default
    chosen, unconstrained, table = study.default_rule(rows, 0.05, not_deployable=("b",))
    assert chosen == "a" and unconstrained == "b" and not table.loc["b", "eligible"]


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


def test_fold_ensemble_rows_are_judged_on_the_mean_log_odds_of_the_fold_models(study, tmp_path):
    import numpy as np

    from defect_detection.evaluation.cross_val import ensemble_scores

    folder = tmp_path / "synthetic" / "seed0"
    folder.mkdir(parents=True)
    _frame([0.1, 0.2, 0.3], [0.6, 0.8]).to_csv(folder / "val_scores.csv", index=False)
    _frame([0.1, 0.25, 0.7], [0.5, 0.9]).to_csv(folder / "test_scores.csv", index=False)
    _frame([0.1, 0.2, 0.3, 0.15], [0.6, 0.8, 0.7]).to_csv(folder / "oof3_scores.csv", index=False)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    folds = []
    for fold, good_top in enumerate((0.2, 0.6, 0.4)):  # the fold models disagree on one good image
        f = _frame([0.1, 0.1, good_top], [0.9, 0.95]).assign(path=["g0", "g1", "g2", "d0", "d1"], fold=fold)
        folds.append(f.assign(log_odds=logit(f.p_defect), category="c", defect_type="t"))
    pd.concat(folds).to_csv(folder / "folds3_test_scores.csv", index=False)
    ens = ensemble_scores(pd.concat(folds))
    g2 = ens.set_index("path").loc["g2"]
    assert g2.log_odds == pytest.approx(np.mean([logit(0.2), logit(0.6), logit(0.4)]))
    assert g2.p_defect == pytest.approx(1 / (1 + np.exp(-g2.log_odds))) and len(ens) == 5
    args = argparse.Namespace(datasets=["synthetic"], seeds=[0], work=str(tmp_path), cv_folds=3,
                              max_fp_rate=0.05, out=str(tmp_path / "t.md"))
    rows = study.evaluate_policies(args).set_index("policy")
    # the same out-of-fold k=0 threshold (0.45, between 0.3 and 0.6); judged on the final model's test
    # scores one good (0.7) is a false positive, on the ensemble's (mean p ~0.4) none is
    assert rows.loc["cross_val max_recall k=0", "fp"] == 1
    assert rows.loc["cross_val ensemble max_recall k=0", "fp"] == 0
    assert rows.loc["cross_val ensemble max_recall k=0", "threshold"] == rows.loc["cross_val max_recall k=0",
                                                                                   "threshold"]
    text = study.markdown(args, study.evaluate_policies(args), "cmd")
    assert "fold models ensembled: test AUROC" in text and "| synthetic | 0 | 0.8333 | 1.0000 |" in text
