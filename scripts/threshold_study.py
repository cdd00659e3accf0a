#!/usr/bin/env python
"""How well does a threshold chosen on val hold on test? One training run per (data set, split
seed) with the default recipe, then every threshold policy applied to that run's val scores and
judged on its test scores beside the oracle (the best test recall at the same test FP count).

    python scripts/threshold_study.py collect               # train: every data set x seeds 0-4
    python scripts/threshold_study.py collect --cv          # + out-of-fold scores (k extra models)
    python scripts/threshold_study.py report                # policies -> docs/results/threshold_study.md
    python scripts/threshold_study.py report --bench-state BENCH.json --store sqlite:///.../mlflow.db
                                          # the same, on a line bench's runs -> threshold_policy_dev_lines.md

`collect` writes each run's scores (the same scores/{val,test}_scores.csv every defect-train run
logs) under --work/<data set>/seed<k>/, so `report` re-applies policies in seconds. A run whose
scores are already there is not trained again. --cv adds oof_scores.csv: out-of-fold scores of
k models trained over train+val (the cross_val policy, defect_detection/evaluation/cross_val.py).

`report --bench-state` trains nothing either: it reads the scores/{val,test}_scores.csv that every
run of a line bench (scripts/line_bench.py, the JSON beside its --out) logged to MLflow, and judges
every `threshold=` option that needs nothing but val scores, each composed from conf/threshold/ as
a run would use it (cross_val is left out: it needs fold models the bench does not train). Per
policy it also counts the runs whose test FP rate exceeded the FP-rate bound val supports at the
chosen threshold (the bound every run's report states). The rows go to --work/<state>_policy_rows.csv.
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
    p.add_argument("--out", default=None, help="report: the page (default: docs/results/threshold_study.md, "
                   "with --bench-state docs/results/threshold_policy_dev_lines.md)")
    p.add_argument("--bench-state", default=None,
                   help="report: judge the policies on the runs of this line bench state (<out>.json of "
                        "scripts/line_bench.py) instead of on collected runs")
    p.add_argument("--bench-recipe", default="default", help="report --bench-state: the recipe's runs")
    p.add_argument("--store", default=None,
                   help="report --bench-state: the bench's MLflow tracking URI (default: this checkout's)")
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
            rows += [{"policy": r.pop("policy"), "dataset": dataset, "seed": seed, **r}
                     for r in apply_policies(frames, policies(args.max_fp_rate))]
    return pd.DataFrame(rows)


def apply_policies(frames: dict[str, pd.DataFrame], settings_by_label: dict[str, dict]) -> list[dict]:
    """Each policy chooses its threshold on its selection scores (frames["val"], or frames["oof"]
    where its settings say `scores: oof`) and is judged on frames["test"] (or `judged_on`); a policy
    whose scores are missing is skipped. One row per policy: the threshold, what the selection split
    supports there (FP count, FP-rate bound, fragile) and judge()'s test numbers."""
    from defect_detection.evaluation.thresholds import choose_threshold

    rows = []
    for label, settings in settings_by_label.items():
        settings = dict(settings)
        source = settings.pop("scores", "val")
        judged_on = settings.pop("judged_on", "test")
        if source not in frames or judged_on not in frames:
            continue
        sel = frames[source]
        choice = choose_threshold(scores=sel.p_defect.to_numpy(), labels=sel.label.to_numpy(),
                                  chosen_on=source, **settings)
        rows.append({"policy": label, "threshold": choice.value, "val_fp": choice.counts["fp"],
                     "val_fp_bound": choice.fp_rate_upper_bound, "fragile": bool(choice.fragile),
                     "n_sel_good": int((sel.label == 0).sum()), **judge(choice.value, frames[judged_on])})
    return rows


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


# --- the same comparison on a line bench's runs (report --bench-state) ---------------------------

# label -> (conf/threshold/ option, overrides): every option that needs nothing but val scores, as
# `defect-train threshold=<option> <overrides>` composes it. cross_val is left out: fold models.
VAL_ONLY_OPTIONS = {
    "max_recall_at_fp k=0": ("max_recall_at_fp", ["threshold.max_fp=0"]),
    "max_recall_at_fp k=1": ("max_recall_at_fp", ["threshold.max_fp=1"]),
    "f1_max": ("f1_max", []),
    **{f"fp_rate_bound {e}": ("fp_rate_bound", [f"threshold.estimator={e}"])
       for e in ("normal", "robust_normal", "bootstrap", "exp_tail")},
    "cost": ("cost", []),
    "min_fp_at_recall": ("min_fp_at_recall", []),
    "fixed": ("fixed", []),
}


def option_settings(option: str | None = None, overrides: tuple[str, ...] = ()) -> dict:
    """cfg.threshold of `defect-train threshold=<option> <overrides>` (option None: the default),
    the settings fit.py passes to choose_threshold."""
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*([f"threshold={option}"] if option else []), *overrides])
    return OmegaConf.to_container(cfg.threshold, resolve=True)


def val_only_policies(max_fp_rate: float) -> dict[str, dict]:
    """label -> choose_threshold settings of every val-only `threshold=` option (VAL_ONLY_OPTIONS);
    the FP-rate target of fp_rate_bound is max_fp_rate."""
    out = {}
    for label, (option, overrides) in VAL_ONLY_OPTIONS.items():
        extra = [f"threshold.max_fp_rate={max_fp_rate}"] if option == "fp_rate_bound" else []
        out[label] = option_settings(option, (*overrides, *extra))
    return out


def bench_runs(state: Path, recipe: str = "default") -> list[dict]:
    """The finished runs of one recipe in a line bench state: line, seed, run id, test AUROC."""
    rows = json.loads(Path(state).read_text())["rows"]
    return [{"line": r["line"], "seed": int(r["seed"]), "run_id": r["run_id"],
             "test_auroc": float(r.get("test/auroc", float("nan")))}
            for r in rows if r.get("status") == "ok" and r.get("recipe", "default") == recipe]


def mlflow_artifacts(store: str):
    """run id -> the local folder of that run's artifacts (downloaded where the store is remote)."""
    from urllib.parse import unquote, urlparse

    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts

    client = MlflowClient(store)

    def folder(run_id: str) -> Path:
        uri = client.get_run(run_id).info.artifact_uri
        if uri.startswith("file:"):
            return Path(unquote(urlparse(uri).path))
        return Path(download_artifacts(run_id=run_id, artifact_path="", tracking_uri=store))
    return folder


def evaluate_bench(runs: list[dict], artifacts, settings_by_label: dict[str, dict]
                   ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every policy on every bench run's val scores, judged on its test scores (`dataset` is the
    line). Also, per run, whether its own logged policy (reports/threshold.json's config) re-applied
    here gives its logged threshold: the check that these are the scores the run chose on."""
    from defect_detection.evaluation.thresholds import choose_threshold

    rows, checks = [], []
    for run in runs:
        folder = artifacts(run["run_id"])
        frames = {s: pd.read_csv(folder / "scores" / f"{s}_scores.csv") for s in ("val", "test")}
        rows += [{"policy": r.pop("policy"), "dataset": run["line"], "seed": run["seed"], **r}
                 for r in apply_policies(frames, settings_by_label)]
        logged = json.loads((folder / "reports" / "threshold.json").read_text())
        val = frames["val"]
        again = choose_threshold(scores=val.p_defect.to_numpy(), labels=val.label.to_numpy(),
                                 **logged.get("config", {})).value
        checks.append({**run, "policy": logged["policy"], "logged": float(logged["value"]), "again": again,
                       "reproduced": bool(np.isclose(again, float(logged["value"]), rtol=0, atol=1e-9))})
    return pd.DataFrame(rows), pd.DataFrame(checks)


def above_bound(rows: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Per policy: the runs whose test FP rate exceeded the FP-rate bound val supports at the
    chosen threshold, and the one-sided binomial p-value of that count against at most 1 -
    confidence (a small p: the bound does not hold as stated)."""
    from scipy import stats

    over = rows.assign(above=rows.fp_rate > rows.val_fp_bound + 1e-12)
    out = over.groupby("policy", sort=False).agg(
        runs=("seed", "size"), above=("above", "sum"), val_bound_mean=("val_fp_bound", "mean")).reset_index()
    out["p"] = [stats.binomtest(int(a), int(n), 1 - confidence, alternative="greater").pvalue
                for a, n in zip(out.above, out.runs)]
    return out


def line_rule_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per policy over lines: pooled test FP rate per line (mean and worst line, which line) and
    the mean recall gap per line (mean and worst line)."""
    g = rows.groupby(["policy", "dataset"], sort=False)
    pooled = (g.fp.sum() / g.n_good.sum()).unstack()
    gap = g.gap.mean().unstack()
    return pd.DataFrame({"pooled FP rate mean": pooled.mean(axis=1),
                         "pooled FP rate worst": pooled.max(axis=1), "worst FP line": pooled.idxmax(axis=1),
                         "line gap mean": gap.mean(axis=1),
                         "line gap worst": gap.max(axis=1), "worst gap line": gap.idxmax(axis=1)})


def bench_markdown(args: argparse.Namespace, rows: pd.DataFrame, checks: pd.DataFrame,
                   settings_by_label: dict[str, dict], current: str | None, command: str) -> str:
    pct = lambda v: f"{100 * v:.1f} %"  # noqa: E731
    per, tot = summarise(rows, args.max_fp_rate)
    chosen, _, rule = default_rule(rows, args.max_fp_rate, not_deployable=())
    lines_rule = line_rule_table(rows)
    bounds = above_bound(rows).set_index("policy")
    lines = sorted(rows.dataset.unique(), key=list(dict.fromkeys(checks.line)).index)
    n_runs = len(checks)
    out = ["# Threshold policies on the dev lines: does the val-chosen operating point hold?", "",
           "Command (on the runs of [line_bench_default.md](line_bench_default.md); nothing is trained):", "",
           "```bash", command, "```", "",
           f"The {n_runs} default-recipe runs of the line bench ({len(lines)} dev lines x split seeds "
           f"{', '.join(map(str, sorted(checks.seed.unique())))}), re-judged the way "
           "[threshold_study.md](threshold_study.md) judged its 4 data sets: every `threshold=` option "
           "that needs nothing but val scores chooses its threshold on the run's logged val scores "
           "(scores/val_scores.csv) and is judged on its test scores. `threshold=cross_val` is left out: "
           "it needs out-of-fold scores of fold models the bench does not train (threshold_study.md has it "
           "on its 4 data sets). Each policy's settings are composed from conf/threshold/ as "
           "`defect-train` composes them. Oracle recall: the best test recall of any threshold with no "
           "more test false positives than the policy's; gap = oracle - achieved recall. FP rate = test "
           "false positives / test good images. val FP bound: the one-sided 95 % Clopper-Pearson upper "
           "bound of the FP rate that val supports at the chosen threshold, the number every run's "
           "report states; `above bound`: runs whose test FP rate exceeded it (a true 95 % bound is "
           "exceeded in at most about 5 % of runs).", "",
           f"Check: each run's own policy, re-applied to its logged val scores, gives its logged "
           f"threshold in {int(checks.reproduced.sum())} of {n_runs} runs.", "",
           "## The policies", "", "| policy | `defect-train` overrides | settings |", "|---|---|---|"]
    for label, (option, overrides) in VAL_ONLY_OPTIONS.items():
        extra = [f"threshold.max_fp_rate={args.max_fp_rate:g}"] if option == "fp_rate_bound" else []
        settings = ", ".join(f"{k}={v}" for k, v in settings_by_label[label].items())
        out.append(f"| {label} | `{' '.join([f'threshold={option}', *overrides, *extra])}` | {settings} |")
    out += ["", f"## Over all {n_runs} runs", "",
            f"| policy | recall gap mean | recall gap worst | recall mean | test FP rate mean | test FP rate "
            f"worst | runs over {pct(args.max_fp_rate)} FP | val FP bound mean | runs above the val bound "
            "| binomial p (at most 5 % above) |", "|---" * 10 + "|"]
    for r in tot.itertuples():
        b = bounds.loc[r.policy]
        out.append(f"| {r.policy} | {r.gap_mean:.3f} | {r.gap_worst:.3f} | {r.recall_mean:.3f} | "
                   f"{pct(r.fp_rate_mean)} | {pct(r.fp_rate_worst)} | {r.runs_over_target} | "
                   f"{pct(b.val_bound_mean)} | {int(b.above)} of {int(b.runs)} | {b.p:.3g} |")
    exceeded = rows[rows.fp_rate > rows.val_fp_bound + 1e-12]
    where = exceeded.groupby(["dataset", "seed"], sort=False).size()
    where = where.sort_values(ascending=False, kind="stable")
    if current in bounds.index:
        b = bounds.loc[current]
        out += ["", f"The current default, {current}: test exceeded the FP-rate bound val stated in "
                f"{int(b.above)} of {int(b.runs)} runs (binomial p = {b.p:.3g} against at most 5 %)."]
    spots = ", ".join(f"{ln} seed {sd}: {k} {'policies' if k > 1 else 'policy'}"
                      for (ln, sd), k in where.items())
    out += ["", f"Where test exceeded the bound val stated ({len(exceeded)} policy-runs, in {len(where)} of "
            f"the {n_runs} runs; {spots}):", "",
            "| policy | line | seed | val FP / goods | val FP bound | test FP / goods | test FP rate |",
            "|---|---|---|---|---|---|---|"]
    for r in exceeded.itertuples():
        out.append(f"| {r.policy} | {r.dataset} | {r.seed} | {r.val_fp} / {r.n_sel_good} | "
                   f"{pct(r.val_fp_bound)} | {r.fp} / {r.n_good} | {pct(r.fp_rate)} |")
    out += ["", "## The default, by the rule of the threshold study", "",
            f"Among the `threshold=` options above, those whose pooled test FP rate (test FP / test goods "
            f"over the seeds) is at most {pct(args.max_fp_rate)} on every line are eligible; the default is "
            "the eligible one with the smallest worst-case recall gap (over runs), then the smallest mean "
            f"gap. **Chosen on the {len(lines)} dev lines: {chosen or 'none eligible'}**; the current "
            f"default (conf/train.yaml) is {current or 'not among these'}"
            + (" - the same." if chosen == current else ".") + " Mean and worst line: the pooled test FP "
            "rate per line and the mean recall gap per line, over the lines.", "",
            "| policy | pooled FP rate, worst line | worst FP line | pooled FP rate, mean over lines | "
            "gap worst (run) | gap mean (run) | line gap, worst line | worst gap line | eligible |",
            "|---" * 9 + "|"]
    for policy, r in rule.iterrows():
        lr = lines_rule.loc[policy]
        out.append(f"| {policy} | {pct(r['worst pooled FP rate'])} | {lr['worst FP line']} | "
                   f"{pct(lr['pooled FP rate mean'])} | {r['gap worst']:.3f} | {r['gap mean']:.3f} | "
                   f"{lr['line gap worst']:.3f} | {lr['worst gap line']} | {'yes' if r.eligible else 'no'} |")
    g = rows.groupby(["policy", "dataset"], sort=False)
    pooled = (g.fp.sum() / g.n_good.sum()).unstack()[lines]
    fp, good = g.fp.sum().unstack()[lines], g.n_good.sum().unstack()[lines]
    out += ["", "## Pooled test FP rate per line (test FP / test goods over the seeds)", "",
            "| policy | " + " | ".join(lines) + " |", "|---" * (len(lines) + 1) + "|"]
    for policy in pooled.index:
        out.append(f"| {policy} | " + " | ".join(f"{pct(pooled.loc[policy, ln])} ({int(fp.loc[policy, ln])}/"
                                                 f"{int(good.loc[policy, ln])})" for ln in lines) + " |")
    above = rows.assign(above=rows.fp_rate > rows.val_fp_bound + 1e-12).groupby(
        ["policy", "dataset"], sort=False).above.sum()
    out += ["", "## Per line (mean and worst over split seeds)", "",
            "| policy | line | runs | test FP rate mean | FP rate worst | recall mean | recall worst | "
            "oracle recall mean | gap mean | gap worst | val FP bound mean | above bound | fragile |",
            "|---" * 13 + "|"]
    per = per.assign(order=per.dataset.map(lines.index)).sort_values(["order"], kind="stable")
    for r in per.itertuples():
        out.append(f"| {r.policy} | {r.dataset} | {r.runs} | {pct(r.fp_rate_mean)} | {pct(r.fp_rate_worst)} "
                   f"| {r.recall_mean:.3f} | {r.recall_worst:.3f} | {r.oracle_mean:.3f} | {r.gap_mean:.3f} "
                   f"| {r.gap_worst:.3f} | {pct(r.val_fp_bound_mean)} "
                   f"| {int(above.loc[(r.policy, r.dataset)])} | {r.fragile} |")
    out += ["", "## The runs", "",
            "| line | seed | MLflow run | test AUROC | logged policy | logged threshold | re-applied "
            "| same |",
            "|---|---|---|---|---|---|---|---|"]
    for r in checks.itertuples():
        out.append(f"| {r.line} | {r.seed} | {r.run_id} | {r.test_auroc:.4f} | {r.policy} | {r.logged:.4g} | "
                   f"{r.again:.4g} | {'yes' if r.reproduced else 'NO'} |")
    out += ["", "## Per run", "",
            "| policy | line | seed | threshold | val FP | test FP | test goods | recall | oracle | gap | "
            "val FP bound | test FP rate | above bound | fragile |", "|---" * 14 + "|"]
    for r in rows.itertuples():
        out.append(f"| {r.policy} | {r.dataset} | {r.seed} | {r.threshold:.4g} | {r.val_fp} | {r.fp} | "
                   f"{r.n_good} | {r.recall:.3f} | {r.oracle:.3f} | {r.gap:.3f} | {pct(r.val_fp_bound)} | "
                   f"{pct(r.fp_rate)} | {'yes' if r.fp_rate > r.val_fp_bound + 1e-12 else ''} | "
                   f"{'yes' if r.fragile else ''} |")
    return "\n".join(out) + "\n"


def current_default(settings_by_label: dict[str, dict]) -> str | None:
    """The label whose settings are those of conf/train.yaml's default `threshold=`."""
    default = option_settings()
    return next((label for label, s in settings_by_label.items() if s == default), None)


def report_bench(args: argparse.Namespace, command: str) -> None:
    store = args.store or f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"
    settings = val_only_policies(args.max_fp_rate)
    runs = bench_runs(Path(args.bench_state), args.bench_recipe)
    if not runs:
        raise SystemExit(f"No finished {args.bench_recipe!r} runs in {args.bench_state}.")
    rows, checks = evaluate_bench(runs, mlflow_artifacts(store), settings)
    text = bench_markdown(args, rows, checks, settings, current_default(settings), command)
    out = Path(args.out or project_root() / "docs" / "results" / "threshold_policy_dev_lines.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    rows.to_csv(Path(args.work) / f"{Path(args.bench_state).stem}_policy_rows.csv", index=False)
    print(text)
    print(f"Wrote {out}")


def report(args: argparse.Namespace) -> None:
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/threshold_study.py", *sys.argv[1:]])
    if args.bench_state:
        return report_bench(args, command)
    rows = evaluate_policies(args)
    if rows.empty:
        raise SystemExit(f"No collected scores under {args.work}: run `collect` first.")
    text = markdown(args, rows, command)
    out = Path(args.out or project_root() / "docs" / "results" / "threshold_study.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    rows.to_csv(Path(args.work) / "policy_rows.csv", index=False)
    print(text)
    print(f"Wrote {out}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    a = parse_args()
    collect(a) if a.stage == "collect" else report(a)
