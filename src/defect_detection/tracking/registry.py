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

from defect_detection.base import UserError
from defect_detection.tracking.comparison import metric_value, runs_with_models, sign
from defect_detection.tracking.mlflow_run import UNDEFINED_TAG, fluent_tracking_uri

log = logging.getLogger(__name__)


# A run whose validation AUROC is at or below this ranks parts no better than chance.
CHANCE_AUROC = 0.5


class PromotionRefused(UserError):
    """The candidate is worse than the current champion (promote with force=true to override)."""


# Which way is better for every metric the project logs, by its name after the stage prefix
# (val/loss -> loss). Counts, thresholds and temperatures have no better side: they need direction=.
LOWER_IS_BETTER = frozenset({"loss", "fp", "fn", "ece", "ece_uncalibrated", "nll", "nll_uncalibrated",
                             "brier", "cam_ms_per_image"})
HIGHER_IS_BETTER = frozenset({"auroc", "ap", "accuracy", "precision", "recall", "f1", "tp", "tn",
                              "margin", "cam_pointing_game", "cam_pixel_auroc", "cam_energy_in_mask",
                              "cam_pro"})


def known_direction(metric: str) -> str | None:
    """'min' or 'max' for a metric the project logs with a better side, else None."""
    name = str(metric).rsplit("/", 1)[-1]
    if name in LOWER_IS_BETTER:
        return "min"
    if name in HIGHER_IS_BETTER or name.startswith("recall_"):  # recall_<category>[_<defect type>]
        return "max"
    return None


def resolve_direction(metric: str, direction: str | None = None, strict: bool = True) -> str:
    """The direction to rank `metric` by: its known one, or the explicit `direction` for others.

    An unknown metric without a direction is refused, and so (when strict, as promotion is) is a
    direction that contradicts a known one (direction=max for val/loss): ranking the wrong way
    promotes the worst run."""
    known = known_direction(metric)
    if direction is None or str(direction).lower() in ("", "none", "null", "auto"):
        if known is None:
            raise UserError(f"metric={metric}: its better side is not known; pass direction=max "
                            "(higher is better) or direction=min (lower is better).")
        return known
    given = "max" if sign(direction) > 0 else "min"  # sign() refuses anything but max/min
    if strict and known is not None and given != known:
        better = "lower" if known == "min" else "higher"
        raise UserError(f"direction={direction} contradicts metric={metric}: {better} is better for it "
                        f"(direction={known}). Leave direction unset to use it.")
    return given


@dataclass(frozen=True)
class TieBreak:
    metric: str
    direction: str | None = None  # None: the metric's known direction (resolve_direction)


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
                    filter_string: str | None = None, include_undefined: bool = False) -> list[Candidate]:
    """FINISHED runs with a logged model and a value for `metric`; runs tagged with undefined
    metrics (a split held one class) only when include_undefined (promote() then refuses them)."""
    query = "attributes.status = 'FINISHED'" + (f" AND {filter_string}" if filter_string else "")
    runs = client.search_runs(list(experiment_ids), query, max_results=50000)
    models = runs_with_models(client, experiment_ids)
    out = []
    for run in runs:
        model = models.get(run.info.run_id)
        if model is not None and not math.isnan(metric_value(run, metric)):
            if metric_value(run, "val/auroc") <= CHANCE_AUROC and not include_undefined:
                log.warning("Run %s is not a candidate: val/auroc %.4g is at chance.", run.info.run_id,
                            metric_value(run, "val/auroc"))
                continue
            if UNDEFINED_TAG in run.data.tags and not include_undefined:
                log.warning("Run %s is not a candidate: undefined metrics (%s).", run.info.run_id,
                            run.data.tags[UNDEFINED_TAG])
                continue
            out.append(Candidate(run, model.model_id, model.model_uri))
    return out


def score_key(run: Run, metric: str, direction: str, tie_break: Sequence[TieBreak]) -> tuple[float, ...]:
    """Larger is better: the metric, then each tie-break metric (missing values rank last)."""
    key = []
    for name, d in [(metric, direction), *((t.metric, t.direction) for t in tie_break)]:
        v = metric_value(run, name)
        key.append(-math.inf if math.isnan(v) else sign(resolve_direction(name, d, strict=False)) * v)
    return tuple(key)


def best_candidate(candidates: Sequence[Candidate], metric: str, direction: str | None = None,
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


def promote(client: MlflowClient, candidate: Candidate, *, name: str, metric: str,
            direction: str | None = None, tie_break: Sequence[TieBreak] = (), alias: str = "champion",
            previous_alias: str = "previous", force: bool = False, dry_run: bool = False) -> Promotion:
    """Register the candidate's model and move `alias` to it (see the module docstring)."""
    direction = resolve_direction(metric, direction)
    tie_break = [TieBreak(t.metric, resolve_direction(t.metric, t.direction)) for t in tie_break]
    chance = metric_value(candidate.run, "val/auroc")
    if chance <= CHANCE_AUROC:  # never, not even forced: it decides no better than a coin
        raise PromotionRefused(
            f"Run {candidate.run_id} has val/auroc={chance:.4g}: at or below chance ({CHANCE_AUROC}), its "
            "scores do not separate good from defect parts on validation, so it is never promoted. "
            "Look at its report.html (data, split, family) and train again.")
    undefined = candidate.run.data.tags.get(UNDEFINED_TAG)
    if undefined and not force:
        raise PromotionRefused(
            f"Run {candidate.run_id} has undefined metrics ({undefined}): a val or test split held a "
            "single class, so its scores say nothing about separating good from defect. Retrain with "
            "both classes in every split (or pass force=true).")
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
