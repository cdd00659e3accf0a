"""Challenger against champion on the same parts: the champion run's own test split and the
reviewed parts held back from training (defect-review export's holdout/), each model at its own
val-chosen threshold. Logs a `challenge` run with both models' numbers and a page that shows them
side by side, and the same numbers as `challenge/<set>/<metric>` on both models' runs, so that
`defect-promote metric=challenge/all/recall run_id=<challenger>` (or promote=true here) promotes
only through the existing guard: refused when the challenger is worse than the champion there.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from defect_detection.base import DEFECT, UserError
from defect_detection.data.records import ImageRecord, read_folder
from defect_detection.evaluation.metrics import DefinedAUROC
from defect_detection.models.loading import load_predictor
from defect_detection.monitoring.recorder import resolve_model
from defect_detection.tracking.mlflow_run import fluent_tracking_uri

log = logging.getLogger(__name__)
METRICS = ("auroc", "recall", "fp_rate", "n")


@dataclass
class ChallengeResult:
    table: pd.DataFrame  # set, metric, champion, challenger
    per_type: pd.DataFrame  # set, defect_type, champion recall, challenger recall, n
    run_id: str | None
    page: str
    promotion: object = None


def test_records(tracking_uri: str, run_id: str) -> list[ImageRecord]:
    """The test split of a training run, as logged in its data/splits.csv (files still on disk)."""
    from mlflow import MlflowClient

    try:
        with tempfile.TemporaryDirectory() as tmp:
            frame = pd.read_csv(MlflowClient(tracking_uri).download_artifacts(run_id, "data/splits.csv", tmp))
    except Exception as err:
        raise UserError(
            f"Run {run_id} has no data/splits.csv ({err}): the champion's test split is unknown."
        ) from None
    frame = frame[frame["split"] == "test"]
    records = [
        ImageRecord(
            str(r.path), DEFECT if str(r.label) in ("1", "defect") else 0, str(r.category), str(r.defect_type)
        )
        for r in frame.itertuples()
    ]
    present = [r for r in records if Path(r.path).is_file()]
    if len(present) < len(records):
        log.warning(
            "%d of the champion's %d test images are not on this machine: left out.",
            len(records) - len(present),
            len(records),
        )
    return present


def _metrics(p: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    import torch

    auroc = DefinedAUROC()
    auroc.update(torch.tensor(p), torch.tensor(labels))
    decided = p >= threshold
    defects, goods = labels == DEFECT, labels != DEFECT
    return {
        "auroc": float(auroc.compute()),
        "recall": float(decided[defects].mean()) if defects.any() else float("nan"),
        "fp_rate": float(decided[goods].mean()) if goods.any() else float("nan"),
        "n": float(len(p)),
    }


def challenge(cfg: DictConfig) -> ChallengeResult:
    uri = str(cfg.tracking_uri)
    champion_src, challenger_src = str(cfg.champion), str(cfg.challenger)
    champion, challenger = resolve_model(champion_src, uri), resolve_model(challenger_src, uri)
    if champion.run_id == challenger.run_id:
        raise UserError(f"challenger={challenger_src} is the champion itself (run {champion.run_id}).")
    with fluent_tracking_uri(uri):
        models = {"champion": load_predictor(champion_src), "challenger": load_predictor(challenger_src)}
    sets = {"test": test_records(uri, champion.run_id)}
    if cfg.get("holdout"):
        sets["holdout"] = read_folder(str(cfg.holdout), "reviewed")
    sets["all"] = [r for name in list(sets) for r in sets[name]]
    rows, per_type = [], []
    for name, records in sets.items():
        if not records:
            continue
        labels = np.array([r.label for r in records])
        scores = {who: m.p_defect([r.path for r in records]) for who, m in models.items()}
        numbers = {who: _metrics(scores[who], labels, models[who].threshold) for who in models}
        rows += [{"set": name, "metric": k, **{who: numbers[who][k] for who in models}} for k in METRICS]
        for kind in sorted({r.defect_type for r in records if r.label == DEFECT}):
            mask = np.array([r.label == DEFECT and r.defect_type == kind for r in records])
            per_type.append(
                {
                    "set": name,
                    "defect_type": kind,
                    "n": int(mask.sum()),
                    **{who: float((scores[who][mask] >= models[who].threshold).mean()) for who in models},
                }
            )
    table, types = pd.DataFrame(rows), pd.DataFrame(per_type)
    out = Path(str(cfg.output_dir))
    out.mkdir(parents=True, exist_ok=True)
    page = out / "challenge.html"
    page.write_text(_page(champion_src, challenger_src, champion.run_id, challenger.run_id, table, types))
    run_id = _log(cfg, champion, challenger, table, page)
    promotion = None
    if cfg.get("promote"):
        promotion = _promote(cfg, challenger.run_id)
    return ChallengeResult(table, types, run_id, str(page), promotion)


def _log(cfg: DictConfig, champion, challenger, table: pd.DataFrame, page: Path) -> str:
    from mlflow import MlflowClient

    from defect_detection.tracking.mlflow_run import RunTracker, get_or_create_experiment

    uri = str(cfg.tracking_uri)
    client = MlflowClient(uri)
    experiment = get_or_create_experiment(client, str(cfg.experiment_name), {"tracking_uri": uri})
    run = client.create_run(
        experiment,
        tags={
            "task": "challenge",
            "champion_run_id": champion.run_id,
            "challenger_run_id": challenger.run_id,
            "holdout": str(cfg.get("holdout") or ""),
        },
    )
    tracker = RunTracker(client, run.info.run_id, uri)
    values = {
        f"{who}/{r.set}/{r.metric}": float(r[who])
        for _, r in table.iterrows()
        for who in ("champion", "challenger")
    }
    tracker.log_metrics({k: v for k, v in values.items() if np.isfinite(v)})
    tracker.log_table_csv(table, "challenge/table.csv")
    tracker.log_artifact(page)
    tracker.finish("FINISHED")
    for who, info in (("champion", champion), ("challenger", challenger)):  # what defect-promote ranks by
        metrics = {
            f"challenge/{r.set}/{r.metric}": float(r[who])
            for _, r in table.iterrows()
            if r.metric != "n" and np.isfinite(r[who])
        }
        RunTracker(client, info.run_id, uri).log_metrics(metrics)
        client.set_tag(info.run_id, "challenge_run_id", run.info.run_id)
    return run.info.run_id


def _promote(cfg: DictConfig, run_id: str):
    """The challenger through the registry's guard, ranked on challenge/all/<cfg.metric>: refused
    (PromotionRefused) when the champion is better there."""
    from mlflow import MlflowClient

    from defect_detection.tracking.registry import find_candidates, promote

    client = MlflowClient(str(cfg.tracking_uri))
    metric = f"challenge/all/{cfg.metric}"
    found = find_candidates(
        client,
        [client.get_run(run_id).info.experiment_id],
        metric,
        f"attributes.run_id = '{run_id}'",
        include_undefined=True,
    )
    if not found:
        raise UserError(f"Run {run_id} cannot be promoted: it must be FINISHED with a logged model.")
    return promote(client, found[0], name=str(cfg.registered_model_name), metric=metric)


def _page(
    champion: str,
    challenger: str,
    champion_run: str,
    challenger_run: str,
    table: pd.DataFrame,
    types: pd.DataFrame,
) -> str:
    from defect_detection.reports.html import environment

    env = environment()
    return env.get_template("challenge.html.j2").render(
        champion=champion,
        challenger=challenger,
        champion_run=champion_run,
        challenger_run=challenger_run,
        rows=table.to_dict("records"),
        types=types.to_dict("records"),
    )
