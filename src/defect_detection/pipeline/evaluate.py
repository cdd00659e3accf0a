"""`defect-eval`: score a saved model on any data config and write the test report to a new run.

    defect-eval model=runs:/<run_id>/model data=mvtec data.root=/data/mvtec "data.categories=[bottle]"
    defect-eval model=models:/defect-classifier@champion subset=all data=folder data.root=/new/batch
    defect-eval model=outputs/train/<time>/checkpoints/best-epoch07.ckpt
    defect-eval model=runs:/<run_id>/model threshold=fp_rate_bound   # re-pick on its saved val scores

The model decides with the threshold (and temperature) stored with it, exactly as predict and
serve do, unless threshold=<policy> re-picks it on the training run's saved val scores
(evaluation/repick.py; the new run then logs a model carrying the new threshold); the new run is
tagged with the source run / model URI so it can be traced back.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.progress import Progress

from defect_detection.base import UserError
from defect_detection.data.records import ImageRecord, check_records, records_from_config
from defect_detection.evaluation.reports import prediction_table, write_report
from defect_detection.evaluation.thresholds import ThresholdChoice, log_threshold
from defect_detection.models.inference import Predictor
from defect_detection.models.loading import load_predictor
from defect_detection.pipeline.repick import log_rethresholded_model, repick
from defect_detection.reports.html import log_html_report
from defect_detection.schema import validate_data_config
from defect_detection.tracking.mlflow_run import (
    RunTracker,
    config_yaml,
    ensure_local_store,
    flatten,
    git_commit,
    store_artifact_location,
)
from defect_detection.tracking.sources import source_tags

log = logging.getLogger(__name__)
SUBSETS = ("train", "val", "test", "new", "all")
SPLIT_SOURCES = ("auto", "run", "config")


@dataclass
class Selection:
    """What is scored: the records, where their split came from, and what the report must say."""

    records: list[ImageRecord]
    leaky: bool = False
    source: str = "config"  # run:<id> (the model's own data/splits.csv) or config (split=...)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # images per split of the whole folder


def select_records(cfg: DictConfig, run_id: str | None = None, tracking_uri: str | None = None) -> Selection:
    """The records of `cfg.subset`.

    A model trained by a run is scored on that run's own split (its data/splits.csv) by default:
    images added to the folder since then form the set `new` and never enter test, and the model's
    own train/val images are never scored as test. split_source=config re-splits with the split
    config instead (data the model never saw)."""
    if cfg.subset not in SUBSETS:
        raise UserError(f"subset={cfg.subset!r} is unknown; choose one of {list(SUBSETS)}.")
    how = str(cfg.get("split_source", "auto"))
    if how not in SPLIT_SOURCES:
        raise UserError(f"split_source={how!r}: use auto (the model's run split when it has one), run or "
                        "config.")
    records = records_from_config(cfg.data.records)
    if not records:
        raise UserError(f"No images found in {cfg.data.root}.")
    logged = _run_split(run_id, tracking_uri) if how != "config" and run_id else None
    if how == "run" and logged is None:
        raise UserError(f"split_source=run: the model's training run ({run_id or 'unknown'}) has no "
                        "data/splits.csv to read; use split_source=config.")
    by_path = ({os.path.realpath(str(p)): s for p, s in zip(logged["path"], logged["split"])}
               if logged is not None else {})
    if by_path and any(os.path.realpath(r.path) in by_path for r in records):
        return _from_run_split(cfg.subset, records, by_path, run_id)
    if by_path:
        log.info("None of these images were in run %s's split: scoring them with split=%s.", run_id,
                 cfg.split.name)
    if cfg.subset == "all":
        return Selection(list(records))
    if cfg.subset == "new":
        raise UserError("subset=new names the images added since the model's run: it needs a model from a "
                        "run (runs:/, models:/ or a bundle of a run) scored on that run's data folder.")
    check_records(records, str(cfg.data.root))
    split = instantiate(cfg.split.make)(records)
    return Selection(list(split[cfg.subset]), bool(split.leaky and cfg.subset in ("val", "test")))


def _run_split(run_id: str | None, tracking_uri: str | None):
    """The run's data/splits.csv as a DataFrame (None when it has none or the store is unreachable)."""
    import tempfile

    import pandas as pd

    if not run_id:
        return None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.MlflowClient(tracking_uri).download_artifacts(run_id, "data/splits.csv", tmp)
            return pd.read_csv(local)
    except Exception:  # no such artifact, run or store: the config split applies
        return None


def _from_run_split(subset: str, records: list[ImageRecord], by_path: dict[str, str],
                    run_id: str) -> Selection:
    found = {os.path.realpath(r.path): r for r in records}
    split_of = {path: by_path.get(path, "new") for path in found}
    counts = {name: sum(1 for s in split_of.values() if s == name)
              for name in ("train", "val", "test", "new")}
    missing = [p for p, s in by_path.items() if s == subset and p not in found]
    warnings = []
    if counts["new"]:
        warnings.append(f"{counts['new']} image(s) in the folder are not in run {run_id}'s split: they form "
                        "the set `new` (subset=new) and are not part of test.")
    if missing:
        warnings.append(f"{len(missing)} {subset} image(s) of run {run_id} are no longer in the folder "
                        f"(first: {missing[0]}).")
    if subset == "all":
        warnings.append(f"subset=all scores {counts['train']} train and {counts['val']} val image(s) the "
                        "model was fitted and tuned on: its numbers are optimistic; subset=test is the "
                        "honest set.")
        chosen = list(records)
    else:
        chosen = [r for r in records if split_of[os.path.realpath(r.path)] == subset]
        if subset in ("train", "val"):
            warnings.append(f"subset={subset}: the model was {'fitted' if subset == 'train' else 'tuned'} "
                            "on these images; the numbers are not a test result.")
    if not chosen:
        raise UserError(f"subset={subset}: none of the folder's images are in run {run_id}'s {subset} split "
                        f"(per split: {counts}).")
    for text in warnings:
        log.warning("%s", text)
    return Selection(chosen, subset in ("train", "val", "all"), f"run:{run_id}", warnings, counts)


def _load(source: str, device: str, tracking_uri: str) -> Predictor:
    if source.startswith(("runs:/", "models:/")):
        mlflow.set_tracking_uri(tracking_uri)
        try:
            return load_predictor(source, device=device)
        except mlflow.exceptions.MlflowException as err:
            raise UserError(f"Cannot load model {source} from {tracking_uri}: {err.message}. Check the run "
                            "id or registered name with `make ui` (or set MLFLOW_TRACKING_URI).") from None
    return load_predictor(source, device=device)


def score(predictor: Predictor, records: list[ImageRecord], chunk: int = 64):
    """p_defect of every record, in chunks so the progress bar moves."""
    import numpy as np

    out = []
    with Progress(transient=True) as progress:
        task = progress.add_task(f"scoring {len(records)} images", total=len(records))
        for start in range(0, len(records), chunk):
            part = records[start:start + chunk]
            out.append(predictor.p_defect([r.path for r in part]))
            progress.advance(task, len(part))
    return np.concatenate(out) if out else np.empty(0)


def _tracker(cfg: DictConfig) -> RunTracker:
    if not cfg.get("logger"):
        return RunTracker()
    ensure_local_store(cfg.logger.tracking_uri)
    logger = instantiate(cfg.logger, artifact_location=store_artifact_location(cfg.logger))
    return RunTracker.from_lightning_logger(logger)


def evaluate(cfg: DictConfig) -> dict:
    """Score `cfg.model` on `cfg.subset` of the data config; returns the run id, metrics and folder."""
    if OmegaConf.is_missing(cfg, "model") or not cfg.get("model"):
        raise UserError("Name the model to evaluate: model=runs:/<run_id>/model, models:/<name>@champion, "
                        "or a .pt bundle / .ckpt checkpoint path.")
    source = str(cfg.model)
    validate_data_config(cfg.data)
    tracking_uri = cfg.logger.tracking_uri if cfg.get("logger") else str(cfg.tracking_uri)
    predictor = _load(source, cfg.device, tracking_uri)
    override = cfg.get("override_threshold")
    sources = source_tags(source, tracking_uri)
    if "source_run_id" not in sources and predictor.meta.get("run_id"):  # a bundle or .ckpt of a run
        sources["source_run_id"] = str(predictor.meta["run_id"])
    selection = select_records(cfg, sources.get("source_run_id"), tracking_uri)
    records, leaky = selection.records, selection.leaky
    if cfg.get("threshold") and override is not None:
        raise UserError("Give either threshold=<policy> (re-pick on the run's val scores) or "
                        "override_threshold=<number>, not both.")
    if cfg.get("threshold"):  # re-pick the operating point on the training run's saved val scores
        choice = repick(cfg, tracking_uri, sources.get("source_run_id"))
        threshold = choice.value
    else:
        threshold = float(predictor.threshold if override is None else override)
        if not 0.0 <= threshold <= 1.0:
            raise UserError(f"override_threshold={threshold} is outside [0, 1]; leave it null to use the "
                            "model's own.")
        choice = ThresholdChoice(threshold, "override" if override is not None else
                                 str(predictor.meta.get("threshold_policy", "stored")),
                                 "command line" if override is not None else "stored with the model")
    tracker = _tracker(cfg)
    try:
        if cfg.get("threshold"):
            log_threshold(tracker, choice, OmegaConf.to_container(cfg.threshold, resolve=True))
            log_rethresholded_model(tracker, predictor, choice)
        tracker.log_params(flatten(cfg))
        tracker.log_text(config_yaml(cfg), "config.yaml")
        tracker.set_tags({"task": "evaluate", "git_commit": git_commit(), "dataset": cfg.data.name,
                          "categories": ",".join(cfg.data.categories), "subset": cfg.subset,
                          "split": cfg.split.name if cfg.subset != "all" else "all",
                          "backbone": predictor.meta.get("backbone", ""), "leaky_protocol": leaky,
                          "threshold_source": choice.chosen_on, "split_source": selection.source,
                          **({"warning": " ".join(selection.warnings)} if selection.warnings else {}),
                          **sources})
        p_defect = score(predictor, records)
        table = prediction_table(records, p_defect, threshold, split=str(cfg.subset))
        context = {"model": source, "subset": cfg.subset, "dataset": cfg.data.name,
                   "model_meta": {k: v for k, v in predictor.meta.items() if k != "class_names"}}
        report_dir = Path(cfg.report_dir)
        summary = write_report(table, choice, out_dir=report_dir, tracker=tracker, prefix=f"{cfg.subset}/",
                               leaky=leaky, temperature=float(predictor.meta.get("temperature", 1.0)),
                               context=context, log_core_metrics=True)
        report_uri = log_html_report(tracker)
        tracker.finish("FINISHED")
    except BaseException as err:
        tracker.fail(err)
        raise
    m = summary["metrics"]
    log.info("%s on %d images: auroc %.4f recall %.4f fp %d fn %d at threshold %.4f; report in %s",
             cfg.subset, len(table), m["auroc"], m["recall"], m["fp"], m["fn"], threshold, report_dir)
    if report_uri:
        log.info("report.html: %s", report_uri)
    return {"run_id": tracker.run_id, "metrics": m, "report_dir": str(report_dir), "summary": summary,
            "report_uri": report_uri}
