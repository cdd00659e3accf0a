"""Group the trials of a Hydra multirun under one MLflow sweep and keep a failing trial from ending it.

Every trial is its own run in the shared experiment, tagged `sweep_id` (the name of Hydra's sweep
folder) and nested under a parent run (`mlflow.parentRunId`) that the `SweepTracking` callback opens
before the first trial and closes with a summary after the last. The parent run id travels to the
trials through a small file in the sweep folder, so it works for every launcher (in-process, joblib
worker processes) without environment variables.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

import defect_detection.config  # noqa: F401  (registers the ${project_root:} resolver)
from defect_detection.tracking.comparison import ROLE_TAG, log_comparison, rank_runs
from defect_detection.tracking.mlflow_run import (
    RunTracker,
    ensure_local_store,
    flatten,
    get_or_create_experiment,
)

log = logging.getLogger(__name__)

SWEEP_FILE = "mlflow_sweep.json"


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_tags() -> dict[str, str]:
    """Tags that put this trial's run into its sweep; empty outside a Hydra multirun."""
    if not in_multirun():
        return {}
    hc = HydraConfig.get()
    sweep_dir = Path(hc.sweep.dir)
    info = read_sweep_file(sweep_dir)
    tags = {"sweep_id": sweep_dir.name, "sweep_dir": str(sweep_dir), "sweep_job": str(hc.job.num),
            "sweep_overrides": ",".join(trial_overrides(info)) or "(none)"}
    study = OmegaConf.select(hc.sweeper, "study_name", default=None)
    if study:
        tags["optuna_study"] = str(study)
    if info.get("parent_run_id"):
        tags["mlflow.parentRunId"] = info["parent_run_id"]
    return tags


def trial_overrides(info: dict[str, Any] | None = None) -> list[str]:
    """This trial's overrides that the sweep chose (those not shared by every trial)."""
    hc = HydraConfig.get()
    if info is None:
        info = read_sweep_file(hc.sweep.dir)
    shared = set(info.get("overrides", []))
    return [o for o in hc.overrides.task if o not in shared]


def trial_run_name(cfg: DictConfig) -> str | None:
    """`<job>: <swept overrides>` for a trial given no run_name (MLflow's random names otherwise)."""
    if cfg.get("run_name") or not in_multirun():
        return None
    name = ",".join(trial_overrides()) or "defaults"
    name = re.sub(r"\d+\.\d{5,}(e-?\d+)?", lambda m: f"{float(m.group()):.3g}", name)  # sampled floats
    return f"{HydraConfig.get().job.num}: {name}"[:240]


def read_sweep_file(sweep_dir: str | Path) -> dict[str, Any]:
    path = Path(sweep_dir) / SWEEP_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def record_failed_trial(cfg: DictConfig, error: BaseException) -> str | None:
    """Make sure a failed trial leaves a FAILED run with its error, even when it failed before
    training opened one (a bad config value, missing weights); returns that run's id."""
    if not cfg.get("logger"):
        return None
    tags = sweep_tags()
    try:
        client = MlflowClient(cfg.logger.tracking_uri)
        experiment_id = get_or_create_experiment(client, cfg.logger.experiment_name, cfg.logger)
        query = f"tags.sweep_id = '{tags.get('sweep_id')}' AND tags.sweep_job = '{tags.get('sweep_job')}'"
        found = client.search_runs([experiment_id], query, max_results=1) if tags else []
        if found:  # training opened the run and RunTracker.fail already marked it FAILED
            return found[0].info.run_id
        name = trial_run_name(cfg)
        run = client.create_run(experiment_id, tags={**tags, **({"mlflow.runName": name} if name else {})})
        tracker = RunTracker(client, run.info.run_id, cfg.logger.tracking_uri)
        try:
            tracker.log_params(flatten(cfg))
        except Exception:  # an unresolvable config is itself the error; keep the overrides at least
            tracker.log_params({"overrides": tags.get("sweep_overrides", "")})
        tracker.fail(error)
        return run.info.run_id
    except Exception as err:  # never let bookkeeping hide the trial's own error
        log.warning("Could not record the failed trial in MLflow: %s", err)
        return None


def sweep_runs(client: MlflowClient, experiment_id: str, sweep_id: str) -> list:
    """The trial runs of one sweep (not its parent)."""
    runs = client.search_runs([experiment_id], f"tags.sweep_id = '{sweep_id}'", max_results=50000)
    return [r for r in runs if r.data.tags.get(ROLE_TAG) != "sweep"]


class SweepTracking(Callback):
    """Hydra callback: opens the sweep's parent run before the first trial, closes it after the last
    with counts, the best trial and the comparison table (CSV + figure) as artifacts."""

    def __init__(self, compare: bool = True) -> None:
        self.compare = compare

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.get("logger"):
            return
        sweep_dir = Path(str(config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        uri = config.logger.tracking_uri
        # Creating the store and the experiment here, once, keeps parallel trials from racing on
        # sqlite's schema migration and on create_experiment.
        ensure_local_store(uri)
        client = MlflowClient(uri)
        experiment_id = get_or_create_experiment(client, config.logger.experiment_name, config.logger)
        override_list = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
        overrides = " ".join(override_list)
        tags = {ROLE_TAG: "sweep", "sweep_id": sweep_dir.name, "sweep_dir": str(sweep_dir),
                "sweep_overrides": overrides or "(none)", "mlflow.runName": f"sweep {sweep_dir.name}",
                "launcher": str(OmegaConf.select(config, "hydra.launcher._target_")).rsplit(".", 1)[-1],
                "sweeper": str(OmegaConf.select(config, "hydra.sweeper._target_")).rsplit(".", 1)[-1]}
        study = OmegaConf.select(config, "hydra.sweeper.study_name", default=None)
        if study:
            tags["optuna_study"] = str(study)
        run = client.create_run(experiment_id, tags=tags)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps({
            "parent_run_id": run.info.run_id, "experiment_id": experiment_id, "sweep_id": sweep_dir.name,
            "tracking_uri": uri, "overrides": override_list}, indent=2))
        log.info("Sweep %s: parent MLflow run %s in experiment '%s'", sweep_dir.name, run.info.run_id,
                 config.logger.experiment_name)
        # Hydra skips on_multirun_end when the sweep itself dies (Ctrl-C, a launcher or sweeper
        # error): without this the parent run would stay RUNNING for ever.
        atexit.register(close_aborted_sweep, uri, run.info.run_id)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        info = read_sweep_file(sweep_dir)
        if not info or not config.get("logger"):
            return
        client = MlflowClient(info["tracking_uri"])
        parent = RunTracker(client, info["parent_run_id"], info["tracking_uri"])
        runs = sweep_runs(client, info["experiment_id"], info["sweep_id"])
        status = [r.info.status for r in runs]
        counts = {s: status.count(s) for s in ("FINISHED", "FAILED", "RUNNING", "KILLED")}
        metric = config.get("optimized_metric")
        parent.log_metrics({"sweep/n_trials": len(runs), "sweep/n_finished": counts["FINISHED"],
                            "sweep/n_failed": counts["FAILED"]})
        done = [r for r in runs if r.info.status == "FINISHED" and metric in r.data.metrics
                and not math.isnan(r.data.metrics[metric])]
        direction = str(OmegaConf.select(config, "hydra.sweeper.direction", default="maximize"))
        if done:
            best = rank_runs(done, metric, direction)[0]
            parent.log_metrics({f"sweep/best_{metric.replace('/', '_')}": best.data.metrics[metric]})
            parent.set_tags({"best_run_id": best.info.run_id, "best_metric": metric})
        if self.compare and runs:
            try:
                log_comparison(client, runs, metric or "val/auroc", parent, out_dir=sweep_dir,
                               direction=direction)
            except Exception as err:
                log.warning("Sweep comparison not logged: %s", err)
        parent.finish("FINISHED" if counts["FINISHED"] else "FAILED")
        failed = [r for r in runs if r.info.status == "FAILED"]
        log.info("Sweep %s: %d trials, %d finished, %d failed. Compare: defect-compare sweep=%s",
                 info["sweep_id"], len(runs), counts["FINISHED"], counts["FAILED"], info["sweep_id"])
        for r in failed:
            log.warning("  failed trial %s (%s): %s", r.data.tags.get("sweep_job"), r.info.run_id,
                        r.data.tags.get("error", "?"))


def close_aborted_sweep(tracking_uri: str, parent_run_id: str) -> None:
    """Mark a sweep's parent run KILLED if it is still RUNNING when the process exits."""
    try:
        client = MlflowClient(tracking_uri)
        if client.get_run(parent_run_id).info.status != "RUNNING":
            return
        client.set_tag(parent_run_id, "error", "the sweep ended before its last trial was collected "
                       "(interrupted, or the launcher/sweeper failed); see the console log")
        client.set_terminated(parent_run_id, "KILLED")
    except Exception as err:  # exiting anyway: say so, never raise from atexit
        log.warning("Could not close the aborted sweep's parent run %s: %s", parent_run_id, err)


class PrepareData(Callback):
    """Hydra callback: list (and, for synthetic data, generate) the dataset once before the trials,
    so parallel workers do not race to create it and a bad data path fails once, not per trial."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        records = OmegaConf.select(config, "data.records")
        if records is None or "_target_" not in records:
            return
        from hydra.utils import instantiate

        try:
            instantiate(records)
        except Exception as err:  # the trials will fail with (and record) the same error
            log.warning("Preparing the data before the sweep failed: %s", err)
