"""What a model was validated on, the yardstick defect-monitor holds the line against.

From the model's training run: the threshold and the false-positive-rate bound its val goods
support (threshold_fp_rate_upper_bound), the val scores (scores/val_scores.csv: the good parts'
score distribution, the share of defects and the recall on val), and the image statistics of its
train goods (data/image_stats.json, logged by every training run: monitoring/image_stats.py).
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from defect_detection.base import UserError
from defect_detection.monitoring.image_stats import ARTIFACT, image_stats, summarize

log = logging.getLogger(__name__)
STATS_SAMPLE = 256  # train goods whose statistics make the reference (evenly spread)


@dataclass
class Reference:
    run_id: str
    threshold: float
    fp_rate_bound: float  # upper bound of the FP rate at the threshold, from val (95 %)
    val_good_log_odds: np.ndarray
    val_defect_share: float
    val_recall: float
    image: dict = field(default_factory=dict)  # summarize() of the train goods; {} for older runs


def log_image_reference(tracker, datamodule, limit: int = STATS_SAMPLE) -> dict:
    """Summarize the train goods' image statistics from the decoded cache and log data/image_stats.json."""
    from defect_detection.data.geometry import header_hw

    dataset = datamodule.datasets.get("train")
    records = datamodule.records("train")
    goods = [i for i, r in enumerate(records) if r.label == 0]
    if dataset is None or not goods:
        return {}
    picked = [goods[int(k)] for k in np.linspace(0, len(goods) - 1, min(limit, len(goods))).round()]
    sizes = getattr(datamodule, "sizes", None) or {}
    stats = []
    for i in dict.fromkeys(picked):
        prepared = dataset.images[dataset.rows[i]].permute(1, 2, 0).numpy()
        path = records[i].path
        stats.append(image_stats(prepared, sizes.get(path) or header_hw(path)))
    summary = summarize(stats)
    if tracker.enabled:
        tracker.log_dict(summary, ARTIFACT)
    return summary


def load_reference(tracking_uri: str, run_id: str) -> Reference:
    """The reference of the training run `run_id` (UserError when it logged no val scores)."""
    import mlflow

    from defect_detection.evaluation.scores import download_scores

    client = mlflow.MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise UserError(
            f"Run {run_id} (the model's training run) is not in {tracking_uri}: {err.message}. "
            "Set tracking_uri to the store the model was trained in."
        ) from None
    val = download_scores(tracking_uri, run_id, "val")
    threshold = float(run.data.metrics.get("test/threshold", np.nan))
    bound = float(run.data.tags.get("threshold_fp_rate_upper_bound", "nan"))
    labels, p = val["label"].to_numpy(), val["p_defect"].to_numpy()
    log_odds = val["log_odds"].to_numpy() if "log_odds" in val.columns else np.log(p / (1 - p))
    recall = float((p[labels == 1] >= threshold).mean()) if (labels == 1).any() else float("nan")
    image: dict = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            image = json.loads(Path(client.download_artifacts(run_id, ARTIFACT, tmp)).read_text())
    except Exception:
        log.warning(
            "Run %s has no %s (trained before image statistics were logged): the image checks are skipped.",
            run_id,
            ARTIFACT,
        )
    return Reference(
        run_id, threshold, bound, log_odds[labels == 0], float((labels == 1).mean()), recall, image
    )
