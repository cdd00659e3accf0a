"""Re-pick the operating point of a finished run from the val scores it logged, no retraining:

    defect-eval model=runs:/<run_id>/model threshold=fp_rate_bound threshold.max_fp_rate=0.02

The new threshold is chosen on the training run's scores/val_scores.csv (cross_val: its
scores/oof_scores.csv, which only a threshold=cross_val run has), the new eval run logs the
threshold diagnostics and a pyfunc model holding the same weights with the new threshold, so
predict and serve on runs:/<eval_run_id>/model decide exactly at it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from defect_detection.base import UserError
from defect_detection.evaluation.scores import download_scores, read_scores
from defect_detection.evaluation.thresholds import ThresholdChoice, choose_threshold


def selection_scores(cfg: DictConfig, tracking_uri: str,
                     source_run_id: str | None) -> tuple[pd.DataFrame, str]:
    """The scores the new threshold is chosen on and where they came from: cfg.threshold_scores
    (a scores CSV or a training run id) or else the training run behind cfg.model."""
    policy = str(cfg.threshold.policy)
    split = "oof" if policy == "cross_val" else "val"
    given = cfg.get("threshold_scores")
    if given and Path(str(given)).is_file():
        return read_scores(given), str(given)
    run_id = str(given) if given else source_run_id
    if not run_id:
        raise UserError(f"threshold={policy} re-picks the threshold from a training run's val scores, but "
                        f"{cfg.model} names no MLflow run: use model=runs:/<run_id>/model, or pass "
                        "threshold_scores=<run_id or scores/val_scores.csv>.")
    try:
        return download_scores(tracking_uri, run_id, split), f"{split} scores of run {run_id}"
    except UserError as err:
        if split == "oof":
            raise UserError(f"threshold=cross_val needs out-of-fold scores, which only a run trained with "
                            f"threshold=cross_val logs (scores/oof_scores.csv); run {run_id} has none. "
                            "Retrain with threshold=cross_val, or re-pick with "
                            "threshold=fp_rate_bound.") from err
        raise


def repick(cfg: DictConfig, tracking_uri: str, source_run_id: str | None) -> ThresholdChoice:
    scores, where = selection_scores(cfg, tracking_uri, source_run_id)
    params = OmegaConf.to_container(cfg.threshold, resolve=True)
    paths = scores["path"].tolist() if "path" in scores.columns else None
    return choose_threshold(chosen_on=where, scores=scores.p_defect.to_numpy(),
                            labels=scores.label.to_numpy(), paths=paths, **params)


def log_rethresholded_model(tracker, predictor, choice: ThresholdChoice) -> bool:
    """Log the predictor's weights with the re-picked threshold as this run's pyfunc model."""
    if not tracker.enabled or not hasattr(predictor, "net"):
        return False
    import mlflow

    from defect_detection.tracking.mlflow_run import fluent_tracking_uri
    from defect_detection.tracking.pyfunc import log_pyfunc

    meta = {**predictor.meta, "threshold": float(choice.value), "threshold_policy": choice.policy}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bundle.pt"
        torch.save({"meta": meta, "state_dict": {k: v.detach().cpu() for k, v in
                                                 predictor.net.state_dict().items()}}, path)
        with fluent_tracking_uri(tracker.tracking_uri), mlflow.start_run(run_id=tracker.run_id):
            log_pyfunc(path)
    return True
