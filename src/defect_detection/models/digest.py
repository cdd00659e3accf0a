"""A digest of a model's weights, stored when a checkpoint or bundle is written and checked on load.

A bit flipped in a checkpoint's tensor data loaded and scored silently (torch's zip reader does not
check the stored CRCs), so the file carries the SHA-256 of its own weights: names, dtypes, shapes
and bytes, in key order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from defect_detection.base import UserError


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def verify_digest(state: Mapping[str, torch.Tensor], expected: str | None, path: object) -> None:
    """UserError when `expected` is set and the weights differ from it (None: an older file)."""
    if expected and state_digest(state) != expected:
        raise UserError(f"{path} is damaged: its weights no longer match the digest stored when it was "
                        "written (a flipped bit or an edit). Use another copy, e.g. the run's logged "
                        "model (runs:/<run id>/model) or checkpoint artifact.")
