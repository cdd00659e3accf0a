"""Resuming an interrupted training: which checkpoint, which MLflow run continues, what to tell the user.

Every run tags itself with its checkpoint folder (`checkpoint_dir`) when it starts, so
`ckpt_path=last` (the newest unfinished run of the experiment), `resume_run_id=<id>` (that
run's last.ckpt) and `ckpt_path=<file>` (the run that wrote the file, if any) all find both the
checkpoint and the MLflow run to continue.
"""

from __future__ import annotations

import json
import logging
import shlex
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig, OmegaConf

from defect_detection.base import UserError
from defect_detection.data.fingerprint import ARTIFACT as FINGERPRINT
from defect_detection.data.fingerprint import compare
from defect_detection.models.checkpointing import DIGEST_KEY, OWNER_KEY
from defect_detection.models.digest import verify_digest
from defect_detection.models.safe_load import why_unloadable
from defect_detection.tracking.mlflow_run import (
    RunTracker,
    config_yaml,
    ensure_local_store,
    flatten,
    stop_signal,
)
from defect_detection.tracking.run_lock import refuse_if_live

log = logging.getLogger(__name__)

LAST = "last.ckpt"
CKPT_TAG = "checkpoint_dir"
# The command-line overrides a run started with (JSON list): what the resume hint repeats.
OVERRIDES_TAG = "command_overrides"
# Keys a resume may change (and what derives from them); any other difference from the run's
# logged config.yaml refuses the resume.
_EXPECTED_CHANGES = ("ckpt_path", "resume_run_id", "trainer.max_epochs", "paths.output_dir",
                     "data.num_workers", "data.pin_memory")
_RESUME_KEYS = ("ckpt_path", "resume_run_id")


@dataclass(frozen=True)
class Resume:
    ckpt_path: str | None = None       # what trainer.fit restores from
    run_id: str | None = None          # the MLflow run that continues in place (None: a new run)
    checkpoint_dir: str | None = None  # the continued run's checkpoint folder, reused
    parent_run_id: str | None = None   # a FINISHED run continued as a new run (never rewritten)

    @property
    def source_run_id(self) -> str | None:
        """The run whose checkpoint, config and data this one continues."""
        return self.run_id or self.parent_run_id


def check_checkpoint(path: str | Path) -> Path:
    """The path of a complete, safely loadable Lightning training checkpoint, or a UserError."""
    return _load_checkpoint(path)[0]


def _load_checkpoint(path: str | Path) -> tuple[Path, dict]:
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
    verify_digest(data.get("state_dict", {}), data.get(DIGEST_KEY), path)
    return path, data


def _client(cfg: DictConfig) -> MlflowClient | None:
    if not cfg.get("logger"):
        return None
    ensure_local_store(cfg.logger.tracking_uri)
    return MlflowClient(cfg.logger.tracking_uri)


def _last_of(run) -> Path | None:
    folder = run.data.tags.get(CKPT_TAG)
    return Path(folder) / LAST if folder and (Path(folder) / LAST).is_file() else None


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


def launch_overrides() -> list[str]:
    """The command-line overrides of this process's Hydra job ([] outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return [str(o) for o in HydraConfig.get().overrides.task]


def tag_overrides(tracker: RunTracker, overrides: Sequence[str] | None = None) -> None:
    """Record the overrides a fresh run started with (default: the command line's), for the resume hint."""
    words = launch_overrides() if overrides is None else [str(o) for o in overrides]
    tracker.set_tags({OVERRIDES_TAG: json.dumps(words)})


def resume_command(run_id: str, overrides: list[str]) -> str:
    """The shell command that continues `run_id` with its own overrides (quoted for pasting)."""
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in _RESUME_KEYS]
    return " ".join(["defect-train", *map(shlex.quote, keep), "ckpt_path=last", f"resume_run_id={run_id}"])


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


def tag_resumed_from(tracker: RunTracker, resume: Resume) -> None:
    """A FINISHED run continued as a new run: the new one names its parent."""
    if resume.parent_run_id:
        tracker.set_tags({"resumed_from": resume.parent_run_id, "mlflow.parentRunId": resume.parent_run_id,
                          "resumed_from_checkpoint": resume.ckpt_path})


def _run_of_folder(client: MlflowClient, folder: Path):
    text = str(folder).replace("'", "\\'")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.{CKPT_TAG} = '{text}'",
                              order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
    return runs[0] if runs else None


def checkpoint_folder(trainer) -> str | None:
    """Where the trainer's checkpoints go (None without a ModelCheckpoint)."""
    callback = getattr(trainer, "checkpoint_callback", None)
    return str(Path(callback.dirpath).resolve()) if callback is not None and callback.dirpath else None


def tag_checkpoint_dir(tracker: RunTracker, trainer) -> None:
    """Tag the run with where its checkpoints go: what a later resume looks up."""
    if folder := checkpoint_folder(trainer):
        tracker.set_tags({CKPT_TAG: folder})


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
        if tracker.enabled:
            tagged = tracker.client.get_run(tracker.run_id).data.tags.get(OVERRIDES_TAG)
            command = resume_command(tracker.run_id, json.loads(tagged) if tagged else launch_overrides())
        else:
            command = resume_command("", launch_overrides()).replace(
                "ckpt_path=last resume_run_id=", f"ckpt_path={shlex.quote(str(last))}")
        log.warning("Training stopped (%s). Resume with: %s", why, command)
        tracker.set_tags({"resume_with": command})
    except Exception as err:  # never hide the original error behind a reporting problem
        log.warning("Could not record how to resume: %s", err)
