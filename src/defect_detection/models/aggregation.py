"""From tile scores to image scores: the multiple-instance rule of the tile geometry.

An image is a bag of tiles; it is defective when any tile is, so the image's defect log-odds is
a max-like pool of its tiles' log-odds and the loss is on that image score: no tile labels are
needed. Every family returns two-class logits per tile; the pooled image logits are [0, z]
(softmax of that is sigmoid(z), the same p_defect the classifier's softmax gives).

- max: the top tile decides (PatchCore's max patch distance, classic MIL).
- topk_mean: the mean of the k highest tiles; less swayed by one noisy tile, still sees a
  defect that spans a few tiles.
- smooth_max: tau * log(mean(exp(z / tau))): between the mean (large tau) and the max (tau -> 0),
  with a gradient on every tile.

Bags are contiguous runs of tiles (how the collate function and the predictors lay them out).
"""

from __future__ import annotations

import torch

AGGREGATES = ("max", "topk_mean", "smooth_max")


def defect_log_odds(logits: torch.Tensor) -> torch.Tensor:
    """z = logit(defect) - logit(good) per row: what the aggregate and the threshold act on."""
    return logits[:, 1] - logits[:, 0]


def bag_matrix(z: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n x max_count matrix of z padded with -inf, validity mask) for contiguous bags."""
    n, width = len(counts), int(counts.max()) if len(counts) else 0
    starts = torch.cumsum(counts, 0) - counts
    bag = torch.repeat_interleave(torch.arange(n, device=z.device), counts)
    pos = torch.arange(len(z), device=z.device) - starts[bag]
    matrix = z.new_full((n, width), float("-inf"))
    matrix[bag, pos] = z
    valid = torch.zeros((n, width), dtype=torch.bool, device=z.device)
    valid[bag, pos] = True
    return matrix, valid


def pool_log_odds(z: torch.Tensor, counts: torch.Tensor, how: str = "max", k: int = 3,
                  tau: float = 1.0) -> torch.Tensor:
    """Image defect log-odds from tile log-odds z, `counts[i]` tiles per image in order."""
    if how not in AGGREGATES:
        raise ValueError(f"input.aggregate={how!r}: use one of {AGGREGATES}")
    matrix, valid = bag_matrix(z, counts)
    if how == "max":
        return matrix.amax(1)
    if how == "topk_mean":
        kk = min(int(k), matrix.shape[1])
        top = matrix.topk(kk, dim=1).values
        taken = torch.clamp(counts, max=kk).to(z.dtype)
        return torch.where(torch.isfinite(top), top, torch.zeros_like(top)).sum(1) / taken
    lse = torch.logsumexp(matrix / tau, dim=1)
    return tau * (lse - torch.log(counts.to(z.dtype)))


def image_logits(tile_logits: torch.Tensor, counts: torch.Tensor | None, how: str = "max", k: int = 3,
                 tau: float = 1.0) -> torch.Tensor:
    """n x 2 image logits; with one tile per image (counts None) the tile logits themselves."""
    if counts is None or len(counts) == len(tile_logits):
        return tile_logits
    z = pool_log_odds(defect_log_odds(tile_logits.float()), counts.to(tile_logits.device), how, k, tau)
    return torch.stack([torch.zeros_like(z), z], dim=1)
