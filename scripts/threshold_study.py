#!/usr/bin/env python
"""How well does a threshold chosen on val hold on test? One training run per (data set, split
seed) with the default recipe, then every threshold policy applied to that run's val scores and
judged on its test scores beside the oracle (the best test recall at the same test FP count).

    python scripts/threshold_study.py collect               # train: every data set x seeds 0-4
    python scripts/threshold_study.py collect --cv          # + out-of-fold scores (k extra models)
    python scripts/threshold_study.py report                # policies -> docs/results/threshold_study.md

`collect` writes each run's scores (the same scores/{val,test}_scores.csv every defect-train run
logs) under --work/<data set>/seed<k>/, so `report` re-applies policies in seconds. A run whose
scores are already there is not trained again. --cv adds oof_scores.csv: out-of-fold scores of
k models trained over train+val (the cross_val policy, defect_detection/evaluation/cross_val.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir

from defect_detection import project_root
from defect_detection.config import CONFIG_DIR

# the read-only shared data beside the checkout (../shared/data) or beside its worktree folder
SHARED = next((p / "shared" / "data" for p in project_root().parents if (p / "shared" / "data").is_dir()),
              project_root().parent / "shared" / "data")
SYNTH = "${paths.data_dir}"
# name -> the data overrides of the default recipe (the synthetic variants come from data/synthetic.py)
DATASETS = {
    "synthetic": ["data=synthetic"],
    "synthetic_small": ["data=synthetic", f"data.root={SYNTH}/synthetic_small", "data.image_size=64",
                        "data.records.image_size=64", "data.records.n_train_good=16",
                        "data.records.n_test_good=6", "data.records.n_per_defect=4"],
    "bottle": ["data=mvtec", f"data.root={SHARED / 'mvtec'}", "data.categories=[bottle]"],
    "aitex": ["data=folder", f"data.root={SHARED / 'aitex_fabric'}", "data.category=aitex"],
}
FAST = ["log_model=false", "log_data_summary=false", "explain=none", "callbacks.progress_bar=null"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["collect", "report"])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="split seeds")
    p.add_argument("--work", default=str(project_root() / "outputs" / "threshold_study"))
    p.add_argument("--cv", action="store_true", help="collect: also the out-of-fold scores")
    p.add_argument("--cv-folds", type=int, default=3)
    p.add_argument("--max-fp-rate", type=float, default=0.05,
                   help="report: the FP-rate target of the fp_rate_bound and cross_val policies")
    p.add_argument("--out", default=str(project_root() / "docs" / "results" / "threshold_study.md"))
    p.add_argument("--experiment-name", default="threshold-study")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every training run")
    return p.parse_args(argv)


def compose_run(args: argparse.Namespace, dataset: str, seed: int, *extra: str):
    out = Path(args.work) / dataset / f"seed{seed}"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[*DATASETS[dataset], "data.cache=disk", f"seed={seed}",
                                           f"experiment_name={args.experiment_name}",
                                           f"run_name={dataset}-seed{seed}",
                                           f"paths.output_dir={out / 'run'}", *FAST, *extra,
                                           *args.overrides])


def collect(args: argparse.Namespace) -> None:
    from defect_detection.pipeline.fit import train

    for seed in args.seeds:
        for dataset in args.datasets:
            folder = Path(args.work) / dataset / f"seed{seed}"
            if not (folder / "test_scores.csv").exists():
                t0 = time.perf_counter()
                result = train(compose_run(args, dataset, seed))
                for split, frame in result["scores"].items():
                    folder.mkdir(parents=True, exist_ok=True)
                    frame.to_csv(folder / f"{split}_scores.csv", index=False)
                (folder / "run.json").write_text(json.dumps(
                    {"run_id": result["run_id"], "seconds": time.perf_counter() - t0,
                     "test_auroc": float(result["test"].get("test/auroc", float("nan")))}))
                logging.info("%s seed %d: trained in %.0f s", dataset, seed, time.perf_counter() - t0)
            fold_test = folder / f"folds{args.cv_folds}_test_scores.csv"
            if args.cv and not (folder / f"oof{args.cv_folds}_scores.csv").exists() or (
                    args.cv and not fold_test.exists()):
                from defect_detection.pipeline.cross_val import fold_scores

                t0 = time.perf_counter()
                cfg = compose_run(args, dataset, seed, "threshold=cross_val",
                                  f"threshold.folds={args.cv_folds}")
                oof, tests = fold_scores(cfg, score_test=True)
                oof.to_csv(folder / f"oof{args.cv_folds}_scores.csv", index=False)
                tests.to_csv(fold_test, index=False)
                logging.info("%s seed %d: %d-fold scores in %.0f s", dataset, seed, args.cv_folds,
                             time.perf_counter() - t0)


# What no `threshold=` option delivers with the one-network bundle (measured, not candidates for
# the default): max_recall k=0 on out-of-fold scores, and the k fold models ensembled.
NOT_DEPLOYABLE = ("cross_val max_recall k=0", "cross_val ensemble normal",
                  "cross_val ensemble max_recall k=0")


def policies(max_fp_rate: float) -> dict[str, dict]:
    """label -> choose_threshold settings; `scores: oof` marks the cross-validated ones."""
    rate = {"max_fp_rate": max_fp_rate}
    return {
        "max_recall_at_fp k=0": {"policy": "max_recall_at_fp", "max_fp": 0},
        "max_recall_at_fp k=1": {"policy": "max_recall_at_fp", "max_fp": 1},
        "f1_max": {"policy": "f1_max"},
        "fp_rate_bound normal": {"policy": "fp_rate_bound", "estimator": "normal", **rate},
        "fp_rate_bound robust_normal": {"policy": "fp_rate_bound", "estimator": "robust_normal", **rate},
        "fp_rate_bound bootstrap": {"policy": "fp_rate_bound", "estimator": "bootstrap", **rate},
        "fp_rate_bound exp_tail": {"policy": "fp_rate_bound", "estimator": "exp_tail", **rate},
        "cross_val normal": {"policy": "cross_val", "estimator": "normal", "scores": "oof", **rate},
        "cross_val exp_tail": {"policy": "cross_val", "estimator": "exp_tail", "scores": "oof", **rate},
        "cross_val max_recall k=0": {"policy": "max_recall_at_fp", "max_fp": 0, "scores": "oof"},
        # the same thresholds, judged on the k fold models' mean log-odds instead of the final model
        "cross_val ensemble normal": {"policy": "cross_val", "estimator": "normal", "scores": "oof",
                                      "judged_on": "ensemble", **rate},
        "cross_val ensemble max_recall k=0": {"policy": "max_recall_at_fp", "max_fp": 0, "scores": "oof",
                                              "judged_on": "ensemble"},
    }


def judge(choice_value: float, test: pd.DataFrame) -> dict:
    """Test FP rate and recall at the threshold, and the oracle: the best test recall of any
    threshold with no more test false positives."""
    from defect_detection.evaluation.thresholds import candidates, counts_at

    p, y = test.p_defect.to_numpy(), test.label.to_numpy()
    at = {k: int(v[0]) for k, v in counts_at(p, y, np.array([choice_value])).items()}
    ts = candidates(p)
    c = counts_at(p, y, ts)
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    oracle = float((c["tp"][c["fp"] <= at["fp"]]).max() / n_pos)
    recall = at["tp"] / n_pos
    return {"fp": at["fp"], "n_good": n_neg, "fp_rate": at["fp"] / n_neg, "recall": recall,
            "oracle": oracle, "gap": oracle - recall}


def evaluate_policies(args: argparse.Namespace) -> pd.DataFrame:
    from defect_detection.evaluation.thresholds import choose_threshold

    rows = []
    for dataset in args.datasets:
        for seed in args.seeds:
            folder = Path(args.work) / dataset / f"seed{seed}"
            if not (folder / "test_scores.csv").exists():
                continue
            frames = {s: pd.read_csv(folder / f"{s}_scores.csv") for s in ("val", "test")}
            oof = folder / f"oof{args.cv_folds}_scores.csv"
            if oof.exists():
                frames["oof"] = pd.read_csv(oof)
            fold_test = folder / f"folds{args.cv_folds}_test_scores.csv"
            if fold_test.exists():
                from defect_detection.evaluation.cross_val import ensemble_scores

                frames["ensemble"] = ensemble_scores(pd.read_csv(fold_test))
            for label, settings in policies(args.max_fp_rate).items():
                settings = dict(settings)
                source = settings.pop("scores", "val")
                judged_on = settings.pop("judged_on", "test")
                if source not in frames or judged_on not in frames:
                    continue
                sel = frames[source]
                choice = choose_threshold(scores=sel.p_defect.to_numpy(), labels=sel.label.to_numpy(),
                                          chosen_on=source, **settings)
                rows.append({"policy": label, "dataset": dataset, "seed": seed, "threshold": choice.value,
                             "val_fp_bound": choice.fp_rate_upper_bound, "fragile": bool(choice.fragile),
                             "n_sel_good": int((sel.label == 0).sum()),
                             **judge(choice.value, frames[judged_on])})
    return pd.DataFrame(rows)


def summarise(rows: pd.DataFrame, target: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per (policy, data set): mean and worst; per policy: worst over everything and the runs
    whose test FP rate exceeds the target."""
    g = rows.groupby(["policy", "dataset"], sort=False)
    per = g.agg(runs=("seed", "size"), fp_rate_mean=("fp_rate", "mean"), fp_rate_worst=("fp_rate", "max"),
                recall_mean=("recall", "mean"), recall_worst=("recall", "min"),
                oracle_mean=("oracle", "mean"), gap_mean=("gap", "mean"), gap_worst=("gap", "max"),
                val_fp_bound_mean=("val_fp_bound", "mean"), fragile=("fragile", "sum")).reset_index()
    over = rows.assign(over=rows.fp_rate > target + 1e-12)
    tot = over.groupby("policy", sort=False).agg(
        runs=("seed", "size"), datasets=("dataset", "nunique"), gap_mean=("gap", "mean"),
        gap_worst=("gap", "max"), recall_mean=("recall", "mean"), fp_rate_mean=("fp_rate", "mean"),
        fp_rate_worst=("fp_rate", "max"), runs_over_target=("over", "sum")).reset_index()
    return per, tot


def default_rule(rows: pd.DataFrame, target: float, not_deployable: tuple[str, ...] = NOT_DEPLOYABLE
                 ) -> tuple[str | None, str | None, pd.DataFrame]:
    """The README's rule: among `threshold=` options (not `not_deployable`) measured on every
    (data set, seed) whose pooled test FP rate (test FP / test goods over the seeds) is within the
    target on every data set, the smallest worst-case recall gap, then the smallest mean gap.
    Returns (the default, what the rule would pick with the measured-only rows too, the table)."""
    full = rows.groupby("policy").size() == rows.groupby("policy").size().max()
    g = rows[rows.policy.isin(full[full].index)].groupby(["policy", "dataset"])
    pooled = (g.fp.sum() / g.n_good.sum()).unstack()
    table = pd.DataFrame({"worst pooled FP rate": pooled.max(axis=1),
                          "gap worst": rows.groupby("policy").gap.max(),
                          "gap mean": rows.groupby("policy").gap.mean()}).dropna()
    table["within target"] = table["worst pooled FP rate"] <= target + 1e-12
    table["option"] = ~table.index.isin(not_deployable)
    table["eligible"] = table["within target"] & table["option"]
    order = ["gap worst", "gap mean"]
    ok = table[table.eligible].sort_values(order)
    any_ok = table[table["within target"]].sort_values(order)
    return ((ok.index[0] if len(ok) else None), (any_ok.index[0] if len(any_ok) else None),
            table.sort_values(["eligible", "within target", "gap worst"], ascending=[False, False, True]))


def markdown(args: argparse.Namespace, rows: pd.DataFrame, command: str) -> str:
    per, tot = summarise(rows, args.max_fp_rate)
    chosen, unconstrained, rule = default_rule(rows, args.max_fp_rate)
    runs = []
    for dataset in args.datasets:
        for seed in args.seeds:
            f = Path(args.work) / dataset / f"seed{seed}" / "run.json"
            if f.exists():
                runs.append((dataset, seed, json.loads(f.read_text())))
    cv_rows = rows[rows.policy.str.startswith("cross_val")]
    cover = "; ".join(f"{d} seeds {sorted(set(g.seed))}" for d, g in cv_rows.groupby("dataset", sort=False))
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    lines = ["# Threshold policies: does the val-chosen operating point hold on test?", "",
             f"Command: `{command}`, after `python scripts/threshold_study.py collect` trained the "
             "runs and `python scripts/threshold_study.py collect --cv --datasets ... --seeds ...` "
             f"the fold models the cross_val rows need (they cover: {cover or 'none'}).", "",
             "One default-recipe training run per (data set, split seed); every policy chooses its "
             "threshold on that run's val scores (cross_val: on out-of-fold scores of "
             f"{args.cv_folds} fold models over train+val) and is judged on the run's test scores. "
             "Oracle recall: the best test recall of any threshold with no more test false positives "
             "than the policy's; gap = oracle - achieved recall. FP rate = test false positives / "
             f"test good images. Target FP rate for fp_rate_bound / cross_val: {args.max_fp_rate:g}. "
             "val FP bound: the one-sided 95 % Clopper-Pearson upper bound of the FP rate that the "
             "selection split supports at the threshold. fragile: runs where one or two val images "
             "alone fix the threshold (it moves > 1 log-odds without them). cross_val ensemble: the "
             "same out-of-fold threshold, judged on the test scores of the k fold models "
             "ensembled (mean log-odds) instead of the final model's.", "",
             "## Over all data sets and seeds", "",
             f"| policy | runs | recall gap mean | recall gap worst | recall mean | test FP rate mean | "
             f"test FP rate worst | runs over {pct(args.max_fp_rate)} FP |", "|---" * 8 + "|"]
    for r in tot.itertuples():
        lines.append(f"| {r.policy} | {r.runs} | {r.gap_mean:.3f} | {r.gap_worst:.3f} | {r.recall_mean:.3f} "
                     f"| {pct(r.fp_rate_mean)} | {pct(r.fp_rate_worst)} | {r.runs_over_target} |")
    lines += ["", "## The default, by rule", "",
              "Among `threshold=` options measured on every data set and seed, those whose pooled test "
              f"FP rate (test FP / test goods over the seeds) is at most {pct(args.max_fp_rate)} on "
              "every data set are eligible; the default is the eligible one with the smallest "
              f"worst-case recall gap, then the smallest mean gap. **Chosen: {chosen or 'none eligible'}.**"
              + ("" if unconstrained in (None, chosen) else
                 f" With the measured rows that no `threshold=` option delivers (one network per bundle) "
                 f"the rule would pick **{unconstrained}**."), "",
              "| policy | worst per-data-set pooled test FP rate | gap worst | gap mean | "
              "a threshold= option | eligible |",
              "|---|---|---|---|---|---|"]
    for policy, r in rule.iterrows():
        lines.append(f"| {policy} | {pct(r['worst pooled FP rate'])} | {r['gap worst']:.3f} | "
                     f"{r['gap mean']:.3f} | {'yes' if r.option else 'no'} | "
                     f"{'yes' if r.eligible else 'no'} |")
    lines += ["", "## Per data set (mean and worst over split seeds)", "",
              "| policy | data set | runs | test FP rate mean | FP rate worst | recall mean | recall worst | "
              "oracle recall mean | gap mean | gap worst | val FP bound mean | fragile |", "|---" * 12 + "|"]
    for r in per.itertuples():
        lines.append(f"| {r.policy} | {r.dataset} | {r.runs} | {pct(r.fp_rate_mean)} "
                     f"| {pct(r.fp_rate_worst)} | {r.recall_mean:.3f} | {r.recall_worst:.3f} "
                     f"| {r.oracle_mean:.3f} | {r.gap_mean:.3f} "
                     f"| {r.gap_worst:.3f} | {pct(r.val_fp_bound_mean)} | {r.fragile} |")
    lines += ensemble_section(args)
    lines += ["", "## Training runs", "", "| data set | seed | test AUROC | train s | MLflow run |",
              "|---|---|---|---|---|"]
    for dataset, seed, info in runs:
        lines.append(f"| {dataset} | {seed} | {info['test_auroc']:.4f} | {info['seconds']:.0f} | "
                     f"{info['run_id']} |")
    lines += ["", "## Per run", "",
              "| policy | data set | seed | threshold | test FP | test goods | recall | oracle | gap | "
              "val FP bound | fragile |", "|---" * 11 + "|"]
    for r in rows.itertuples():
        lines.append(f"| {r.policy} | {r.dataset} | {r.seed} | {r.threshold:.4g} | {r.fp} | {r.n_good} | "
                     f"{r.recall:.3f} | {r.oracle:.3f} | {r.gap:.3f} | {pct(r.val_fp_bound)} | "
                     f"{'yes' if r.fragile else ''} |")
    return "\n".join(lines) + "\n"


def ensemble_section(args: argparse.Namespace) -> list[str]:
    """Test AUROC of the final model beside that of the k fold models ensembled, per run."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    from defect_detection.evaluation.cross_val import ensemble_scores

    def auroc(f: pd.DataFrame) -> float:
        return float(binary_auroc(torch.tensor(f.p_defect.to_numpy()), torch.tensor(f.label.to_numpy())))

    rows = []
    for dataset in args.datasets:
        for seed in args.seeds:
            folder = Path(args.work) / dataset / f"seed{seed}"
            fold_test = folder / f"folds{args.cv_folds}_test_scores.csv"
            if fold_test.exists() and (folder / "test_scores.csv").exists():
                folds = pd.read_csv(fold_test)
                single = [auroc(g) for _, g in folds.groupby("fold")]
                rows.append((dataset, seed, auroc(pd.read_csv(folder / "test_scores.csv")),
                             auroc(ensemble_scores(folds)), float(np.mean(single))))
    if not rows:
        return []
    out = ["", f"## Final model vs the {args.cv_folds} fold models ensembled: test AUROC", "",
           "| data set | seed | final model | fold ensemble | fold models, mean of each |",
           "|---|---|---|---|---|"]
    out += [f"| {d} | {s} | {a:.4f} | {e:.4f} | {m:.4f} |" for d, s, a, e, m in rows]
    frame = pd.DataFrame(rows, columns=["dataset", "seed", "final", "ensemble", "single"])
    for d, g in frame.groupby("dataset", sort=False):
        out.append(f"| {d} | mean / worst | {g.final.mean():.4f} / {g.final.min():.4f} | "
                   f"{g.ensemble.mean():.4f} / {g.ensemble.min():.4f} | "
                   f"{g.single.mean():.4f} / {g.single.min():.4f} |")
    return out


def report(args: argparse.Namespace) -> None:
    rows = evaluate_policies(args)
    if rows.empty:
        raise SystemExit(f"No collected scores under {args.work}: run `collect` first.")
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/threshold_study.py", *sys.argv[1:]])
    text = markdown(args, rows, command)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    rows.to_csv(Path(args.work) / "policy_rows.csv", index=False)
    print(text)
    print(f"Wrote {out}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    a = parse_args()
    collect(a) if a.stage == "collect" else report(a)
