"""The contract every detector family fills: how to build its module and network, what it needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Family:
    name: str
    build_module: Callable  # (ModelSettings, class_counts, meta) -> DetectorModule
    build_net: Callable[[dict], nn.Module]  # bundle meta -> network with the trained state's shapes
    trainer: dict = field(default_factory=dict)  # trainer values the family needs (e.g. one epoch)
    uses_train_defects: bool = True
    augments: bool = True  # whether train images are augmented (a memory bank wants them as seen)
    needs_masks: bool = False  # whether training reads the ground-truth masks
    check_split: Callable | None = None  # (ModelSettings, split) -> None: refuses data it cannot learn from
    # bf16-mixed training measured to keep its test decisions (docs/results/bf16_*.md): what
    # experiment=auto's precision=auto may switch on for it on a CPU with native bfloat16
    bf16_training: bool = False
    # trainer values read from the family's own settings (detector config -> dict), e.g. the patch
    # head's epochs, which cost seconds where a fine-tuned backbone's cost minutes
    trainer_of: Callable[[Any], dict] | None = None
    # (ModelSettings, (h, w), split -> {"good": n, "defect": n}, sample photo paths, device,
    # batch size) -> seconds
    # a run will take, from a timed probe: for a family whose cost is not a fine-tuned candidate's
    # time scaled by pixels (auto's budget estimator, auto/runner.py)
    estimate_seconds: Callable[..., float] | None = None

    def trainer_values(self, detector: Any) -> dict:
        return {**self.trainer, **(self.trainer_of(detector) if self.trainer_of else {})}
