"""Decode every image once, at the working resolution, into one uint8 tensor."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from rich.progress import Progress

from defect_detection.data.images import load_resized
from defect_detection.data.records import ImageRecord


def decode_images(records: Sequence[ImageRecord], size: int, description: str = "decoding") -> torch.Tensor:
    """N x 3 x size x size uint8 tensor; augmentation then runs on tensors, never on files."""
    out = np.empty((len(records), size, size, 3), dtype=np.uint8)
    with Progress(transient=True) as progress:
        task = progress.add_task(f"{description} {len(records)} images", total=len(records))
        for i, record in enumerate(records):
            out[i] = load_resized(record.path, size)
            progress.advance(task)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
