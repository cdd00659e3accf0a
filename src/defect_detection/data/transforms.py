"""Train/eval transforms on cached uint8 CHW tensors, built from the augmentation config."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def build_eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose([v2.Resize((image_size, image_size), antialias=True), *_normalize(mean, std)])


def build_train_transform(aug, image_size: int, mean: Sequence[float],
                          std: Sequence[float]) -> v2.Compose:
    """The train transform: geometric, then photometric augmentation, then normalisation."""
    steps: list = []
    crop_scale = aug.get("crop_scale")
    if crop_scale:
        steps.append(v2.RandomResizedCrop(image_size, scale=tuple(crop_scale), antialias=True))
    else:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
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
