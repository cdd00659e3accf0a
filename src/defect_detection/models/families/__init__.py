"""Detector families behind one contract (`detector=classifier|patchcore|segmenter`).

Each family says how to build its LightningModule from the run's config (training) and its
network from a bundle's meta (predict, serve, export). Everything else (threshold on val,
calibration, reports, maps, bundle, ONNX) sees only DetectorModule / the network's two-class
logits per network input, so a new family is one module here and one config in conf/detector/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from defect_detection import UserError


@dataclass(frozen=True)
class Family:
    name: str
    build_module: Callable  # (cfg, class_counts, meta) -> DetectorModule
    build_net: Callable[[dict], nn.Module]  # bundle meta -> network with the trained state's shapes
    trainer: dict = field(default_factory=dict)  # trainer values the family needs (e.g. one epoch)
    uses_train_defects: bool = True
    augments: bool = True  # whether train images are augmented (a memory bank wants them as seen)
    needs_masks: bool = False  # whether training reads the ground-truth masks
    check_split: Callable | None = None  # (cfg, split) -> None: refuses data the family cannot learn from
    # bf16-mixed training measured to keep its test decisions (docs/results/bf16_*.md): what
    # experiment=auto's precision=auto may switch on for it on a CPU with native bfloat16
    bf16_training: bool = False


def family(name: str) -> Family:
    from defect_detection.models.families import classifier, patchcore_family, segmenter_family

    families = {f.name: f for f in (classifier.FAMILY, patchcore_family.FAMILY, segmenter_family.FAMILY)}
    if name not in families:
        raise UserError(f"detector={name!r} is not a detector family: use one of {sorted(families)}.")
    return families[name]
