"""The patch-head family: a light head on frozen, cached features (models/families/patchhead.py)."""

from __future__ import annotations

import torch
from hydra.utils import instantiate

from defect_detection.base import UserError
from defect_detection.data.splits import Split
from defect_detection.models.families.contract import Family
from defect_detection.models.families.patchhead import PatchHeadModule, PatchHeadNet
from defect_detection.models.losses import build_loss
from defect_detection.schema import ModelSettings, instantiable


def build_module(s: ModelSettings, class_counts: tuple[int, int], meta: dict) -> PatchHeadModule:
    bb, det = s.backbone, s.detector
    strides = list(det.strides)
    meta.update({"strides": strides, "width": det.width, "neighbourhood": det.neighbourhood,
                 "topk": det.topk, "grid_stride": det.grid_stride})
    net = PatchHeadNet(bb.name, strides, bb.pretrained, bb.weights_path, det.width, det.neighbourhood,
                       det.topk, det.grid_stride, download=bb.download)
    loss = build_loss(s.loss.name, class_counts, s.loss.weights, s.loss.gamma)
    optimizer = instantiate(instantiable(s.optimizer))
    head_lr, steps = float(det.head_lr), int(det.steps)

    def head_optimizer(params):  # the optimizer group's kind and weight decay, the head's own rate
        return optimizer(params=params, lr=head_lr)

    def cosine(optimizer):  # over the head's own steps (scheduler/ is sized for trainer.max_epochs)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    return PatchHeadModule(net, loss, head_optimizer, cosine, bb.mean, bb.std, det.patch_loss_weight,
                           det.cache_gb, channels_last=bb.channels_last, meta=meta,
                           aggregate=meta.get("aggregate"))


def build_net(meta: dict) -> PatchHeadNet:
    return PatchHeadNet(meta["backbone"], meta["strides"], pretrained=False, width=int(meta["width"]),
                        neighbourhood=int(meta["neighbourhood"]), topk=int(meta["topk"]),
                        grid_stride=int(meta.get("grid_stride", 16)))


def check_split(s: ModelSettings, split: Split) -> None:
    """Image labels need defects to learn from; a good-only train split fits PatchCore."""
    if not any(r.label != 0 for r in split.train):
        raise UserError("detector=patchhead learns from labelled defects, but the train split has no defect "
                        "image: use detector=patchcore, which learns from good parts alone, or add defect "
                        "images (or change the split fractions).")


def trainer_of(detector) -> dict:
    """A number of head steps, not epochs: a line of 40 train photos has 2 batches an epoch, one
    of 400 has 13, and the head needs a few hundred steps either way (they cost milliseconds)."""
    return {"max_epochs": -1, "max_steps": int(detector.get("steps", 400))}


# train images as seen (their features are cached); masks read where they exist (patch loss)
FAMILY = Family("patchhead", build_module, build_net, augments=False, needs_masks=True,
                check_split=check_split, trainer_of=trainer_of)
