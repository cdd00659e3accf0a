"""The PatchCore family: good parts only (models/families/patchcore.py)."""

from __future__ import annotations

from omegaconf import DictConfig

from defect_detection import UserError
from defect_detection.models.families import Family
from defect_detection.models.families.patchcore import PatchCoreModule, PatchCoreNet


def build_module(cfg: DictConfig, class_counts: tuple[int, int], meta: dict) -> PatchCoreModule:
    bb, det = cfg.backbone, cfg.detector
    strides = [int(s) for s in det.strides]
    reweight = int(det.get("reweight", 0))
    if reweight == 1 or reweight < 0:
        raise UserError(f"detector.reweight={reweight}: give 0 (the plain largest patch distance) or the "
                        "number of bank neighbours for PatchCore's re-weighting, >= 2 (the paper uses 9).")
    meta.update({"strides": strides, "neighbourhood": int(det.neighbourhood), "reweight": reweight})
    net = PatchCoreNet(bb.name, strides, bb.pretrained, bb.weights_path, int(det.neighbourhood),
                       reweight=reweight)
    return PatchCoreModule(net, bb.mean, bb.std, float(det.coreset_ratio), int(det.max_bank),
                           channels_last=bool(bb.get("channels_last", False)), meta=meta,
                           fold_batchnorm=bool(bb.get("fold_batchnorm", False)),
                           aggregate=meta.get("aggregate"), seed=int(cfg.seed))


def build_net(meta: dict) -> PatchCoreNet:
    return PatchCoreNet(meta["backbone"], meta["strides"], pretrained=False,
                        neighbourhood=int(meta.get("neighbourhood", 3)), bank_size=int(meta["bank_size"]),
                        reweight=int(meta.get("reweight", 0)))


# one pass over the good training images builds the bank: one epoch, no early stopping needed
FAMILY = Family("patchcore", build_module, build_net, trainer={"max_epochs": 1}, uses_train_defects=False,
                augments=False)
