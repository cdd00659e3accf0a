"""Resuming an interrupted training: which checkpoint, which MLflow run continues, what to tell the user.

Every run tags itself with its checkpoint folder (`checkpoint_dir`) when it starts, so
`ckpt_path=last` (the newest unfinished run of the experiment), `resume_run_id=<id>` (that
run's last.ckpt) and `ckpt_path=<file>` (the run that wrote the file, if any) all find both the
checkpoint and the MLflow run to continue.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from defect_detection import UserError
from defect_detection.models.safe_load import why_unloadable
from defect_detection.tracking.mlflow_run import RunTracker, ensure_local_store, flatten, stop_signal

log = logging.getLogger(__name__)

LAST = "last.ckpt"
CKPT_TAG = "checkpoint_dir"
# Keys a resume is expected to change; any other difference is warned about.
_EXPECTED_CHANGES = ("ckpt_path", "resume_run_id", "trainer.max_epochs", "paths.output_dir",
                     "trainer.default_root_dir")


@dataclass(frozen=True)
class Resume:
    ckpt_path: str | None = None       # what trainer.fit restores from
    run_id: str | None = None          # the MLflow run that continues (None: a new run)
    checkpoint_dir: str | None = None  # the continued run's checkpoint folder, reused


def check_checkpoint(path: str | Path) -> Path:
    """The path of a complete, safely loadable Lightning training checkpoint, or a UserError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"Checkpoint not found: {path}. Pass ckpt_path=<an existing .ckpt file>, "
                        "ckpt_path=last or resume_run_id=<MLflow run id>.")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, anything: not a file to trust
        raise UserError(f"Checkpoint {path} cannot be loaded safely ({why_unloadable(err)}). It is "
                        "incomplete, corrupt or not written by defect-train; resume from another "
                        "checkpoint.") from None
    if not isinstance(data, dict) or "loops" not in data or "optimizer_states" not in data:
        raise UserError(f"{path} holds weights only, not a training state to resume (no optimizer/"
                        "loop state). Use it for prediction, or resume from a last.ckpt.")
    return path


def _client(cfg: DictConfig) -> MlflowClient | None:
    if not cfg.get("logger"):
        return None
    ensure_local_store(cfg.logger.tracking_uri)
    return MlflowClient(cfg.logger.tracking_uri)


def _last_of(run) -> Path | None:
    folder = run.data.tags.get(CKPT_TAG)
    return Path(folder) / LAST if folder and (Path(folder) / LAST).is_file() else None


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
    path = check_checkpoint(path)
    if run is None:
        log.info("Resuming from %s in a new MLflow run (no run owns that checkpoint folder).", path)
        return Resume(str(path), None, None)
    if run.info.status == "FINISHED":
        log.warning("Run %s already FINISHED; continuing it adds epochs and logs its results again.",
                    run.info.run_id)
    folder = run.data.tags.get(CKPT_TAG)
    if folder and cfg.get("callbacks") and cfg.callbacks.get("model_checkpoint"):
        OmegaConf.update(cfg, "callbacks.model_checkpoint.dirpath", folder)
    log.info("Resuming MLflow run %s from %s", run.info.run_id, path)
    return Resume(str(path), run.info.run_id, folder)


def _run_of_folder(client: MlflowClient, folder: Path):
    text = str(folder).replace("'", "\\'")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.{CKPT_TAG} = '{text}'",
                              order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    return runs[0] if runs else None


def tag_checkpoint_dir(tracker: RunTracker, trainer) -> None:
    """Tag the run with where its checkpoints go: what a later resume looks up."""
    callback = getattr(trainer, "checkpoint_callback", None)
    if callback is not None and callback.dirpath:
        tracker.set_tags({CKPT_TAG: str(Path(callback.dirpath).resolve())})


def continue_run(tracker: RunTracker, cfg: DictConfig, resume: Resume) -> None:
    """Reopen the run: RUNNING again, new keys logged, changed ones tagged, the new config kept beside
    the original config.yaml (MLflow params cannot change value)."""
    if not tracker.enabled or not resume.run_id:
        return
    run = tracker.client.get_run(resume.run_id)
    count = int(run.data.tags.get("resume_count", "0")) + 1
    tracker.client.update_run(resume.run_id, status="RUNNING")
    if "resume_with" in run.data.tags:  # the hint left by the interruption is now acted on
        tracker.client.delete_tag(resume.run_id, "resume_with")
    new, old = flatten(cfg), run.data.params
    changed = {k: (old[k], v[:6000]) for k, v in new.items() if k in old and old[k] != v[:6000]}
    tracker.log_params({k: v for k, v in new.items() if k not in old})
    unexpected = sorted(k for k in changed if k not in _EXPECTED_CHANGES)
    if unexpected:
        log.warning("Resuming with a different config than the run started with: %s. Resume with the "
                    "original overrides to continue the same experiment.",
                    ", ".join(f"{k}: {changed[k][0]} -> {changed[k][1]}" for k in unexpected))
    tracker.set_tags({"resume_count": count, f"resume.{count}.from": resume.ckpt_path,
                      f"resume.{count}.changed": "; ".join(f"{k}: {a} -> {b}" for k, (a, b)
                                                           in sorted(changed.items())) or "nothing"})
    tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), f"resume/{count}/config.yaml")


def note_stopped(tracker: RunTracker, trainer, error: BaseException) -> None:
    """After a crash or Ctrl-C: say (log + run tag) how to resume, or that there is nothing to resume."""
    try:
        callback = getattr(trainer, "checkpoint_callback", None)
        if callback is None or not callback.dirpath or isinstance(error, UserError):
            return
        last = Path(callback.dirpath) / LAST
        why = stop_signal(error) or type(error).__name__
        if not last.is_file():
            log.warning("Training stopped (%s) before its first epoch ended: no %s to resume from.",
                        why, last)
            return
        command = (f"defect-train ckpt_path=last resume_run_id={tracker.run_id}" if tracker.enabled
                   else f"defect-train ckpt_path={last}")
        log.warning("Training stopped (%s). Resume with: %s (and the same overrides as this run).",
                    why, command)
        tracker.set_tags({"resume_with": command})
    except Exception as err:  # never hide the original error behind a reporting problem
        log.warning("Could not record how to resume: %s", err)
