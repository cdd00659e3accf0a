"""Detector families behind one contract (`detector=classifier|patchcore|segmenter|patchhead`).

Each family says how to build its LightningModule from the run's config (training) and its
network from a bundle's meta (predict, serve, export). Everything else (threshold on val,
calibration, reports, maps, bundle, ONNX) sees only DetectorModule / the network's two-class
logits per network input, so a new family is one module here and one config in conf/detector/.
"""

from __future__ import annotations

from defect_detection.base import UserError
from defect_detection.models.families.contract import Family


def family(name: str) -> Family:
    from defect_detection.models.families import (
        classifier,
        patchcore_family,
        patchhead_family,
        segmenter_family,
    )

    families = {f.name: f for f in (classifier.FAMILY, patchcore_family.FAMILY, segmenter_family.FAMILY,
                                       patchhead_family.FAMILY)}
    if name not in families:
        raise UserError(f"detector={name!r} is not a detector family: use one of {sorted(families)}.")
    return families[name]
