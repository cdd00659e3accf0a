"""The primitives of resuming: checkpoints checked and owned, the tags a run leaves for a resume,
and the hint printed when it stops. Deciding what a resume continues (from a run's config) is
pipeline/resume.py's job."""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from defect_detection.base import UserError
from defect_detection.models.checkpointing import DIGEST_KEY
from defect_detection.models.digest import verify_digest
from defect_detection.models.safe_load import why_unloadable
from defect_detection.tracking.mlflow_run import (
    RunTracker,
    stop_signal,
)

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


def _last_of(run) -> Path | None:
    folder = run.data.tags.get(CKPT_TAG)
    return Path(folder) / LAST if folder and (Path(folder) / LAST).is_file() else None


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


def tag_resumed_from(tracker: RunTracker, resume: Resume) -> None:
    """A FINISHED run continued as a new run: the new one names its parent."""
    if resume.parent_run_id:
        tracker.set_tags({"resumed_from": resume.parent_run_id, "mlflow.parentRunId": resume.parent_run_id,
                          "resumed_from_checkpoint": resume.ckpt_path})


def checkpoint_folder(trainer) -> str | None:
    """Where the trainer's checkpoints go (None without a ModelCheckpoint)."""
    callback = getattr(trainer, "checkpoint_callback", None)
    return str(Path(callback.dirpath).resolve()) if callback is not None and callback.dirpath else None


def tag_checkpoint_dir(tracker: RunTracker, trainer) -> None:
    """Tag the run with where its checkpoints go: what a later resume looks up."""
    if folder := checkpoint_folder(trainer):
        tracker.set_tags({CKPT_TAG: folder})


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
