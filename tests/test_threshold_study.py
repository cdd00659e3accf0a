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


# --- report --bench-state: the same comparison on a line bench's runs ---------------------------


def test_val_only_policies_are_the_threshold_options_as_defect_train_composes_them(study):
    settings = study.val_only_policies(0.05)
    assert not any(s["policy"] == "cross_val" for s in settings.values())  # needs fold models
    assert {s["policy"] for s in settings.values()} == {
        "max_recall_at_fp", "f1_max", "fp_rate_bound", "cost", "min_fp_at_recall", "fixed"}
    # the study's hand-written k=0 is conf/threshold/max_recall_at_fp.yaml, the current default
    assert settings["max_recall_at_fp k=0"] == study.policies(0.05)["max_recall_at_fp k=0"]
    assert study.current_default(settings) == "max_recall_at_fp k=0"
    assert settings["max_recall_at_fp k=1"]["max_fp"] == 1
    assert settings["fp_rate_bound exp_tail"]["estimator"] == "exp_tail"
    assert study.val_only_policies(0.02)["fp_rate_bound normal"]["max_fp_rate"] == 0.02


def _bench(tmp_path, runs):
    """A line bench state and per-run artifact folders (scores + reports/threshold.json)."""
    import json

    rows = []
    for i, (line, seed, val, test, logged) in enumerate(runs):
        run_id = f"run{i}"
        folder = tmp_path / run_id
        (folder / "scores").mkdir(parents=True)
        (folder / "reports").mkdir()
        val.to_csv(folder / "scores" / "val_scores.csv", index=False)
        test.to_csv(folder / "scores" / "test_scores.csv", index=False)
        config = {"policy": "max_recall_at_fp", "max_fp": 0}
        (folder / "reports" / "threshold.json").write_text(json.dumps(
            {"value": logged, "policy": "max_recall_at_fp", "config": config}))
        rows.append({"line": line, "recipe": "default", "seed": seed, "status": "ok", "run_id": run_id,
                     "test/auroc": 0.9})
    rows.append({"line": "x", "recipe": "default", "seed": 9, "status": "failed"})
    rows.append({"line": "x", "recipe": "auto", "seed": 0, "status": "ok", "run_id": "other"})
    state = tmp_path / "bench.json"
    state.write_text(json.dumps({"rows": rows}))
    return state


def test_bench_report_rejudges_every_run_and_counts_test_fp_above_the_val_bound(study, tmp_path, monkeypatch):
    val = _frame([0.1, 0.2, 0.3] * 10, [0.6, 0.8])  # 30 goods: 0 FP supports "below 9.5 %"
    held = _frame([0.1, 0.2] * 10, [0.5, 0.9])  # 0 of 20 goods above 0.45
    broke = _frame([0.1] * 16 + [0.7] * 4, [0.5, 0.9])  # 4 of 20 goods (20 %) above 0.45
    state = _bench(tmp_path, [("a", 0, val, held, 0.45), ("a", 1, val, broke, 0.45),
                              ("b", 0, val, held, 0.3)])
    runs = study.bench_runs(state)
    assert [(r["line"], r["seed"]) for r in runs] == [("a", 0), ("a", 1), ("b", 0)]
    settings = {"max_recall_at_fp k=0": {"policy": "max_recall_at_fp", "max_fp": 0},
                "fixed": {"policy": "fixed", "value": 0.95}}
    rows, checks = study.evaluate_bench(runs, lambda run_id: tmp_path / run_id, settings)
    # the logged threshold is reproduced where it is the policy's (0.45), flagged where it is not
    assert checks.reproduced.tolist() == [True, True, False]
    k0 = rows[rows.policy == "max_recall_at_fp k=0"].set_index(["dataset", "seed"])
    assert k0.threshold.tolist() == pytest.approx([0.45] * 3) and k0.val_fp.tolist() == [0, 0, 0]
    assert k0.loc[("a", 1), "fp"] == 4 and k0.loc[("a", 1), "val_fp_bound"] == pytest.approx(0.0950, abs=1e-3)
    bounds = study.above_bound(rows).set_index("policy")
    assert bounds.loc["max_recall_at_fp k=0", "above"] == 1 and bounds.loc["fixed", "above"] == 0
    assert bounds.loc["max_recall_at_fp k=0", "p"] == pytest.approx(1 - 0.95 ** 3)
    per_line = study.line_rule_table(rows)
    assert per_line.loc["max_recall_at_fp k=0", "pooled FP rate worst"] == pytest.approx(0.1)  # 4 of 40
    assert per_line.loc["max_recall_at_fp k=0", "worst FP line"] == "a"
    args = argparse.Namespace(max_fp_rate=0.05)
    monkeypatch.setattr(study, "VAL_ONLY_OPTIONS", {"max_recall_at_fp k=0": ("max_recall_at_fp", []),
                                                    "fixed": ("fixed", [])})
    text = study.bench_markdown(args, rows, checks, settings, "max_recall_at_fp k=0", "cmd")
    # k=0 pools 10 % FP on line a: not eligible; fixed (0.95) has no FP anywhere
    assert "**Chosen on the 2 dev lines: fixed**" in text and "is max_recall_at_fp k=0." in text
    assert "| max_recall_at_fp k=0 | a | 1 | 0 / 30 | 9.5 % | 4 / 20 | 20.0 % |" in text
    assert "in 2 of 3 runs" in text
