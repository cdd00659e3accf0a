"""Train/eval transforms on cached uint8 CHW tensors, built from the augmentation config."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from defect_detection.data.geometry import Geometry, size_hw

log = logging.getLogger(__name__)


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def _fixed_size(geometry) -> tuple[int, int] | None:
    """The working size every cached image has, or None for tiles (each image keeps its own)."""
    if isinstance(geometry, Geometry):
        return None if geometry.name == "tiles" else geometry.size
    return size_hw(geometry)


def build_eval_transform(geometry, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """Normalisation (cached images already have the geometry's size; the resize is a no-op
    safeguard for fixed-size geometries)."""
    size = _fixed_size(geometry)
    return v2.Compose([*([v2.Resize(size, antialias=True)] if size else []), *_normalize(mean, std)])


def build_train_transform(aug, geometry, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    """The train transform: geometric, then photometric augmentation, then normalisation.

    With tiles the whole (native-size) image is augmented before it is cut, so a flip moves the
    tiles with it; random resized crops need one output size and are left out there (logged).
    """
    steps: list = []
    size = _fixed_size(geometry)
    crop_scale = aug.get("crop_scale")
    if crop_scale and size:
        steps.append(v2.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True))
    elif size:
        steps.append(v2.Resize(size, antialias=True))
    elif crop_scale:
        log.info("augmentation.crop_scale is not applied with input=tiles (images keep their native "
                 "size); flips, rotation and colour jitter are.")
    if aug.get("hflip", 0):
        steps.append(v2.RandomHorizontalFlip(aug.hflip))
    if aug.get("vflip", 0):
        steps.append(v2.RandomVerticalFlip(aug.vflip))
    if aug.get("rotation", 0):
        steps.append(v2.RandomRotation(aug.rotation))
    if aug.get("color_jitter", 0):
        cj = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=cj, contrast=cj, saturation=cj))
    return v2.Compose([*steps, *_normalize(mean, std)])
