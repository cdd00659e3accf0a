"""A thin handle on one MLflow run: what the entry points hand their results to."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from defect_detection.base import project_root
from defect_detection.quiet import mask_credentials_in_mlflow_logs
from defect_detection.redact import redact, redact_value

log = logging.getLogger(__name__)
mask_credentials_in_mlflow_logs()
# MLflow writes "View run ... at: <tracking URI>/#/..." straight to stdout when a run on a server
# ends, password included; the run summary prints the same link with credentials masked.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# and a progress bar for every artifact it downloads (config.yaml, scores, the bundle): noise
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# Run tag listing metrics that are undefined (NaN) because a split held one class; promotion refuses it.
UNDEFINED_TAG = "undefined_metrics"


@contextmanager
def fluent_tracking_uri(uri: str, registry_uri: str | None = None) -> Iterator[None]:
    """Point MLflow's fluent API at `uri` (and a registry) for one block, then restore them.

    mlflow.set_tracking_uri / set_registry_uri also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI,
    which our configs and every later MlflowClient read: left set, they would silently redirect
    every later run composed in the same process (sweeps, notebooks, tests).
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(uri)
    if registry_uri:
        mlflow.set_registry_uri(registry_uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_READY_STORES: set[str] = set()


def ensure_local_store(tracking_uri: str) -> None:
    """Create a sqlite store's folder and database, one process at a time.

    MLflow creates the tables (alembic migrations) on first use; two first runs started at the same
    moment both did, and the second died with a raw migration error. A file lock beside the
    database serialises the creation; once a process has seen the store ready it skips this."""
    if not tracking_uri.startswith("sqlite:///") or tracking_uri in _READY_STORES:
        return
    db = Path(tracking_uri[len("sqlite:///"):]).expanduser()
    db.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(db.with_name(db.name + ".lock")):
        MlflowClient(tracking_uri).search_experiments(max_results=1)  # creates / migrates the tables
    _READY_STORES.add(tracking_uri)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created if missing) for the block."""
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def artifact_uri(path: str | Path | None) -> str | None:
    """A local folder as a file:// URI (what MLflow expects); URIs pass through."""
    if path is None or urlparse(str(path)).scheme in ("file", "s3", "gs", "wasbs", "http", "https",
                                                      "mlflow-artifacts", "hdfs", "dbfs"):
        return None if path is None else str(path)
    return Path(path).expanduser().resolve().as_uri()


def store_artifact_location(logger_cfg: Mapping | DictConfig) -> str | None:
    """Where a new experiment's artifacts go: `artifact_location` when set, else beside the store.

    A sqlite store `sqlite:///X/mlflow.db` keeps its artifacts in X/artifacts and a file store
    in its own folder, so MLFLOW_TRACKING_URI moves both (a fixed folder left orphan artifacts in
    the checkout's mlruns/); an http store decides itself (None).
    """
    explicit = logger_cfg.get("artifact_location")
    if explicit:
        return artifact_uri(explicit)
    uri = str(logger_cfg.get("tracking_uri") or "")
    if uri.startswith("sqlite:///"):
        return artifact_uri(Path(uri[len("sqlite:///"):]).expanduser().parent / "artifacts")
    if uri.startswith("file:") or (uri and "://" not in uri):
        folder = urlparse(uri).path if uri.startswith("file:") else uri
        return artifact_uri(Path(folder).expanduser() / "artifacts")
    return None


def without_credentials(uri: str) -> str:
    """A URI safe to write into a run tag or a log line: user info and token-like values masked."""
    return redact(uri)


def config_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, credentials masked: what a run keeps as config.yaml."""
    return OmegaConf.to_yaml(OmegaConf.create(redact_value(OmegaConf.to_container(cfg, resolve=True))))


def fresh_run_name() -> str:
    """MLflow's adjective-noun-number run name, drawn from OS entropy.

    MLflow draws it from the global `random`, which training has just seeded, so every run got
    the same name; the global state is left exactly as it was."""
    import random

    from mlflow.utils.name_utils import _generate_random_name

    state = random.getstate()
    random.seed()
    try:
        return _generate_random_name()
    finally:
        random.setstate(state)


def get_or_create_experiment(client: MlflowClient, name: str, logger_cfg: Mapping | DictConfig) -> str:
    """The id of experiment `name`, created when missing with its artifacts beside the store
    (store_artifact_location: the one place that decides it); safe when parallel processes
    create it at the same time."""
    artifact_location = store_artifact_location(logger_cfg)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None and experiment.lifecycle_stage != "deleted":
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # created meanwhile by a parallel process
        return client.get_experiment_by_name(name).experiment_id


def flatten(cfg: Mapping | DictConfig, prefix: str = "") -> dict[str, str]:
    """Dotted-key params from a nested config (lists rendered as their YAML flow form), credentials
    masked."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = redact(json.dumps(value) if isinstance(value, (list, tuple)) else str(value))
    return out


def git_commit() -> str:
    try:
        root = project_root()
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunTracker:
    """Logs to one run when tracking is on; every method is a no-op when it is off."""

    def __init__(self, client: MlflowClient | None = None, run_id: str | None = None,
                 tracking_uri: str | None = None) -> None:
        self.client, self.run_id, self.tracking_uri = client, run_id, tracking_uri
        # step of the once-per-run metrics (test report, margin): a continued run logs its new
        # results at its resume count, so no step holds two values
        self.step = 0

    @property
    def enabled(self) -> bool:
        return self.client is not None and self.run_id is not None

    @classmethod
    def from_lightning_logger(cls, logger) -> RunTracker:
        if logger is None:
            return cls()
        return cls(logger.experiment, logger.run_id, logger._tracking_uri)

    def log_params(self, params: Mapping[str, object]) -> None:
        if self.enabled:
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in params.items()]
            for start in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self.enabled:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            items = [Metric(k, float(v), now, self.step if step is None else step)
                     for k, v in metrics.items()]
            self.client.log_batch(self.run_id, metrics=items)

    def tag_store(self) -> None:
        """Say in the run which tracking store and which artifact location hold it."""
        if self.enabled:
            run = self.client.get_run(self.run_id)
            self.set_tags({"store.tracking_uri": without_credentials(str(self.tracking_uri)),
                           "store.artifact_uri": without_credentials(run.info.artifact_uri)})

    def set_tags(self, tags: Mapping[str, object]) -> None:
        if self.enabled:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_text(self.run_id, text, artifact_file)

    def log_dict(self, data: object, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_dict(self.run_id, data, artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        if self.enabled:
            self.client.log_figure(self.run_id, figure, artifact_file)

    def log_table_csv(self, frame, artifact_file: str) -> None:
        if self.enabled:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / Path(artifact_file).name
                frame.to_csv(path, index=False)
                parent = str(Path(artifact_file).parent)
                self.log_artifact(path, None if parent == "." else parent)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled:
            self.client.set_terminated(self.run_id, status)

    def fail(self, error: BaseException) -> None:
        """Mark the run FAILED (KILLED when stopped by a signal) and keep the traceback with it."""
        if not self.enabled:
            return
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        signal_name = stop_signal(error)
        try:
            self.log_text(text, "error/traceback.txt")
            self.set_tags({"error": (f"stopped by {signal_name}" if signal_name
                                     else f"{type(error).__name__}: {error}")[:5000]})
        finally:
            self.finish("KILLED" if signal_name else "FAILED")


def stop_signal(error: BaseException) -> str | None:
    """The signal behind a stop: SIGTERM (what timeout, SLURM and Kubernetes send; Lightning raises
    its SIGTERMException), SIGINT (Ctrl-C, which Lightning turns into SystemExit(1) after its graceful
    shutdown; a bare KeyboardInterrupt elsewhere), or None for an error."""
    if type(error).__name__ == "SIGTERMException" or (isinstance(error, SystemExit) and error.code == 143):
        return "SIGTERM"
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return "SIGINT (Ctrl-C)"
    return None


def tag_undefined_metrics(tracker, metrics: Mapping[str, float]) -> list[str]:
    """Tag the run with its undefined (NaN) metrics and warn: promotion refuses such a run."""
    from defect_detection.evaluation.metrics import undefined_metrics

    names = undefined_metrics(metrics)
    if names:
        log.warning("Undefined metrics (a split holds a single class): %s. They are logged as NaN; "
                    "the run is tagged %s and will not be promoted.", ", ".join(names), UNDEFINED_TAG)
        tracker.set_tags({UNDEFINED_TAG: ", ".join(names)})
    return names
