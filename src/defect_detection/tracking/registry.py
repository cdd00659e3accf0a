"""Champion promotion in the MLflow model registry.

Candidates are FINISHED runs that logged a model (in MLflow 3 a LoggedModel whose source_run_id is
the run) and carry the selection metric. The best one by (metric, tie-break metrics, run age) is
registered as a version of the registered model; the alias `champion` moves to it and the former
champion keeps `previous`. A candidate worse than the champion on the same metric is refused unless
forced. The version's tags record the metric, the run and the calibrated threshold.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from defect_detection import UserError
from defect_detection.tracking.comparison import metric_value, runs_with_models, sign
from defect_detection.tracking.mlflow_run import fluent_tracking_uri

log = logging.getLogger(__name__)


class PromotionRefused(UserError):
    """The candidate is worse than the current champion (promote with force=true to override)."""


@dataclass(frozen=True)
class TieBreak:
    metric: str
    direction: str = "max"


@dataclass
class Candidate:
    run: Run
    model_id: str
    model_uri: str

    @property
    def run_id(self) -> str:
        return self.run.info.run_id


@dataclass
class Promotion:
    action: str  # promoted | already_champion | dry_run
    name: str
    run_id: str
    metric: str
    value: float
    version: str | None = None
    previous_version: str | None = None
    previous_value: float | None = None
    tags: dict[str, str] = field(default_factory=dict)


def find_candidates(client: MlflowClient, experiment_ids: Sequence[str], metric: str,
                    filter_string: str | None = None) -> list[Candidate]:
    """FINISHED runs with a logged model and a value for `metric`."""
    query = "attributes.status = 'FINISHED'" + (f" AND {filter_string}" if filter_string else "")
    runs = client.search_runs(list(experiment_ids), query, max_results=50000)
    models = runs_with_models(client, experiment_ids)
    out = []
    for run in runs:
        model = models.get(run.info.run_id)
        if model is not None and not math.isnan(metric_value(run, metric)):
            out.append(Candidate(run, model.model_id, model.model_uri))
    return out


def score_key(run: Run, metric: str, direction: str, tie_break: Sequence[TieBreak]) -> tuple[float, ...]:
    """Larger is better: the metric, then each tie-break metric (missing values rank last)."""
    key = []
    for name, d in [(metric, direction), *((t.metric, t.direction) for t in tie_break)]:
        v = metric_value(run, name)
        key.append(-math.inf if math.isnan(v) else sign(d) * v)
    return tuple(key)


def best_candidate(candidates: Sequence[Candidate], metric: str, direction: str = "max",
                   tie_break: Sequence[TieBreak] = (), prefer: str = "newer") -> Candidate:
    if not candidates:
        raise UserError(f"No candidate: no FINISHED run with a logged model and a '{metric}' value matches.")
    if prefer not in ("newer", "older"):
        raise UserError(f"prefer='{prefer}': use newer or older.")
    age = 1 if prefer == "newer" else -1
    return max(candidates, key=lambda c: (*score_key(c.run, metric, direction, tie_break),
                                          age * (c.run.info.start_time or 0)))


def version_by_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _version_for_run(client: MlflowClient, name: str, candidate: Candidate) -> ModelVersion | None:
    try:
        versions = client.search_model_versions(f"name = '{name}' AND run_id = '{candidate.run_id}'")
    except MlflowException:
        return None
    return max(versions, key=lambda v: int(v.version)) if versions else None


def champion_value(client: MlflowClient, version: ModelVersion, metric: str) -> float:
    """The champion's `metric`: from its source run, else from the tags it was promoted with."""
    try:
        value = metric_value(client.get_run(version.run_id), metric) if version.run_id else math.nan
    except MlflowException:
        value = math.nan
    if math.isnan(value) and version.tags.get("metric") == metric:
        value = float(version.tags.get("metric_value", "nan"))
    return value


def promote(client: MlflowClient, candidate: Candidate, *, name: str, metric: str, direction: str = "max",
            tie_break: Sequence[TieBreak] = (), alias: str = "champion", previous_alias: str = "previous",
            force: bool = False, dry_run: bool = False) -> Promotion:
    """Register the candidate's model and move `alias` to it (see the module docstring)."""
    value = metric_value(candidate.run, metric)
    threshold = candidate.run.data.metrics.get("test/threshold")
    tags = {"metric": metric, "metric_value": repr(value), "direction": direction, "run_id": candidate.run_id,
            "threshold": "" if threshold is None else repr(float(threshold)),
            "threshold_policy": candidate.run.data.tags.get("threshold_policy", ""),
            "experiment_id": candidate.run.info.experiment_id,
            "sweep_id": candidate.run.data.tags.get("sweep_id", ""), "logged_model_id": candidate.model_id,
            "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "forced": str(bool(force)).lower()}
    champion = version_by_alias(client, name, alias)
    result = Promotion("promoted", name, candidate.run_id, metric, value, tags=tags)
    if champion is not None:
        result.previous_version = champion.version
        result.previous_value = champion_value(client, champion, metric)
        if champion.run_id == candidate.run_id:
            result.action, result.version = "already_champion", champion.version
            return result
        champion_run = _safe_run(client, champion.run_id)
        if champion_run is not None and not math.isnan(metric_value(champion_run, metric)):
            worse = (score_key(candidate.run, metric, direction, tie_break)
                     < score_key(champion_run, metric, direction, tie_break))
        elif not math.isnan(result.previous_value):  # its run is gone: the value it was promoted with
            worse = sign(direction) * value < sign(direction) * result.previous_value
        elif force:
            worse = False
        else:
            raise PromotionRefused(
                f"The current {alias} ({name} v{champion.version}) has no '{metric}' to compare with: "
                "pass force=true to replace it, or choose the metric it was promoted on "
                f"({champion.tags.get('metric', 'unknown')}).")
        if worse and not force:
            order = " then ".join([metric, *(t.metric for t in tie_break)])
            raise PromotionRefused(
                f"Candidate run {candidate.run_id} has {metric}={value:.6g}, worse than the current "
                f"{alias} ({name} v{champion.version}, run {champion.run_id}: {result.previous_value:.6g}) "
                f"by {order} ({direction}). Pass force=true to promote it anyway.")
    if dry_run:
        result.action = "dry_run"
        return result
    version = _version_for_run(client, name, candidate)
    if version is None:
        with fluent_tracking_uri(client.tracking_uri, client._registry_uri):  # register_model is fluent
            version = mlflow.register_model(candidate.model_uri, name, tags=tags)
    else:  # registered before (e.g. a former champion coming back): reuse, refresh the tags
        for key, val in tags.items():
            client.set_model_version_tag(name, version.version, key, val)
    client.update_model_version(name, version.version,
                                description=f"{metric}={value:.6g} from run {candidate.run_id}")
    if champion is not None and champion.version != version.version:
        client.set_registered_model_alias(name, previous_alias, champion.version)
    client.set_registered_model_alias(name, alias, version.version)
    result.version = version.version
    return result


def _safe_run(client: MlflowClient, run_id: str | None) -> Run | None:
    try:
        return client.get_run(run_id) if run_id else None
    except MlflowException:
        return None
