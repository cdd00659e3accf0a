"""How well saliency maps localise the defect, measured against ground-truth masks.

Three per-image scores, averaged over the images that have a non-empty mask:
- pointing game: the map's maximum falls inside the mask (chance = the mask's area share);
- pixel AUROC: the map as a per-pixel score of the mask (0.5 = no better than random);
- energy in mask: the share of the map's total mass inside the mask (uniform map = area share).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchmetrics.functional.classification import binary_auroc


def pointing_hit(cam: torch.Tensor, mask: torch.Tensor) -> bool:
    """True when the map's (first) maximum lies in the mask; a flat map points nowhere."""
    if cam.max() <= cam.min():
        return False
    return bool(mask.flatten()[cam.flatten().argmax()])


def pixel_auroc(cam: torch.Tensor, mask: torch.Tensor) -> float:
    """AUROC of the map's values as scores of the mask's pixels (ties count half)."""
    return float(binary_auroc(cam.flatten().float(), mask.flatten().long(), thresholds=None))


def energy_in_mask(cam: torch.Tensor, mask: torch.Tensor) -> float:
    """Share of the (non-negative) map's mass inside the mask; 0 for an all-zero map."""
    cam = cam.clamp_min(0).float()
    total = float(cam.sum())
    return float(cam[mask.bool()].sum()) / total if total > 0 else 0.0


@dataclass(frozen=True)
class LocalisationScores:
    pointing_game: float
    pixel_auroc: float
    energy_in_mask: float
    mask_area_share: float  # chance level of the pointing game and of energy_in_mask
    n_images: int

    def metrics(self, prefix: str = "test/") -> dict[str, float]:
        values = {"pointing_game": self.pointing_game, "pixel_auroc": self.pixel_auroc,
                  "energy_in_mask": self.energy_in_mask, "mask_area_share": self.mask_area_share,
                  "n_masked": self.n_images}
        return {f"{prefix}cam_{name}": float(value) for name, value in values.items()}


def per_image_scores(cam: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    mask = mask.bool()
    return {"pointing_hit": float(pointing_hit(cam, mask)), "pixel_auroc": pixel_auroc(cam, mask),
            "energy_in_mask": energy_in_mask(cam, mask), "mask_area_share": float(mask.float().mean())}


def localisation_scores(cams, masks) -> tuple[LocalisationScores, list[dict]]:
    """Averaged scores and the per-image rows; images with an empty or full mask are skipped.
    cams/masks: N x H x W stacks, or sequences of H x W maps of any sizes (tiles, letterbox)."""
    rows = []
    for cam, mask in zip(cams, masks):
        share = float(mask.bool().float().mean())
        rows.append(per_image_scores(cam, mask) if 0 < share < 1 else None)
    kept = [r for r in rows if r is not None]
    if not kept:
        nan = float("nan")
        return LocalisationScores(nan, nan, nan, nan, 0), rows

    def mean(key: str) -> float:
        return sum(r[key] for r in kept) / len(kept)

    scores = LocalisationScores(mean("pointing_hit"), mean("pixel_auroc"), mean("energy_in_mask"),
                                mean("mask_area_share"), len(kept))
    return scores, rows
