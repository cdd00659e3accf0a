"""`defect-promote`: register the best finished run's model and move the `champion` alias to it."""

from __future__ import annotations

import logging

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig
from rich.console import Console

from defect_detection.base import UserError
from defect_detection.tracking.comparison import get_experiment, resolve_sweep
from defect_detection.tracking.registry import (
    Candidate,
    Promotion,
    TieBreak,
    best_candidate,
    find_candidates,
    promote,
    resolve_direction,
)

log = logging.getLogger(__name__)


def choose(cfg: DictConfig, client: MlflowClient) -> Candidate:
    """The run to promote: cfg.run_id, or the best candidate of the experiment / sweep."""
    experiment = get_experiment(client, cfg.experiment_name)
    sweep_id, _ = resolve_sweep(client, experiment.experiment_id, cfg.get("sweep"))
    filters = [f"tags.sweep_id = '{sweep_id}'"] if sweep_id else []
    if cfg.get("filter"):
        filters.append(cfg.filter)
    if cfg.get("run_id"):
        filters = [f"attributes.run_id = '{cfg.run_id}'"]
    query = " AND ".join(filters) or None
    candidates = find_candidates(client, [experiment.experiment_id], cfg.metric, query,
                                 include_undefined=bool(cfg.get("run_id")))  # named: refused by promote
    if cfg.get("run_id") and not candidates:
        raise UserError(f"Run {cfg.run_id} is not a candidate: it must be FINISHED, in experiment "
                        f"'{cfg.experiment_name}', have logged a model and a '{cfg.metric}' value.")
    return best_candidate(candidates, cfg.metric, direction(cfg), tie_breaks(cfg), cfg.get("prefer", "newer"))


def direction(cfg: DictConfig) -> str:
    """cfg.direction, or the metric's known direction when unset (unknown metrics need one)."""
    return resolve_direction(cfg.metric, cfg.get("direction"))


def tie_breaks(cfg: DictConfig) -> list[TieBreak]:
    return [TieBreak(t["metric"], resolve_direction(t["metric"], t.get("direction")))
            for t in cfg.get("tie_break") or []]


def run_promotion(cfg: DictConfig) -> Promotion:
    direction(cfg), tie_breaks(cfg)  # a metric without a known direction fails before any search
    client = MlflowClient(cfg.tracking_uri)
    candidate = choose(cfg, client)
    try:
        result = promote(client, candidate, name=cfg.registered_model_name, metric=cfg.metric,
                         direction=direction(cfg), tie_break=tie_breaks(cfg), alias=cfg.alias,
                         previous_alias=cfg.previous_alias, force=cfg.force, dry_run=cfg.dry_run)
    except MlflowException as err:
        raise UserError(f"MLflow registry at {cfg.tracking_uri}: {err.message}") from err
    _report(result, cfg)
    return result


def _report(r: Promotion, cfg: DictConfig) -> None:
    was = (f" (was v{r.previous_version}, {r.metric}={r.previous_value:.4g})"
           if r.previous_version else " (first champion)")
    text = {
        "promoted": f"[bold green]Promoted[/] run {r.run_id} as {r.name} v{r.version} @{cfg.alias}: "
                    f"{r.metric}={r.value:.4g}, threshold {r.tags.get('threshold') or '?'}{was}",
        "already_champion": f"Run {r.run_id} already is {r.name} v{r.version} @{cfg.alias}: nothing to do.",
        "dry_run": f"[yellow]Dry run:[/] would promote run {r.run_id} ({r.metric}={r.value:.4g}) to "
                   f"{r.name} @{cfg.alias}{was}",
    }[r.action]
    Console().print(text)
    if r.action == "promoted":
        Console().print(f"Load it with mlflow.pyfunc.load_model('models:/{r.name}@{cfg.alias}') or "
                        f"defect-predict model=models:/{r.name}@{cfg.alias} images=<folder>")
