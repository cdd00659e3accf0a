"""The per-image val and test scores of a run, logged as artifacts so the operating point can be
re-picked later (`defect-eval threshold=...`) and studied (scripts/threshold_study.py) without
retraining or rescoring."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from defect_detection.base import UserError
from defect_detection.data.records import ImageRecord

SCORE_COLUMNS = ["path", "category", "defect_type", "label", "p_defect", "log_odds"]


def artifact_name(split: str) -> str:
    return f"scores/{split}_scores.csv"


def score_frame(outputs: Mapping[str, torch.Tensor], records: Sequence[ImageRecord],
                temperature: float = 1.0) -> pd.DataFrame:
    """One row per scored image of a module stage: what it is, p_defect and its log-odds (after T)."""
    index = outputs["index"].tolist()
    recs = [records[i] for i in index]
    label = outputs["label"].numpy().astype(int)
    if not np.array_equal(label, np.array([r.label for r in recs], dtype=int)):
        raise ValueError("the scored labels do not match the records' labels: index mapping is broken")
    logits = outputs.get("logits")
    if logits is not None:
        log_odds = ((logits[:, 1] - logits[:, 0]) / float(temperature)).double().numpy()
    else:
        p = outputs["p_defect"].double().clamp(1e-12, 1 - 1e-12)
        log_odds = torch.log(p / (1 - p)).numpy()
    return pd.DataFrame({"path": [r.path for r in recs], "category": [r.category for r in recs],
                         "defect_type": [r.defect_type for r in recs], "label": label,
                         "p_defect": outputs["p_defect"].double().numpy(), "log_odds": log_odds},
                        columns=SCORE_COLUMNS)


def log_scores(tracker, frames: Mapping[str, pd.DataFrame]) -> None:
    for split, frame in frames.items():
        tracker.log_table_csv(frame, artifact_name(split))


def read_scores(path: str | Path) -> pd.DataFrame:
    """A scores CSV written by log_scores; one clear error when it is not one."""
    frame = pd.read_csv(path)
    missing = [c for c in ("label", "p_defect") if c not in frame.columns]
    if missing:
        raise UserError(f"{path} lacks the columns {missing}: it is not a scores file written by "
                        "defect-train (scores/<split>_scores.csv).")
    return frame


def download_scores(tracking_uri: str, run_id: str, split: str) -> pd.DataFrame:
    """The `split` scores a finished training run logged."""
    import mlflow

    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_name(split),
                                                    tracking_uri=tracking_uri)
    except Exception as err:  # MlflowException or OSError, depending on the store
        raise UserError(f"Run {run_id} has no {artifact_name(split)} ({err}). Runs trained before "
                        "scores were logged cannot be re-thresholded from their scores; rerun "
                        "defect-train, or score val with `defect-eval subset=val`.") from None
    return read_scores(local)
