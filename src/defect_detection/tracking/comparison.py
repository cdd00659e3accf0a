"""The runs of an experiment or sweep as one ranked table (CSV) and bar chart: the comparison people
otherwise click together in the MLflow UI."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from mlflow import MlflowClient
from mlflow.entities import Run

from defect_detection.base import UserError

ROLE_TAG = "run_role"  # "sweep" on parent runs, "comparison" on defect-compare runs; absent on trials
DEFAULT_METRICS = ("val/auroc", "val/loss", "test/auroc", "test/recall", "test/fp", "test/threshold")
DEFAULT_PARAMS = ("backbone.name", "freezing.name", "loss.name", "loss.weights", "optimizer.lr",
                  "optimizer.weight_decay", "data.image_size")
# Params that differ between runs for reasons that say nothing about the model.
IGNORED_PARAM_PREFIXES = ("paths.", "logger.", "callbacks.", "hydra.", "trainer.default_root_dir",
                          "data.root", "data.records.root", "run_name", "explain.",
                          # implied by backbone.name
                          "backbone.mean", "backbone.std", "backbone.stages", "backbone.gradcam_layer",
                          "backbone.min_image_size")


def sign(direction: str) -> float:
    """+1 for max/maximize, -1 for min/minimize."""
    d = str(direction).lower()
    if d in ("max", "maximize"):
        return 1.0
    if d in ("min", "minimize"):
        return -1.0
    raise UserError(f"direction '{direction}': use max or min.")


def metric_value(run: Run, metric: str) -> float:
    value = run.data.metrics.get(metric)
    return float("nan") if value is None else float(value)


def rank_runs(runs: Sequence[Run], metric: str, direction: str = "max") -> list[Run]:
    """Best first: finished runs with the metric by value (ties: newer first), then the rest."""
    s = sign(direction)

    def key(run: Run):
        v = metric_value(run, metric)
        usable = run.info.status == "FINISHED" and not math.isnan(v)
        return (0 if usable else 1, -s * v if usable else 0.0, -(run.info.start_time or 0))

    return sorted(runs, key=key)


def varying_params(runs: Sequence[Run]) -> list[str]:
    """Param names whose value differs between the runs (the ones a sweep changed)."""
    names = sorted({k for r in runs for k in r.data.params})
    out = []
    for name in names:
        if name.startswith(IGNORED_PARAM_PREFIXES):
            continue
        if len({r.data.params.get(name) for r in runs}) > 1:
            out.append(name)
    return out


def comparison_table(runs: Sequence[Run], metric: str, direction: str = "max",
                     metrics: Sequence[str] = DEFAULT_METRICS, params: Sequence[str] = DEFAULT_PARAMS,
                     add_varying: bool = True, model_runs: set[str] | None = None) -> pd.DataFrame:
    """One row per run, ranked by `metric`; columns: rank, identity, status, metrics, key params."""
    ordered = rank_runs(runs, metric, direction)
    param_cols = list(dict.fromkeys([*params, *(varying_params(runs) if add_varying else [])]))
    param_cols = [p for p in param_cols if any(p in r.data.params for r in runs)]
    metric_cols = list(dict.fromkeys([metric, *metrics]))
    rows = []
    for i, run in enumerate(ordered, 1):
        usable = run.info.status == "FINISHED" and not math.isnan(metric_value(run, metric))
        row = {"rank": i if usable else None, "run_name": run.info.run_name, "run_id": run.info.run_id,
               "status": run.info.status, "sweep_job": run.data.tags.get("sweep_job")}
        if model_runs is not None:
            row["has_model"] = run.info.run_id in model_runs
        row.update({m: run.data.metrics.get(m) for m in metric_cols})
        row.update({p: run.data.params.get(p) for p in param_cols})
        row["error"] = run.data.tags.get("error")
        rows.append(row)
    table = pd.DataFrame(rows)
    if not table.empty:
        table["rank"] = table["rank"].astype("Int64")
        table = table.dropna(axis=1, how="all")
    return table


def comparison_figure(table: pd.DataFrame, metric: str, label_params: Sequence[str] = ()) -> Figure:
    """Horizontal bars of `metric`, best at the top; failed or metric-less runs shown as empty rows."""
    n = max(len(table), 1)
    fig = Figure(figsize=(9, 1.2 + 0.32 * n), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    labels, values, colors = [], [], []
    for _, row in table.iterrows():
        name = str(row.get("run_name") or row["run_id"][:8])
        parts = [name]
        if "=" not in name:  # sweep trials are named after their overrides already
            parts += [f"{p}={row[p]}" for p in label_params if p in row and pd.notna(row[p])]
        label = " | ".join(parts)
        labels.append(label if len(label) <= 70 else label[:69] + "…")
        value = row.get(metric)
        ok = row["status"] == "FINISHED" and value is not None and pd.notna(value)
        values.append(float(value) if ok else 0.0)
        colors.append("tab:blue" if ok else "tab:red")
    y = list(range(len(labels)))[::-1]
    ax.barh(y, values, color=colors)
    for yi, v, c in zip(y, values, colors):
        ax.text(v, yi, f" {v:.4f}" if c == "tab:blue" else " failed / no value", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel(metric)
    fig.suptitle(f"{len(table)} runs ranked by {metric} (red: failed or no value)", fontsize=10)
    ax.margins(x=0.25)
    return fig


def runs_with_models(client: MlflowClient, experiment_ids: Sequence[str]) -> dict[str, object]:
    """run id -> the LoggedModel it logged (MLflow 3 keeps models as LoggedModels linked to runs)."""
    out: dict[str, object] = {}
    token = None
    while True:
        page = client.search_logged_models(list(experiment_ids), max_results=1000, page_token=token)
        for model in page:
            if str(model.status).endswith("READY") and model.source_run_id:
                out.setdefault(model.source_run_id, model)
        token = page.token
        if not token:
            return out


def write_comparison(table: pd.DataFrame, metric: str, out_dir: str | Path,
                     stem: str = "comparison") -> tuple[Path, Path]:
    """Save the table as CSV and its bar chart as PNG; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.png"
    table.to_csv(csv_path, index=False)
    params = [c for c in table.columns if "." in c and "/" not in c]
    label_params = [c for c in params if table[c].astype(str).nunique() > 1][:3]  # what differs
    comparison_figure(table, metric, label_params).savefig(png_path)
    return csv_path, png_path


def log_comparison(client: MlflowClient, runs: Sequence[Run], metric: str, tracker, out_dir: str | Path,
                   direction: str = "max", **table_kwargs) -> pd.DataFrame:
    """Build, save and log (under `comparison/` of the tracker's run) the table of `runs`."""
    experiment_ids = sorted({r.info.experiment_id for r in runs})
    models = runs_with_models(client, experiment_ids) if experiment_ids else {}
    table = comparison_table(runs, metric, direction, model_runs=set(models), **table_kwargs)
    for path in write_comparison(table, metric, out_dir):
        tracker.log_artifact(path, "comparison")
    return table


def get_experiment(client: MlflowClient, name: str):
    experiment = client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        known = [e.name for e in client.search_experiments()]
        raise UserError(f"No MLflow experiment '{name}' in {client.tracking_uri}. "
                        f"Known experiments: {known or 'none'}; set experiment_name=<one of them>.")
    return experiment


def resolve_sweep(client: MlflowClient, experiment_id: str, sweep: str | None):
    """(sweep id, its parent run or None) for `sweep` = an id, 'latest' or None (no sweep: all runs)."""
    if sweep is None:
        return None, None
    query = f"tags.{ROLE_TAG} = 'sweep'" + ("" if sweep == "latest" else f" AND tags.sweep_id = '{sweep}'")
    parents = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"],
                                 max_results=1)
    if parents:
        return parents[0].data.tags["sweep_id"], parents[0]
    if sweep == "latest":
        raise UserError("No sweep in this experiment yet: run `defect-train -m ...` first, or pass "
                        "sweep=null to compare all of its runs.")
    if client.search_runs([experiment_id], f"tags.sweep_id = '{sweep}'", max_results=1):
        return sweep, None  # trials of a sweep whose parent run was not recorded
    raise UserError(f"No runs tagged sweep_id='{sweep}': the id is the name of the sweep's folder "
                    "under outputs/train-multirun/ (or use sweep=latest).")


def select_runs(client: MlflowClient, experiment_id: str, sweep_id: str | None, filter_string: str | None,
                include_failed: bool = True) -> list:
    parts = [f"tags.sweep_id = '{sweep_id}'"] if sweep_id else []
    if filter_string:
        parts.append(f"({filter_string})" if " or " in filter_string.lower() else filter_string)
    runs = client.search_runs([experiment_id], " AND ".join(parts), max_results=50000)
    runs = [r for r in runs if r.data.tags.get(ROLE_TAG) not in ("sweep", "comparison")]
    if not include_failed:
        runs = [r for r in runs if r.info.status == "FINISHED"]
    return runs
