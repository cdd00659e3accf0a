"""Classification losses; `auto` class weights come from the train split's counts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from defect_detection.base import UserError


def class_weights(weights: str | Sequence[float] | None, counts: tuple[int, int]) -> torch.Tensor | None:
    """`auto`: [1, n_good/n_defect] as the seed did; a list is taken as given; null: none."""
    if weights is None:
        return None
    if weights == "auto":
        n_good, n_defect = counts
        if n_defect == 0:
            raise UserError("loss.weights=auto needs defect images in the train split.")
        return torch.tensor([1.0, n_good / n_defect])
    if isinstance(weights, str) or len(weights) != 2 or min(weights) <= 0:
        raise UserError(f"loss.weights={weights!r}: use auto, null or two positive numbers [good, defect].")
    return torch.tensor([float(w) for w in weights])


class FocalLoss(nn.Module):
    """Softmax focal loss (Lin et al. 2017) with optional class weights."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - logp.exp()) ** self.gamma) * logp
        if self.weight is not None:
            w = self.weight[target]
            return (loss * w).sum() / w.sum()
        return loss.mean()


def build_loss(name: str, counts: tuple[int, int], weights=None, gamma: float = 2.0) -> nn.Module:
    if name in ("weighted_ce", "ce"):
        return nn.CrossEntropyLoss(weight=class_weights(weights if name == "weighted_ce" else None, counts))
    if name == "focal":
        return FocalLoss(gamma, class_weights(weights, counts))
    raise UserError(f"Unknown loss '{name}': use weighted_ce, ce or focal.")
