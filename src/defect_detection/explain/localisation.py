"""How well saliency maps localise the defect, measured against ground-truth masks.

All at the original image resolution (the caller brings maps and masks there). Three per-image
scores, averaged over the images that have a non-empty mask:
- pointing game: the map's maximum falls within `radius_px` of the mask (Zhang et al.'s tolerant
  definition, 15 px there; 0 = strictly inside; chance = the mask's area share at radius 0);
- pixel AUROC: the map as a per-pixel score of the mask (0.5 = no better than random);
- energy in mask: the share of the map's total mass inside the mask (uniform map = area share);
and one over all of them, per region so that one large defect does not dominate:
- PRO: the mean overlap of every connected defect region with the map above a threshold,
  averaged over thresholds up to a false-positive rate (of the defect-free pixels) of
  `fpr_limit`, normalised to [0, 1] (the MVTec AD benchmark's AUPRO; random map ~ fpr_limit / 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torchmetrics.functional.classification import binary_auroc

PRO_BINS = 1000  # thresholds of the PRO curve: maps are in [0, 1]


def pointing_hit(cam: torch.Tensor, mask: torch.Tensor, radius_px: float = 0.0) -> bool:
    """True when the map's (first) maximum lies within radius_px of the mask; a flat map points
    nowhere."""
    if cam.max() <= cam.min():
        return False
    peak = int(cam.flatten().argmax())
    y, x = divmod(peak, cam.shape[-1])
    if bool(mask[y, x]):
        return True
    if radius_px <= 0:
        return False
    ys, xs = np.nonzero(mask.numpy() if isinstance(mask, torch.Tensor) else mask)
    return bool(ys.size) and float(((ys - y) ** 2 + (xs - x) ** 2).min()) <= float(radius_px) ** 2


def pro_counts(cam: torch.Tensor, mask: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-threshold counts of one image: (regions x bins pixels of each connected region at or
    above each threshold bin, bins defect-free pixels at or above it)."""
    labels, n = ndimage.label(mask.numpy().astype(bool))
    bins = np.clip((cam.float().numpy() * PRO_BINS).astype(np.int64), 0, PRO_BINS - 1)
    hist = np.bincount((labels * PRO_BINS + bins).ravel(), minlength=(n + 1) * PRO_BINS)
    hist = hist.reshape(n + 1, PRO_BINS)[:, ::-1].cumsum(1)[:, ::-1]  # count >= bin
    return hist[1:] / hist[1:, :1], hist[0]


def pro_score(per_image: list[tuple[np.ndarray, np.ndarray]], fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to fpr_limit, divided by fpr_limit."""
    if not per_image or not 0 < fpr_limit <= 1:
        return float("nan")
    overlaps = np.concatenate([o for o, _ in per_image])
    normal = np.sum([f for _, f in per_image], axis=0).astype(np.float64)
    if not len(overlaps) or normal[0] == 0:
        return float("nan")
    fpr = np.concatenate([[0.0], normal[::-1] / normal[0]])  # rising as the threshold falls
    pro = np.concatenate([[0.0], overlaps.mean(0)[::-1]])
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit:  # the curve's value at the limit, linearly between its neighbours
        nxt = int(np.argmax(fpr > fpr_limit))
        y_lim = np.interp(fpr_limit, [fpr[nxt - 1], fpr[nxt]], [pro[nxt - 1], pro[nxt]])
        x, y = np.append(x, fpr_limit), np.append(y, y_lim)
    return float(np.trapezoid(y, x) / fpr_limit)


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
    mask_area_share: float  # chance level of the strict pointing game and of energy_in_mask
    n_images: int
    pro: float = float("nan")  # per-region overlap, area under the curve to the FPR limit
    n_regions: int = 0

    def metrics(self, prefix: str = "test/") -> dict[str, float]:
        values = {"pointing_game": self.pointing_game, "pixel_auroc": self.pixel_auroc,
                  "energy_in_mask": self.energy_in_mask, "mask_area_share": self.mask_area_share,
                  "n_masked": self.n_images, "pro": self.pro, "n_regions": self.n_regions}
        return {f"{prefix}cam_{name}": float(value) for name, value in values.items()}


def per_image_scores(cam: torch.Tensor, mask: torch.Tensor, radius_px: float = 0.0) -> dict[str, float]:
    mask = mask.bool()
    return {"pointing_hit": float(pointing_hit(cam, mask, radius_px)), "pixel_auroc": pixel_auroc(cam, mask),
            "energy_in_mask": energy_in_mask(cam, mask), "mask_area_share": float(mask.float().mean())}


def localisation_scores(cams, masks, radius_px: float = 0.0,
                        fpr_limit: float = 0.3) -> tuple[LocalisationScores, list[dict]]:
    """Averaged scores and the per-image rows; images with an empty or full mask are skipped.
    cams/masks: N x H x W stacks, or sequences of H x W maps of any sizes (tiles, letterbox), at
    the resolution the scores are meant for (radius_px is in its pixels)."""
    rows, counts = [], []
    for cam, mask in zip(cams, masks):
        share = float(mask.bool().float().mean())
        if 0 < share < 1:
            rows.append(per_image_scores(cam, mask, radius_px))
            counts.append(pro_counts(cam, mask.bool()))
            rows[-1]["n_regions"] = len(counts[-1][0])
        else:
            rows.append(None)
    kept = [r for r in rows if r is not None]
    if not kept:
        nan = float("nan")
        return LocalisationScores(nan, nan, nan, nan, 0), rows

    def mean(key: str) -> float:
        return sum(r[key] for r in kept) / len(kept)

    scores = LocalisationScores(mean("pointing_hit"), mean("pixel_auroc"), mean("energy_in_mask"),
                                mean("mask_area_share"), len(kept), pro_score(counts, fpr_limit),
                                sum(len(o) for o, _ in counts))
    return scores, rows
