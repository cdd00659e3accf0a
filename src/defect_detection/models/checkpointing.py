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
