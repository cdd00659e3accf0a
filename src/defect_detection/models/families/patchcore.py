"""PatchCore (Roth et al., CVPR 2022): good parts only, no training of the backbone.

Frozen ImageNet features at two strides (8 and 16 by default) are averaged over a 3 x 3
neighbourhood (each patch feature sees its surroundings; the zero padding at the map's border
counts in the average, as in anomalib's AvgPool2d(3, 1, 1)), the stride-16 map is upsampled onto
the stride-8 grid and concatenated. Every patch of every good training image goes into a pool;
greedy k-center coreset selection keeps a fraction of it as the memory bank (the points that
cover the pool best, so rare good appearances survive). A test patch's anomaly is its distance to
the nearest bank feature; the image score is the largest patch distance and the map is the patch
distances upsampled to the input.

The network keeps the family contract (two-class logits per network input): with
z = (max distance - loc) / scale, logits = [0, z], where loc/scale are the mean/std of the
held-out good training inputs' (every 5th) max distances to the bank, so
p_defect = sigmoid(z) lives on the same scale as the classifier's and the threshold, calibration
and reports work unchanged. Train defects are not used; val defects only set the threshold.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from defect_detection.base import UserError
from defect_detection.data.datamodule import Batch
from defect_detection.models.features import FeatureExtractor
from defect_detection.models.module import DetectorModule, _as_batch

log = logging.getLogger(__name__)


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distance of each query row to its nearest bank row (batched matmul, chunked so
    the distance matrix stays small: ||q||^2 - 2 q.b + ||b||^2)."""
    return nearest(queries, bank, chunk)[0]


def nearest(queries: torch.Tensor, bank: torch.Tensor,
            chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """(distance, index) of each query row's nearest bank row."""
    bank_sq = (bank * bank).sum(1)

    def one(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d2, idx = ((q * q).sum(1, keepdim=True) - 2.0 * q @ bank.T + bank_sq[None]).min(1)
        return d2.clamp_min(0).sqrt(), idx

    if torch.compiler.is_compiling() or torch.onnx.is_in_onnx_export():
        # an exported graph has a symbolic batch: a Python loop over its size would fix it
        return one(queries)
    parts = [one(queries[start:start + chunk]) for start in range(0, len(queries), chunk)]
    if not parts:
        return queries.new_empty(0), torch.zeros(0, dtype=torch.long, device=queries.device)
    return torch.cat([d for d, _ in parts]), torch.cat([i for _, i in parts])


def reweighted_scores(patch_d: torch.Tensor, patch_idx: torch.Tensor, emb: torch.Tensor,
                      bank: torch.Tensor, neighbours: int) -> torch.Tensor:
    """PatchCore's image score with the paper's re-weighting (Roth et al. 2022, eq. 7): the
    largest patch distance s*, scaled by 1 - softmax over the distances from that patch to its
    nearest bank feature m* and m*'s `neighbours` - 1 nearest bank neighbours, taken at m*. Where
    m* is itself far from the rest of the bank (a rare good appearance), the score rises towards
    s*; where the bank is dense around m*, it falls towards (1 - 1/b) s*.

    patch_d, patch_idx: N x P distances / indices of each patch's nearest bank row;
    emb: N x P x D patch features. Gathers, not Python indexing, keep the batch axis symbolic
    in the ONNX export."""
    s_star, where = patch_d.max(1)
    q = emb.gather(1, where[:, None, None].expand(-1, 1, emb.shape[2]))[:, 0]  # N x D: the top patch
    m_star = bank.index_select(0, patch_idx.gather(1, where[:, None])[:, 0])  # N x D
    k = min(int(neighbours), len(bank))
    support = torch.cdist(m_star, bank).topk(k, dim=1, largest=False).indices  # N x k, m* first
    d = (q[:, None] - bank[support]).norm(dim=2)  # N x k
    return (1.0 - d.softmax(1)[:, 0]) * s_star


def greedy_coreset(features: torch.Tensor, n: int, projection_dim: int = 128,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of n rows chosen by greedy k-center, every row's distance to the chosen set).

    Distances for the selection are taken in a random projection to `projection_dim` dims (as
    in the paper; Johnson-Lindenstrauss keeps them close) when the features are wider."""
    g = torch.Generator().manual_seed(seed)
    x = features
    if x.shape[1] > projection_dim:
        proj = torch.randn(x.shape[1], projection_dim, generator=g) / math.sqrt(projection_dim)
        x = x @ proj
    n = max(1, min(int(n), len(x)))
    chosen = torch.empty(n, dtype=torch.long)
    chosen[0] = int(torch.randint(len(x), (1,), generator=g))
    sq = (x * x).sum(1)
    min_d2 = torch.full((len(x),), float("inf"))
    for i in range(n):
        c = x[chosen[i]]
        d2 = (sq - 2.0 * (x @ c) + (c * c).sum()).clamp_min(0)
        min_d2 = torch.minimum(min_d2, d2)
        if i + 1 < n:
            chosen[i + 1] = int(min_d2.argmax())
    return chosen, min_d2.sqrt()


class PatchCoreNet(nn.Module):
    """Frozen features -> patch embeddings -> nearest-bank distances -> [0, z] logits and maps."""

    def __init__(self, backbone: str, strides: Sequence[int] = (8, 16), pretrained: bool = True,
                 weights_path: str | None = None, neighbourhood: int = 3, bank_size: int = 1,
                 reweight: int = 0, download: bool = True, zero_pad: bool = True) -> None:
        super().__init__()
        self.features = FeatureExtractor(backbone, strides, pretrained, weights_path, download)
        self.neighbourhood = int(neighbourhood)
        # The neighbourhood average counts the zero padding at the border (border patch features
        # shrink towards 0, and so do their distances). Averaging over the inside neighbours only
        # (False, what this family did first) was what made it score below anomalib 2.7 on
        # identical features; test AUROC, split seed 0, 224 px, False -> True (anomalib):
        # grey_tiny_many 0.858 -> 0.986 (1.000), AITEX 0.687 -> 0.737 (0.717), BSData 0.859 -> 0.874
        # (docs/results/patchcore_reference.md).
        # Likely why: the backbone's own padding makes border patches the least stable, and the
        # image score is the largest patch distance. A bank built with False keeps False
        # (build_net reads it from the checkpoint's meta).
        self.zero_pad = bool(zero_pad)
        self.reweight = int(reweight)  # 0: the plain max distance; b > 1: eq. 7 over b bank neighbours
        self.dim = sum(self.features.channels)
        self.register_buffer("bank", torch.zeros(max(1, int(bank_size)), self.dim))
        self.register_buffer("loc", torch.tensor(0.0))
        self.register_buffer("scale", torch.tensor(1.0))
        self.requires_grad_(False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """N x D x h x w patch features on the finest requested stride's grid."""
        maps = self.features(x)
        k = self.neighbourhood
        maps = [F.avg_pool2d(m.float(), k, stride=1, padding=k // 2, count_include_pad=self.zero_pad)
                if k > 1 else m.float() for m in maps]
        size = maps[0].shape[-2:]
        return torch.cat([m if m.shape[-2:] == size else
                          F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps], 1)

    def patch_distances(self, x: torch.Tensor) -> torch.Tensor:
        """N x h x w distance of each patch to its nearest bank feature."""
        emb = self.embed(x)
        n, d, h, w = emb.shape
        flat = emb.permute(0, 2, 3, 1).reshape(-1, d)
        return nearest_distances(flat, self.bank.float()).view(-1, h, w)

    def image_scores(self, x: torch.Tensor) -> torch.Tensor:
        """One raw score per input: the largest patch distance, re-weighted when asked."""
        if not self.reweight:
            return self.patch_distances(x).flatten(1).amax(1)
        emb = self.embed(x)
        n, d, h, w = emb.shape
        flat = emb.permute(0, 2, 3, 1).reshape(n, h * w, d)
        dist, idx = nearest(flat.reshape(-1, d), self.bank.float())
        return reweighted_scores(dist.view(n, -1), idx.view(n, -1), flat, self.bank.float(), self.reweight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = self.image_scores(x)
        z = (score - self.loc) / self.scale
        return torch.stack([torch.zeros_like(z), z], 1)

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """N x H x W patch distances upsampled to the input (PatchCore's own map)."""
        d = self.patch_distances(x)
        return F.interpolate(d[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        bank = state_dict.get(prefix + "bank")
        if bank is not None and bank.shape != self.bank.shape:  # the bank's size is learnt
            self.bank = torch.zeros_like(bank)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class PatchCoreModule(DetectorModule):
    """Collects good-image patch features in one pass over train, builds the bank, then scores."""

    family = "patchcore"

    def __init__(self, net: PatchCoreNet, mean: Sequence[float], std: Sequence[float],
                 coreset_ratio: float = 0.1, max_bank: int = 16384, channels_last: bool = False,
                 meta: dict | None = None, fold_batchnorm: bool = False,
                 aggregate: Mapping | None = None, seed: int = 0) -> None:
        super().__init__(net, None, None, None, (), mean, std, 0.5, channels_last, meta, fold_batchnorm,
                         aggregate)
        self.coreset_ratio, self.max_bank, self.seed = float(coreset_ratio), int(max_bank), int(seed)
        # nothing is trained by gradient: no optimizer, no loss, no backward (Lightning then neither
        # warns that configure_optimizers returned None nor that training_step returned None)
        self.automatic_optimization = False
        self._pool: list[torch.Tensor] = []
        self._pool_images: list[int] = []  # patches per collected network input
        self._ignored_defects = 0
        self.bank_stats: dict[str, float] = {}

    def train(self, mode: bool = True):
        # The backbone is never trained: BatchNorm in train mode would normalise the bank's
        # patches with batch statistics (and drift the running ones) while test patches use the
        # running ones, so bank and test features would not be comparable.
        super().train(mode)
        self.net.eval()
        return self

    def training_step(self, batch, batch_idx):
        b: Batch = _as_batch(batch)
        per_input = b.y if b.counts is None else torch.repeat_interleave(b.y, b.counts)
        good = per_input == 0
        self._ignored_defects += int((b.y != 0).sum())
        if good.any():
            # fp32 even under bf16-mixed: test patches are scored in fp32 against this bank
            with torch.no_grad(), torch.autocast(b.x.device.type, enabled=False):
                x = b.x[good].float()
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                emb = self.net.embed(x)
            n, d, h, w = emb.shape
            self._pool.append(emb.permute(0, 2, 3, 1).reshape(-1, d).cpu())
            self._pool_images += [h * w] * n
        return None

    def on_train_epoch_end(self) -> None:
        self.build_bank()

    def build_bank(self) -> None:
        if not self._pool:
            if not self.bank_stats:
                raise UserError("detector=patchcore found no good images in the train split: it learns "
                                "from good parts only. Add good images to the data (or use "
                                "detector=classifier, which learns from defects too).")
            return
        began = time.perf_counter()
        pool = torch.cat(self._pool)
        self._pool = []
        # Every 5th good input is held out of the bank: its max distance to the bank is what a
        # good part's score looks like on new images (inputs in the bank score ~0 against
        # themselves, and the coreset's covering radius is nearly the same for every input).
        owner = torch.repeat_interleave(torch.arange(len(self._pool_images)), torch.tensor(self._pool_images))
        n_inputs = len(self._pool_images)
        held = torch.arange(n_inputs) % 5 == 4 if n_inputs >= 5 else torch.zeros(n_inputs, dtype=torch.bool)
        in_bank = ~held[owner]
        candidates = pool[in_bank]
        n = min(self.max_bank, max(1, math.ceil(self.coreset_ratio * len(candidates))))
        chosen, _ = greedy_coreset(candidates, n, seed=self.seed)
        bank = candidates[chosen]
        if held.any():
            held_pool = pool[~in_bank]
            d, idx = nearest(held_pool, bank)
            sizes = [self._pool_images[i] for i in held.nonzero().flatten().tolist()]
            if self.net.reweight:  # the held-out goods' scores as forward computes them
                scores = torch.cat([reweighted_scores(dd[None], ii[None], ee[None], bank, self.net.reweight)
                                    for dd, ii, ee in zip(torch.split(d, sizes), torch.split(idx, sizes),
                                                          torch.split(held_pool, sizes))])
            else:
                scores = torch.stack([s.max() for s in torch.split(d, sizes)])
            loc = float(scores.mean())
            spread = float(scores.std()) if len(scores) > 1 else 0.0
            scale = max(spread, 0.05 * loc, 1e-6)
        else:  # too few good inputs to hold any out: raw distances
            loc, scale = 0.0, 1.0
        self.net.bank = bank.to(self.net.bank.device)
        self.net.loc.fill_(loc)
        self.net.scale.fill_(scale)
        seconds = time.perf_counter() - began
        self.bank_stats = {"bank_size": float(len(chosen)), "pool_patches": float(len(candidates)),
                           "held_out_goods": float(held.sum()), "score_loc": loc, "score_scale": scale,
                           "feature_dim": float(pool.shape[1]), "bank_build_s": seconds,
                           "bank_mb": len(chosen) * pool.shape[1] * 4 / 1e6,
                           "train_goods": float(n_inputs)}
        self.meta["bank_size"] = int(len(chosen))
        if self._ignored_defects:
            log.info("detector=patchcore learns from good parts only: %d train defect images ignored "
                     "(val defects set the threshold).", self._ignored_defects)
        log.info("PatchCore memory bank: %d of %d patch features (%d-d, %.1f MB) from %d good inputs "
                 "in %.1f s", len(chosen), len(pool), pool.shape[1], self.bank_stats["bank_mb"],
                 len(self._pool_images), seconds)
        self._pool_images = []
        if self.logger is not None:
            self.logger.log_metrics({f"patchcore/{k}": v for k, v in self.bank_stats.items()})

    def on_validation_epoch_start(self) -> None:
        if self._pool:  # validation inside fit runs before on_train_epoch_end
            self.build_bank()
        super().on_validation_epoch_start()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["defect_meta"]["bank_size"] = int(self.net.bank.shape[0])

    def configure_optimizers(self):
        return []  # the one pass over the good parts builds the bank (training_step collects)
