"""The PatchCore family: good parts only (models/families/patchcore.py)."""

from __future__ import annotations

from defect_detection.base import UserError
from defect_detection.data.splits import Split
from defect_detection.models.families.contract import Family
from defect_detection.models.families.patchcore import PatchCoreModule, PatchCoreNet
from defect_detection.schema import ModelSettings


def build_module(s: ModelSettings, class_counts: tuple[int, int], meta: dict) -> PatchCoreModule:
    bb, det = s.backbone, s.detector
    strides = list(det.strides)
    reweight = det.reweight
    if reweight == 1 or reweight < 0:
        raise UserError(f"detector.reweight={reweight}: give 0 (the plain largest patch distance) or the "
                        "number of bank neighbours for PatchCore's re-weighting, >= 2 (the paper uses 9).")
    meta.update({"strides": strides, "neighbourhood": det.neighbourhood, "reweight": reweight,
                 "neighbourhood_zero_pad": True})
    net = PatchCoreNet(bb.name, strides, bb.pretrained, bb.weights_path, det.neighbourhood, reweight=reweight,
                       download=bb.download)
    return PatchCoreModule(net, bb.mean, bb.std, det.coreset_ratio, det.max_bank,
                           channels_last=bb.channels_last, meta=meta, fold_batchnorm=bb.fold_batchnorm,
                           aggregate=meta.get("aggregate"), seed=s.seed)


# Every 5th good train input is held out of the bank to put scores on a scale (patchcore.py): below
# 10 good images at most one is held out, the spread of good scores is unknown, and with fewer than 5
# none is (raw distances in the tens saturate p_defect at 1: val AUROC 0.5, every part rejected).
MIN_GOOD_TRAIN = 10


def check_split(s: ModelSettings, split: Split) -> None:
    """Refuse a train split with too few good parts to build and scale a memory bank."""
    n_good = sum(1 for r in split.train if r.label == 0)
    if n_good < MIN_GOOD_TRAIN:
        raise UserError(f"detector=patchcore needs at least {MIN_GOOD_TRAIN} good images in the train split "
                        f"and it has {n_good}: it learns from good parts alone and holds every 5th out to "
                        "scale its scores. Add good images (or lower split.make.val_fraction / "
                        "test_fraction), or use detector=classifier.")


def build_net(meta: dict) -> PatchCoreNet:
    return PatchCoreNet(meta["backbone"], meta["strides"], pretrained=False,
                        neighbourhood=int(meta.get("neighbourhood", 3)), bank_size=int(meta["bank_size"]),
                        reweight=int(meta.get("reweight", 0)),
                        # checkpoints from before the key averaged over the inside neighbours only
                        zero_pad=bool(meta.get("neighbourhood_zero_pad", False)))


# one pass over the good training images builds the bank: one epoch, no early stopping needed
FAMILY = Family("patchcore", build_module, build_net, trainer={"max_epochs": 1}, uses_train_defects=False,
                augments=False, check_split=check_split)
