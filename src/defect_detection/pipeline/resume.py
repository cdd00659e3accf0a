"""Resuming a run from its config: which checkpoint and which MLflow run continue, checked up front.

Every run tags itself with its checkpoint folder (`checkpoint_dir`) when it starts, so
`ckpt_path=last` (the newest unfinished run of the experiment), `resume_run_id=<id>` (that
run's last.ckpt) and `ckpt_path=<file>` (the run that wrote the file, if any) all find both the
checkpoint and the MLflow run to continue. A resume is refused when its config, its data or the
checkpoint's owner differ from the run's, or when the run is still training elsewhere; a FINISHED
run is continued as a new run. The checkpoint and tag primitives are tracking/resume.py's.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from defect_detection.base import UserError
from defect_detection.data.fingerprint import ARTIFACT as FINGERPRINT
from defect_detection.data.fingerprint import compare
from defect_detection.models.checkpointing import OWNER_KEY
from defect_detection.tracking.mlflow_run import RunTracker, config_yaml, ensure_local_store, flatten
from defect_detection.tracking.resume import (
    _EXPECTED_CHANGES,
    CKPT_TAG,
    LAST,
    OVERRIDES_TAG,
    Resume,
    _last_of,
    _load_checkpoint,
    resume_command,
)
from defect_detection.tracking.run_lock import refuse_if_live

log = logging.getLogger(__name__)


def _client(cfg: DictConfig) -> MlflowClient | None:
    if not cfg.get("logger"):
        return None
    ensure_local_store(cfg.logger.tracking_uri)
    return MlflowClient(cfg.logger.tracking_uri)


def _run_or_none(client: MlflowClient, run_id: str):
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _by_id(client: MlflowClient, run_id: str, uri: str):
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise UserError(f"resume_run_id={run_id}: no such run in {uri}.") from None


def _latest_unfinished(client: MlflowClient, experiment: str, uri: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "attributes.status != 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=50) if exp else []
    for run in runs:
        if _last_of(run):
            return run
    raise UserError(f"ckpt_path=last: no unfinished run of experiment '{experiment}' in {uri} has a "
                    f"{LAST} ({len(runs)} unfinished runs looked at). Pass resume_run_id=<run id> "
                    "or ckpt_path=<file>.")


def prepare_resume(cfg: DictConfig) -> Resume:
    """Resolve ckpt_path / resume_run_id into a checkpoint and a run, checking both up front.

    When a run continues, callbacks.model_checkpoint.dirpath is pointed at its checkpoint folder,
    so best/last checkpoints keep one home and ModelCheckpoint restores its best-so-far state.
    """
    ckpt, run_id = cfg.get("ckpt_path"), cfg.get("resume_run_id")
    if not ckpt and not run_id:
        return Resume()
    client = _client(cfg)
    uri = cfg.logger.tracking_uri if client else ""
    run = None
    if run_id or ckpt == "last":
        if client is None:
            raise UserError(f"{'resume_run_id' if run_id else 'ckpt_path=last'} finds the run in MLflow; "
                            "with logger=none pass ckpt_path=/path/to/last.ckpt.")
        run = _by_id(client, run_id, uri) if run_id else _latest_unfinished(client, cfg.experiment_name, uri)
        if ckpt in (None, "last"):
            path = _last_of(run)
            if path is None:
                where = run.data.tags.get(CKPT_TAG, "its checkpoint folder (no checkpoint_dir tag)")
                raise UserError(f"Run {run.info.run_id} has no {LAST} in {where}: it stopped before its "
                                "first epoch ended, so there is nothing to resume; start it afresh.")
        else:
            path = Path(ckpt)
    else:
        path = Path(ckpt)
        run = _run_of_folder(client, path.expanduser().resolve().parent) if client else None
    path, data = _load_checkpoint(path)
    owner = data.get(OWNER_KEY)
    if run is None and owner and client is not None:
        run = _run_or_none(client, owner)
    if run is not None and owner and owner != run.info.run_id:
        raise UserError(f"{path} was written by run {owner}, not by run {run.info.run_id}: another run "
                        f"reused its checkpoint folder ({path.parent}), so run {run.info.run_id} can no "
                        f"longer be resumed from it. Resume run {owner} instead (resume_run_id={owner}), "
                        "or start afresh.")
    refuse_if_live(run.data.tags.get(CKPT_TAG) if run is not None else None, owner, "Cannot resume")
    refuse_if_live(path.parent, owner, "Cannot resume")
    if run is not None:
        check_same_config(client, run, cfg)
    if run is None:
        log.info("Resuming from %s in a new MLflow run (no run owns that checkpoint).", path)
        return Resume(str(path), None, None)
    if run.info.status == "FINISHED":  # its report, threshold and model stay exactly as they are
        log.warning("Run %s is FINISHED: it is continued as a new run (tag resumed_from=%s); the "
                    "finished run is not changed.", run.info.run_id, run.info.run_id)
        return Resume(str(path), None, None, parent_run_id=run.info.run_id)
    folder = run.data.tags.get(CKPT_TAG)
    if folder and cfg.get("callbacks") and cfg.callbacks.get("model_checkpoint"):
        OmegaConf.update(cfg, "callbacks.model_checkpoint.dirpath", folder)
    log.info("Resuming MLflow run %s from %s", run.info.run_id, path)
    return Resume(str(path), run.info.run_id, folder)


def _run_config(client: MlflowClient, run) -> DictConfig:
    """The config the run started with: its config.yaml artifact, else its params (as YAML values)."""
    import yaml

    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = client.download_artifacts(run.info.run_id, "config.yaml", tmp)
            return OmegaConf.create(yaml.safe_load(Path(local).read_text()) or {})
    except Exception:  # no config.yaml (older run, artifact store unreachable): the params
        return OmegaConf.from_dotlist([f"{k}={v}" for k, v in run.data.params.items()])


def check_same_config(client: MlflowClient, run, cfg: DictConfig) -> None:
    """Refuse to continue `run` with a config other than its own (one line listing every key).

    Continuing a data=folder 64 px run with the defaults gave a FINISHED run with params from one
    dataset and metrics from another. The keys a resume may change are set back to the run's
    values first, so what derives from them (checkpoint folder, scheduler length) compares equal."""
    started = _run_config(client, run)
    probe = cfg.copy()
    for key in _EXPECTED_CHANGES:
        value = OmegaConf.select(started, key, default=None)
        if value is not None and OmegaConf.select(probe, key, default=None) is not None:
            OmegaConf.update(probe, key, value, force_add=True)
    old, new = flatten(started), flatten(probe)
    differ = [f"{key}: {old.get(key, '(absent)')} -> {new.get(key, '(absent)')}"
              for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)
              and key not in _EXPECTED_CHANGES]
    if differ:
        overrides = json.loads(run.data.tags.get(OVERRIDES_TAG, "[]"))
        raise UserError(f"Run {run.info.run_id} started with a different config; these keys differ: "
                        f"{'; '.join(differ)}. Resume it with its own overrides: "
                        f"{resume_command(run.info.run_id, overrides)}")


def check_same_data(cfg: DictConfig, resume: Resume, now: dict[str, str]) -> None:
    """Refuse to continue a run on other data than it started with (its data/fingerprint.json):
    images added, removed or changed under the same data.root, named with their counts."""
    run_id = resume.source_run_id
    client = _client(cfg)
    if not run_id or client is None:
        return
    try:
        with tempfile.TemporaryDirectory() as tmp:
            before = json.loads(Path(client.download_artifacts(run_id, FINGERPRINT, tmp)).read_text())
    except Exception:  # a run from before fingerprints existed
        log.warning("Run %s has no %s: cannot check that its data are unchanged.", run_id, FINGERPRINT)
        return
    change = compare(before, now)
    if change:
        raise UserError(f"Run {run_id} cannot be continued on these data: since it started, "
                        f"{change.describe()} under data.root={cfg.data.get('root')}. Its split, "
                        "threshold and report belong to the data it started with: restore them, or "
                        "start a new run on the new data.")


def _run_of_folder(client: MlflowClient, folder: Path):
    text = str(folder).replace("'", "\\'")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.{CKPT_TAG} = '{text}'",
                              order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    return runs[0] if runs else None


def continue_run(tracker: RunTracker, cfg: DictConfig, resume: Resume) -> None:
    """Reopen the run: RUNNING again, new keys logged, changed ones tagged, the new config kept beside
    the original config.yaml (MLflow params cannot change value)."""
    if not tracker.enabled or not resume.run_id:
        return
    run = tracker.client.get_run(resume.run_id)
    count = int(run.data.tags.get("resume_count", "0")) + 1
    tracker.step = count  # this continuation's once-per-run metrics get their own step
    tracker.client.update_run(resume.run_id, status="RUNNING")
    if "resume_with" in run.data.tags:  # the hint left by the interruption is now acted on
        tracker.client.delete_tag(resume.run_id, "resume_with")
    _archive_error(tracker, run, count)
    new, old = flatten(cfg), run.data.params
    changed = {k: (old[k], v[:6000]) for k, v in new.items() if k in old and old[k] != v[:6000]}
    tracker.log_params({k: v for k, v in new.items() if k not in old})
    tracker.set_tags({"resume_count": count, f"resume.{count}.from": resume.ckpt_path,
                      f"resume.{count}.changed": "; ".join(f"{k}: {a} -> {b}" for k, (a, b)
                                                           in sorted(changed.items())) or "nothing"})
    tracker.log_text(config_yaml(cfg), f"resume/{count}/config.yaml")


def _archive_error(tracker: RunTracker, run, count: int) -> None:
    """The stop being resumed is history: its `error` tag and error/ artifact move under resume/<n>/,
    so a run that then ends FINISHED carries no stale error."""
    error = run.data.tags.get("error")
    if error is None:
        return
    tracker.set_tags({f"resume.{count}.after_error": error})
    tracker.client.delete_tag(run.info.run_id, "error")
    try:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        if not [a for a in tracker.client.list_artifacts(run.info.run_id, "error")]:
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = tracker.client.download_artifacts(run.info.run_id, "error", tmp)
            tracker.client.log_artifacts(run.info.run_id, local, f"resume/{count}/error")
        get_artifact_repository(run.info.artifact_uri).delete_artifacts("error")
    except Exception as err:  # a store that cannot delete keeps it; the tag already says it is old
        log.warning("Could not move the old error/ artifact of run %s: %s", run.info.run_id, err)
