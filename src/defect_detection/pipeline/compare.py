"""`defect-compare`: the runs of an experiment or sweep ranked by a metric, printed and saved.

Prints a rich table, writes comparison.csv + comparison.png to the output folder and logs both to
MLflow: to the sweep's parent run when comparing one sweep, else to a small `comparison` run.
"""

from __future__ import annotations

import logging
import math

import pandas as pd
from mlflow import MlflowClient
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from defect_detection.base import UserError
from defect_detection.reports.html import comparison_cards, render_comparison
from defect_detection.tracking.comparison import (
    ROLE_TAG,
    comparison_table,
    get_experiment,
    resolve_sweep,
    runs_with_models,
    select_runs,
    write_comparison,
)
from defect_detection.tracking.mlflow_run import RunTracker
from defect_detection.tracking.registry import resolve_direction

log = logging.getLogger(__name__)


def compare(cfg: DictConfig) -> pd.DataFrame:
    """Rank, print, save and log; returns the table."""
    direction = resolve_direction(cfg.metric, cfg.get("direction"), strict=False)
    client = MlflowClient(cfg.tracking_uri)
    experiment = get_experiment(client, cfg.experiment_name)
    sweep_id, parent = resolve_sweep(client, experiment.experiment_id, cfg.get("sweep"))
    runs = select_runs(client, experiment.experiment_id, sweep_id, cfg.get("filter"),
                       cfg.get("include_failed", True))
    if not runs:
        raise UserError(f"No runs to compare in experiment '{cfg.experiment_name}'"
                        + (f", sweep {sweep_id}" if sweep_id else "") + ".")
    models = runs_with_models(client, [experiment.experiment_id])
    table = comparison_table(runs, cfg.metric, direction, metrics=list(cfg.metrics),
                             params=list(cfg.params), add_varying=cfg.varying_params, model_runs=set(models))
    csv_path, png_path = write_comparison(table, cfg.metric, cfg.out_dir)
    title = f"{cfg.experiment_name}" + (f" / sweep {sweep_id}" if sweep_id else "") + \
        f": {len(table)} runs by {cfg.metric} ({direction})"
    print_table(table, title, cfg.get("top"))
    html_path = csv_path.with_suffix(".html")  # the same table, the chart and a card per run
    page = render_comparison(table, cfg.metric, title, png_path, comparison_cards(client, table))
    html_path.write_text(page, encoding="utf-8")
    if cfg.log_to_mlflow:
        tracker = _comparison_tracker(client, experiment.experiment_id, parent, cfg)
        for path in (csv_path, png_path, html_path):
            tracker.log_artifact(path, "comparison")
        if parent is None:
            tracker.finish("FINISHED")
        log.info("Logged the comparison to MLflow run %s (artifacts/comparison/)", tracker.run_id)
    log.info("Saved %s, %s and %s", csv_path, png_path, html_path)
    return table


def _comparison_tracker(client: MlflowClient, experiment_id: str, parent, cfg: DictConfig) -> RunTracker:
    if parent is not None:
        return RunTracker(client, parent.info.run_id, cfg.tracking_uri)
    run = client.create_run(experiment_id, tags={ROLE_TAG: "comparison", "metric": cfg.metric,
                                                 "mlflow.runName": f"comparison by {cfg.metric}",
                                                 **({"filter": cfg.filter} if cfg.get("filter") else {})})
    return RunTracker(client, run.info.run_id, cfg.tracking_uri)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(table: pd.DataFrame, title: str, top: int | None = None, max_params: int = 5) -> None:
    """Metrics and the (first few) params that differ between the runs; the CSV has every column."""
    fixed = ("rank", "run_name", "run_id", "status", "sweep_job", "has_model", "error")
    rest = [c for c in table.columns if c not in fixed]
    metrics = [c for c in rest if "/" in c]
    params = [c for c in rest if c not in metrics]
    varying = [c for c in params if table[c].astype(str).nunique() > 1]  # key params come first
    columns = ["rank", "run_name", "status", *metrics, *(varying or params)[:max_params], "run_id"]
    rich = Table(title=title, show_lines=False)
    for col in columns:
        rich.add_column(col, overflow="ellipsis", no_wrap=True, min_width=min(len(col), 12),
                        max_width=36 if col == "run_name" else 20)
    for _, row in (table.head(top) if top else table).iterrows():
        rich.add_row(*(_fmt(row[c]) if c != "run_id" else str(row[c])[:12] for c in columns))
    Console(width=max(220, Console().width)).print(rich)
