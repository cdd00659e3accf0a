"""A mask-supervised segmenter with an image head (mixed supervision, after Bozic et al. 2021 and
Rolih et al.'s SuperSimpleNet): every label a line has is used.

A small feature pyramid (1x1 lateral convolutions, top-down sum) on the backbone's stride
8/16/32 features feeds a 3x3 conv head that predicts a defect logit per stride-8 cell. The image
head sees the pooled deepest features and the max and mean of the segmentation output, so a
defect the segmentation found raises the image score, while images without a mask still train
the image head through the image loss. The pixel loss (focal + dice) is taken only where the
truth is known: every pixel of a good image is good, and defect images count when they have a
mask (`mask_fraction` keeps a seeded share of those, to measure how few masks are enough).

The network keeps the family contract: logits = [0, z] per network input; its own map is the
segmentation probability upsampled to the input (`anomaly_map`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from defect_detection.data.datamodule import Batch
from defect_detection.models.features import FeatureExtractor, modules_through_stride
from defect_detection.models.module import DetectorModule, _as_batch


class SegmenterNet(nn.Module):
    """Backbone pyramid -> stride-8 segmentation logits and an image logit."""

    def __init__(self, backbone: str, strides: Sequence[int] = (8, 16, 32), pretrained: bool = True,
                 weights_path: str | None = None, width: int = 64, download: bool = True) -> None:
        super().__init__()
        self.features = FeatureExtractor(backbone, strides, pretrained, weights_path, download)
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in self.features.channels)
        self.head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True), nn.Conv2d(width, 1, 1))
        self.image_head = nn.Linear(width + 2, 1)
        nn.init.constant_(self.head[-1].bias, -4.0)  # defects are rare pixels: start near p = 0.02

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N x 2 logits [0, z], N x 1 x h x w segmentation logits on the finest stride)."""
        maps = [lat(m) for lat, m in zip(self.lateral, self.features(x))]
        fused = maps[-1]
        for m in reversed(maps[:-1]):  # top-down: deeper context added onto finer maps
            fused = m + F.interpolate(fused, size=m.shape[-2:], mode="bilinear", align_corners=False)
        seg = self.head(fused)
        flat = seg.flatten(1)
        pooled = torch.cat([maps[-1].mean((2, 3)), flat.amax(1, keepdim=True), flat.mean(1, keepdim=True)], 1)
        z = self.image_head(pooled)[:, 0]
        return torch.stack([torch.zeros_like(z), z], 1), seg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.outputs(x)[0]

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """N x H x W defect probability per pixel (the segmentation upsampled to the input)."""
        seg = self.outputs(x)[1].float()
        up = F.interpolate(seg, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return up[:, 0].sigmoid()

    def frozen_modules(self, stride: int) -> list[nn.Module]:
        """The backbone modules up to `stride` (0: none), which keep their ImageNet weights."""
        return modules_through_stride(self.features.body, stride) if stride > 0 else []


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the whole batch (one overlap for all known cells: stable when most
    images are good and have no defect pixel at all)."""
    p = logits.sigmoid()
    return 1.0 - (2.0 * (p * target).sum() + eps) / (p.sum() + target.sum() + eps)


class SegmenterModule(DetectorModule):
    """Image loss on every image, pixel loss (focal + dice) where the mask is known."""

    family = "segmenter"

    def __init__(self, net: SegmenterNet, loss_fn: nn.Module, optimizer: Callable,
                 scheduler: Callable | None, frozen_bn: Sequence[nn.Module] = (),
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 pixel_loss_weight: float = 1.0, mask_fraction: float = 1.0, seed: int = 0,
                 channels_last: bool = False, meta: dict | None = None, fold_batchnorm: bool = False,
                 aggregate: Mapping | None = None) -> None:
        super().__init__(net, loss_fn, optimizer, scheduler, frozen_bn, mean, std, 0.5, channels_last, meta,
                         fold_batchnorm, aggregate)
        self.pixel_loss_weight, self.mask_fraction = float(pixel_loss_weight), float(mask_fraction)
        self.seed = int(seed)
        self.mask_used: torch.Tensor | None = None  # per train record: its mask trains the pixel loss

    def on_fit_start(self) -> None:
        records = self.trainer.datamodule.split.train
        self.mask_used = choose_masks([bool(r.mask_path) and r.label != 0 for r in records],
                                      self.mask_fraction, self.seed)

    def training_step(self, batch, batch_idx):
        b: Batch = _as_batch(batch)
        x = b.x.contiguous(memory_format=torch.channels_last) if self.channels_last else b.x
        tile_logits, seg = self.net.outputs(x)
        loss = self.loss_fn(self.pool(tile_logits, b.counts), b.y)
        pixel = self.pixel_loss(seg, b)
        if pixel is not None:
            self.log_train_loss(pixel, len(b.y), "train/pixel_loss")
            loss = loss + self.pixel_loss_weight * pixel
        self.log_train_loss(loss, len(b.y))
        return loss

    def pixel_loss(self, seg: torch.Tensor, b: Batch) -> torch.Tensor | None:
        """Focal + dice on the inputs whose truth is known: good images (all background) and
        defect images with a used mask. A cell is a defect when any of its pixels is."""
        known = b.y == 0
        if b.has_mask is not None and self.mask_used is not None:
            used = self.mask_used.to(b.index.device)[b.index] & b.has_mask.bool()
            known = known | used
        if b.counts is not None:
            known = torch.repeat_interleave(known, b.counts)
        if not known.any():
            return None
        if b.mask is not None:
            target = F.adaptive_max_pool2d(b.mask.float(), seg.shape[-2:])
        else:  # masks not loaded: only good images are known
            target = torch.zeros_like(seg)
        s, t = seg[known].float(), target[known]
        return sigmoid_focal_loss(s, t, reduction="mean") + dice_loss(s, t)


def choose_masks(has_mask: Sequence[bool], fraction: float, seed: int) -> torch.Tensor:
    """A seeded `fraction` of the masked defect images (at least one when any exists)."""
    flags = torch.tensor(list(has_mask), dtype=torch.bool)
    idx = flags.nonzero().flatten()
    if len(idx) == 0 or fraction >= 1.0:
        return flags
    keep = max(1, round(fraction * len(idx)))
    g = torch.Generator().manual_seed(int(seed))
    chosen = idx[torch.randperm(len(idx), generator=g)[:keep]]
    out = torch.zeros_like(flags)
    out[chosen] = True
    return out
