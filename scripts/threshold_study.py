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
import statistics
import sys
import time
from datetime import datetime
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
    from defect_detection.train import train

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
            if args.cv and not (folder / f"oof{args.cv_folds}_scores.csv").exists():
                from defect_detection.evaluation.cross_val import out_of_fold_scores

                t0 = time.perf_counter()
                cfg = compose_run(args, dataset, seed, "threshold=cross_val",
                                  f"threshold.folds={args.cv_folds}")
                oof = out_of_fold_scores(cfg)
                oof.to_csv(folder / f"oof{args.cv_folds}_scores.csv", index=False)
                logging.info("%s seed %d: %d-fold scores in %.0f s", dataset, seed, args.cv_folds,
                             time.perf_counter() - t0)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    a = parse_args()
    if a.stage == "collect":
        collect(a)
