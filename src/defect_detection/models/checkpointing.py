"""Checkpoints that a killed process cannot corrupt, loaded safely, and carrying the RNG state
that makes a resumed run continue exactly like an uninterrupted one."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning.callbacks import Callback

from defect_detection.models.digest import state_digest


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write `.<name>.<pid>.tmp` beside the target, fsync it, then os.replace it into place.

    Lightning 2.6 (lightning_fabric.utilities.cloud_io._atomic_save) stages the bytes in a file
    in the system temp folder and moves it with shutil.move: an atomic rename only when that
    folder shares a filesystem with the checkpoint dir; otherwise a plain copy that a kill leaves
    half-written, and never an fsync. Here a checkpoint either exists completely or not at all.
    Loads default to weights_only=True (tensors and plain containers only, no code runs).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location, True if weights_only is None else weights_only)


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class RngStateCallback(Callback):
    """Save the torch / numpy / python RNG states with every checkpoint, restore them on resume.

    Lightning checkpoints hold weights, optimiser and loop state but not the global RNGs, which
    drive the shuffle order and the augmentation; without them a resumed run draws different
    batches than the uninterrupted one. Stored as tensors and plain values: weights_only-safe.
    """

    def state_dict(self) -> dict:
        return _rng_state()

    def load_state_dict(self, state_dict: dict) -> None:
        _set_rng_state(state_dict)


OWNER_KEY = "defect_run_id"  # the MLflow run that wrote the checkpoint (None: not tracked)
DIGEST_KEY = "defect_weights_sha256"  # models/digest.py over checkpoint["state_dict"]


class CheckpointOwner(Callback):
    """Stamps every checkpoint with the run that wrote it and the digest of its weights.

    A checkpoint may only continue the run that wrote it: two runs sharing paths.output_dir wrote
    one last.ckpt, and resuming the first continued from the second's weights. `run_id` is set once
    the MLflow run exists (after the Trainer is built)."""

    def __init__(self, run_id: str | None = None) -> None:
        self.run_id = run_id

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[OWNER_KEY] = self.run_id
        checkpoint[DIGEST_KEY] = state_digest(checkpoint.get("state_dict", {}))


def stamp_threshold(path: str | Path, threshold: float, policy: str, temperature: float,
                    checkpoint: dict | None = None) -> None:
    """Write the val-chosen threshold (and temperature) into a checkpoint of this run, in place and
    atomically, so `defect-predict model=<...>.ckpt` decides as the run's report did."""
    path = Path(path)
    if checkpoint is None:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", {})
    if "threshold" in state:
        state["threshold"] = torch.tensor(float(threshold))
    if "temperature" in state:
        state["temperature"] = torch.tensor(float(temperature))
    meta = checkpoint.setdefault("defect_meta", {})
    meta.update({"threshold": float(threshold), "threshold_policy": str(policy),
                 "temperature": float(temperature), "threshold_chosen": True})
    checkpoint[DIGEST_KEY] = state_digest(state)
    AtomicCheckpointIO().save_checkpoint(checkpoint, path)


def stamp_run_checkpoints(folder: str | Path | None, run_id: str | None, choice, temperature: float) -> None:
    """stamp_threshold on every checkpoint in `folder` that this run wrote (others are left alone)."""
    if not folder:
        return
    for path in sorted(Path(folder).glob("*.ckpt")):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # not ours to touch
            continue
        if isinstance(checkpoint, dict) and checkpoint.get(OWNER_KEY) == run_id:
            stamp_threshold(path, choice.value, choice.policy, temperature, checkpoint)
