"""One training job: data, detector, fit, threshold on val, test, every artifact logged to MLflow.

The library under `defect-train`, `fit()` (api.py), the auto recipe and cross-validation.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from defect_detection.data.datamodule import DefectDataModule
from defect_detection.data.fingerprint import ARTIFACT as FINGERPRINT
from defect_detection.data.summary import log_data_summary
from defect_detection.data.validate import bad_images_frame
from defect_detection.distributed import check_launch
from defect_detection.evaluation.calibration_report import calibrate_module
from defect_detection.evaluation.metrics import separation_margin
from defect_detection.evaluation.reports import log_test_report
from defect_detection.evaluation.scores import log_scores, score_frame
from defect_detection.evaluation.thresholds import check_selection_split, choose_threshold, log_threshold
from defect_detection.explain.report import check_gradcam_config, log_gradcam
from defect_detection.models.checkpointing import (
    AtomicCheckpointIO,
    CheckpointOwner,
    RngStateCallback,
    stamp_run_checkpoints,
)
from defect_detection.models.families import family
from defect_detection.models.inference import save_bundle
from defect_detection.models.module import DetectorModule
from defect_detection.monitoring.reference import log_image_reference
from defect_detection.pipeline.builders import build_datamodule, build_module, detector_name
from defect_detection.pipeline.resume import check_same_data, continue_run, prepare_resume
from defect_detection.reports.html import log_html_report
from defect_detection.schema import TrainSchema, validate_train_config
from defect_detection.tracking.mlflow_run import (
    RunTracker,
    config_yaml,
    ensure_local_store,
    flatten,
    fluent_tracking_uri,
    fresh_run_name,
    git_commit,
    stop_signal,
    store_artifact_location,
    tag_undefined_metrics,
)
from defect_detection.tracking.pyfunc import log_pyfunc
from defect_detection.tracking.resume import (
    checkpoint_folder,
    note_stopped,
    tag_checkpoint_dir,
    tag_overrides,
    tag_resumed_from,
)
from defect_detection.tracking.run_lock import RunLock, refuse_if_live
from defect_detection.tracking.summary import log_run_summary
from defect_detection.tracking.sweeps import sweep_tags, trial_run_name

log = logging.getLogger(__name__)


def build_logger(cfg: DictConfig, run_id: str | None = None):
    if not cfg.get("logger"):
        return None
    ensure_local_store(cfg.logger.tracking_uri)
    extra = {"run_id": run_id} if run_id else {}  # a resumed run continues in place
    if tags := sweep_tags():  # a multirun trial: grouped under its sweep (see tracking/sweeps.py)
        name = trial_run_name(cfg)
        extra["tags"] = {**(cfg.logger.get("tags") or {}), **tags,
                         **({"mlflow.runName": name} if name else {})}
    elif (auto := cfg.get("auto") or {}).get("parent_run_id"):  # an auto candidate, linked from its start
        extra["tags"] = {**(cfg.logger.get("tags") or {}), "mlflow.parentRunId": auto.parent_run_id,
                         "sweep_id": auto.sweep_id, "auto": "candidate", "auto_candidate": auto.candidate,
                         **({"mlflow.runName": cfg.run_name} if cfg.get("run_name") else {})}
    if not run_id and "tags" not in extra and not cfg.logger.get("run_name"):
        extra["run_name"] = fresh_run_name()  # MLflow would draw it from the just-seeded `random`
    return instantiate(cfg.logger, artifact_location=store_artifact_location(cfg.logger), **extra)


def train(cfg: DictConfig, overrides: Sequence[str] | None = None) -> dict:
    """Run one experiment; returns val/test metrics, the threshold and the run id. `overrides`: the
    words the run was started with, repeated by its resume hint (default: the command line's)."""
    settings = validate_train_config(cfg)  # typed sections for the parts below
    resume = prepare_resume(cfg)  # ckpt_path / resume_run_id -> checkpoint + MLflow run, checked now
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    if resume.source_run_id and datamodule.fingerprint is not None:
        check_same_data(cfg, resume, datamodule.fingerprint)  # images added/removed/changed: refused
    split = datamodule.split
    check_selection_split(cfg.threshold.policy, split.val, cfg.split)  # both classes on val, up front
    module = build_module(cfg, datamodule.class_counts("train"))
    # a bad backbone.gradcam_layer fails now, not after training
    check_gradcam_config(settings.explain, settings.backbone, module.net)
    logger = build_logger(cfg, run_id=resume.run_id)
    owner = CheckpointOwner()  # stamps each checkpoint with the run that wrote it
    callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c] + [RngStateCallback(), owner]
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=logger or False, callbacks=callbacks,
                                      plugins=[AtomicCheckpointIO()],
                                      **family(detector_name(cfg)).trainer_values(cfg.detector))
    # after the Trainer: only then is this process's DDP rank known (other nodes' first process
    # looks like rank 0 before). Rank 0 alone logs params, artifacts and the model.
    check_launch(trainer)  # DDP processes must come from the CLI, torchrun or SLURM
    folder = checkpoint_folder(trainer) if trainer.is_global_zero else None
    refuse_if_live(folder, resume.run_id, "Cannot start")  # another live run writes this folder
    tracker = RunTracker.from_lightning_logger(logger) if trainer.is_global_zero else RunTracker()
    owner.run_id = tracker.run_id
    lock = RunLock(folder)
    trainer.callbacks.append(lock)  # its heartbeat while training
    try:
        lock.acquire(tracker.run_id)
        if resume.run_id:  # a continued run keeps its params; what changed is tagged
            continue_run(tracker, cfg, resume)
        else:
            _log_setup(tracker, cfg, split)
            tag_overrides(tracker, overrides)  # what the resume hint repeats
            tag_resumed_from(tracker, resume)  # a FINISHED run continued as this new one
            if tracker.enabled:
                tracker.log_params(datamodule.input_plan.log_params())
                if datamodule.fingerprint is not None:
                    tracker.log_dict(datamodule.fingerprint, FINGERPRINT)
                    _log_lineage(tracker, cfg, datamodule)
        tag_checkpoint_dir(tracker, trainer)
        tracker.tag_store()  # which tracking store and artifact location hold this run
        if datamodule.bad_images:
            tracker.log_table_csv(bad_images_frame(datamodule.bad_images), "data/bad_images.csv")
        log_data_summary(tracker, cfg, datamodule)  # data/: counts, splits.csv, audit, previews
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume.ckpt_path, weights_only=True)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        val_metrics = trainer.validate(module, datamodule=datamodule, ckpt_path=best or None,
                                       verbose=False, weights_only=True)[0]
        calibrate_module(settings.calibration, module, tracker)  # sets T, recomputes val p_defect
        val = module.outputs["val"]
        log_odds = (val["logits"][:, 1] - val["logits"][:, 0]) / float(module.temperature)
        val_metrics["val/margin"] = separation_margin(log_odds, val["label"])
        tracker.log_metrics({"val/margin": val_metrics["val/margin"]})
        choice, oof = _choose(cfg, module, datamodule)
        module.set_threshold(choice.value)
        if trainer.is_global_zero:  # predict from a .ckpt of this run decides as its report does
            stamp_run_checkpoints(folder, tracker.run_id, choice, float(module.temperature))
        test_metrics = trainer.test(module, datamodule=datamodule, verbose=False)[0]
        scores = {s: score_frame(module.outputs[s], datamodule.records(s), float(module.temperature))
                  for s in ("val", "test")}
        result = {"val": val_metrics, "test": test_metrics, "threshold": choice.value,
                  "run_id": tracker.run_id, "best_checkpoint": best, "scores": scores}
        tag_undefined_metrics(tracker, {**val_metrics, **test_metrics})  # NaN: a split had one class
        # what `defect-eval threshold=...` re-picks the operating point from
        log_scores(tracker, {**scores, **({"oof": oof} if oof is not None else {})})
        _log_results(tracker, cfg, settings, module, choice, best, datamodule)
        report_uri = log_html_report(tracker)  # report.html from the artifacts just logged
        tracker.finish("FINISHED")
    except BaseException as err:
        note_stopped(tracker, trainer, err)  # logs/tags the resume command when a last.ckpt exists
        tracker.fail(err)
        if stop_signal(err) == "SIGTERM":  # Lightning's SIGTERMException would exit 0: 128 + 15
            raise SystemExit(143) from err
        raise
    finally:
        lock.release()
    log.info("val/auroc %.4f | test: auroc %.4f recall %.4f fp %d at threshold %.4f (%s on val)",
             val_metrics.get("val/auroc", float("nan")), test_metrics.get("test/auroc", float("nan")),
             test_metrics.get("test/recall", float("nan")), test_metrics.get("test/fp", -1),
             choice.value, choice.policy)
    log_run_summary(tracker, test_metrics, choice, report_uri)
    return result


def _log_lineage(tracker: RunTracker, cfg: DictConfig, datamodule: DefectDataModule) -> None:
    """The run's dataset inputs: the base data and each extra (reviewed) folder, with digests."""
    from defect_detection.data.lineage import log_lineage

    extra = getattr(datamodule, "extra", {}) or {}
    added = {r.path for recs in extra.values() for r in recs}
    split_of = {row["path"]: row["split"] for row in datamodule.split.assignment()}
    base = [r for name in ("train", "val", "test") for r in datamodule.split[name] if r.path not in added]
    log_lineage(tracker, base, extra, split_of, datamodule.fingerprint, str(cfg.data.get("root")))


def _choose(cfg: DictConfig, module: DetectorModule, datamodule: DefectDataModule):
    """The threshold of cfg.threshold on val (or, for cross_val, on out-of-fold train+val scores),
    and those out-of-fold scores (None for the other policies)."""
    params = OmegaConf.to_container(cfg.threshold, resolve=True)
    if cfg.threshold.policy == "cross_val":
        from defect_detection.pipeline.cross_val import out_of_fold_scores

        oof = out_of_fold_scores(cfg, datamodule.split)
        return choose_threshold(chosen_on=f"out-of-fold train+val ({params.get('folds', 3)} folds)",
                                scores=oof.p_defect.to_numpy(), labels=oof.label.to_numpy(),
                                paths=oof.path.tolist(), **params), oof
    val = module.outputs["val"]
    records = datamodule.records("val")
    return choose_threshold(chosen_on="val", scores=val["p_defect"].numpy(), labels=val["label"].numpy(),
                            paths=[records[i].path for i in val["index"].tolist()], **params), None


def _log_setup(tracker: RunTracker, cfg: DictConfig, split) -> None:
    if not tracker.enabled:
        return
    tracker.log_params(flatten(cfg))
    tracker.log_text(config_yaml(cfg), "config.yaml")
    counts = {f"{s}": len(split[s]) for s in ("train", "val", "test")}
    tracker.set_tags({
        "git_commit": git_commit(), "dataset": cfg.data.name, "categories": ",".join(cfg.data.categories),
        "backbone": cfg.backbone.name, "split": cfg.split.name, "leaky_protocol": split.leaky,
        "split_sizes": counts,
    })
    if split.leaky:
        tracker.set_tags({"warning": "; ".join(split.notes)})


def _log_results(tracker: RunTracker, cfg: DictConfig, settings: TrainSchema, module: DetectorModule, choice,
                 best: str, datamodule: DefectDataModule) -> None:
    """Everything logged after test: module.outputs[stage] holds p_defect/label/index, and
    datamodule.records(stage)[index] is the record behind each score."""
    if not tracker.enabled:
        return
    log_threshold(tracker, choice, OmegaConf.to_container(cfg.threshold, resolve=True))
    log_test_report(tracker, module.outputs["test"], datamodule.records("test"), choice,
                    leaky=datamodule.split.leaky, temperature=float(module.temperature),
                    out_dir=Path(cfg.paths.output_dir) / "reports")
    if best:
        tracker.log_artifact(best, "checkpoints")
    if cfg.get("log_model", True):
        with tempfile.TemporaryDirectory() as tmp:
            bundle = save_bundle(Path(tmp) / "bundle.pt", module.net, backbone=cfg.backbone.name,
                                 image_size=module.meta["image_size"], mean=cfg.backbone.mean,
                                 std=cfg.backbone.std, threshold=choice.value,
                                 threshold_policy=choice.policy, temperature=float(module.temperature),
                                 extra={**{k: v for k, v in module.meta.items()
                                           if k not in ("backbone", "image_size")},
                                        "run_id": tracker.run_id})
            with fluent_tracking_uri(tracker.tracking_uri), mlflow.start_run(run_id=tracker.run_id):
                log_pyfunc(bundle)
    log_image_reference(tracker, datamodule)  # what defect-monitor compares the line's images with
    log_gradcam(tracker, settings.explain, settings.backbone, module, datamodule, stage="test")
