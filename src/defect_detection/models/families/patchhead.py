"""A light head on frozen, cached backbone features: native resolution at the cost of one
backbone pass per image.

Fine-tuning a backbone at 1024 px costs a forward and a backward pass through it per image and
epoch, which on 2 CPU cores does not fit an auto budget; squashing the photo to 224 px makes it
cheap but loses defects a few pixels across. Here the backbone stays frozen, so its features of
an un-augmented image never change: each train and val image's stride-8/16 features (averaged
over a k x k neighbourhood, as PatchCore does) are computed once, in the first epoch, and kept
in memory as float16. Every later epoch trains only the head: a 1 x 1 projection per level,
summed on one grid, and a 1 x 1 defect logit per patch. No normalisation layer: with a few dozen
images per batch, BatchNorm's batch statistics against its running ones made training unstable
(train AUROC 0.69 on one of two seeds where the plain head reached 1.0 on both).

The pass that fills the cache runs a copy of the extractor with BatchNorm folded into its
convolutions, channels_last, and in bfloat16 where the device computes it natively
(`feature_dtype`): 500 photos of 1024 px went from 780 to 271 CPU-seconds end to end
(docs/results/native_speed.md). Scoring after fitting (val, test, the bundle, ONNX) runs the plain
network in float32, so the threshold and the exported model decide alike.

The head works on a stride-16 grid by default (`grid_stride`): finer levels are max-pooled onto
it, which keeps a few-pixel defect's response and costs a quarter of a stride-8 head's time and
cache.

The image score is the mean of the `topk` highest patch logits (multiple-instance learning: a
defect image has at least one defect patch, a good image none), trained by the run's image loss.
Every patch of a good image is known good, and a masked defect's patches are known too, so a
patch loss (focal) on those teaches the head where defects are; unmasked defect images train
through the image loss alone. The patch logits are the family's own map (`anomaly_map`).

The network keeps the family contract: logits [0, z] per network input, z the pooled patch logit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from defect_detection.base import UserError
from defect_detection.data.datamodule import Batch
from defect_detection.devices import bf16_supported
from defect_detection.models.batchnorm_folding import fold_batchnorm
from defect_detection.models.features import FeatureExtractor
from defect_detection.models.module import DetectorModule, _as_batch

log = logging.getLogger(__name__)

# "auto": bfloat16 where the device computes it natively (CPU: AVX-512 BF16 or AMX; CUDA: Ampere+)
FEATURE_DTYPES = ("auto", "bfloat16", "float32")


def features_in_bf16(feature_dtype: str, device: torch.device) -> bool:
    """Whether the cache is filled in bfloat16 (`detector.feature_dtype`) on this device."""
    return feature_dtype == "bfloat16" or (feature_dtype == "auto" and bf16_supported(device))


class PatchHeadNet(nn.Module):
    """Frozen features -> neighbourhood-averaged levels -> per-patch logits -> [0, z] logits."""

    def __init__(self, backbone: str, strides: Sequence[int] = (8, 16), pretrained: bool = True,
                 weights_path: str | None = None, width: int = 64, neighbourhood: int = 3, topk: int = 3,
                 grid_stride: int = 16, download: bool = True) -> None:
        super().__init__()
        self.features = FeatureExtractor(backbone, strides, pretrained, weights_path, download)
        if grid_stride not in self.features.strides:
            raise UserError(f"detector.grid_stride={grid_stride}: the patch grid must be one of the feature "
                            f"strides detector.strides={self.features.strides}.")
        self.grid_stride = int(grid_stride)
        self.features.requires_grad_(False)
        # channels_last: oneDNN's CPU convolutions ran Lite0 at 707 x 707 in half the time (249 vs
        # 487 ms per image on 2 cores); on a GPU it is the tensor-core layout
        self.features.to(memory_format=torch.channels_last)
        self.neighbourhood, self.topk = int(neighbourhood), int(topk)
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in self.features.channels)
        self.out = nn.Conv2d(width, 1, 1)
        nn.init.constant_(self.out.bias, -4.0)  # defect patches are rare: start near p = 0.02

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # frozen: ImageNet BatchNorm statistics, features that can be cached
        return self

    def levels(self, x: torch.Tensor, features: nn.Module | None = None) -> list[torch.Tensor]:
        """The frozen feature maps, each averaged over its k x k neighbourhood and max-pooled onto
        the `grid_stride` grid where finer (what is cached). `features`: an equivalent extractor
        to run instead (BatchNorm folded, for the cache)."""
        k = self.neighbourhood
        with torch.no_grad():
            maps = (features or self.features)(x.contiguous(memory_format=torch.channels_last))
        out = []
        for stride, m in zip(self.features.strides, maps):
            m = m.float().contiguous()
            if k > 1:
                m = F.avg_pool2d(m, k, stride=1, padding=k // 2, count_include_pad=False)
            if stride < self.grid_stride:  # max keeps a tiny defect's response that a mean would dilute
                r = self.grid_stride // stride
                m = F.max_pool2d(m, r, stride=r, ceil_mode=True)
            out.append(m)
        return out

    def cached_levels(self, x: torch.Tensor, folded: nn.Module | None, bf16: bool) -> list[torch.Tensor]:
        """`levels` as the cache is filled: through `folded` (the extractor with BatchNorm folded
        in), in bfloat16 where `bf16`."""
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self.levels(x.float(), folded)

    def patch_logits(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """N x 1 x h x w defect logit per patch of the grid."""
        size = levels[self.features.strides.index(self.grid_stride)].shape[-2:]
        fused = None
        for lat, m in zip(self.lateral, levels):
            y = lat(m.float())
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            fused = y if fused is None else fused + y
        return self.out(F.relu(fused))

    def pooled(self, patch: torch.Tensor) -> torch.Tensor:
        """[0, z] per input, z the mean of its `topk` highest patch logits."""
        flat = patch.flatten(1)
        z = flat.topk(min(self.topk, flat.shape[1]), dim=1).values.mean(1)
        return torch.stack([torch.zeros_like(z), z], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooled(self.patch_logits(self.levels(x)))

    def anomaly_map(self, x: torch.Tensor) -> torch.Tensor:
        """N x H x W defect probability per pixel (the patch logits upsampled to the input)."""
        patch = self.patch_logits(self.levels(x)).float()
        up = F.interpolate(patch, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return up[:, 0].sigmoid()


@dataclass
class Cached:
    """One image as the head sees it: its inputs' feature levels (float16) and, for train, the
    patch-grid truth of its mask (None without one)."""

    levels: list[torch.Tensor]
    target: torch.Tensor | None = None


class FeatureCache:
    """Per image (split, index): what the head needs of it, on the CPU.

    Sized up front: after the first batch the bytes per image times the images to keep is
    compared with `max_gb`; over it, nothing is kept and every epoch pays the backbone (logged)."""

    def __init__(self, max_gb: float, n_images: int) -> None:
        self.max_bytes, self.n_images = float(max_gb) * 2**30, int(n_images)
        self.store: dict[tuple[str, int], Cached] = {}
        self.enabled: bool | None = None  # decided on the first batch

    def get(self, split: str, index: torch.Tensor) -> list[Cached] | None:
        keys = [(split, int(i)) for i in index]
        if not self.enabled or any(k not in self.store for k in keys):
            return None
        return [self.store[k] for k in keys]

    def complete(self, split: str, n: int) -> bool:
        return bool(self.enabled) and all((split, i) in self.store for i in range(n))

    def put(self, split: str, index: torch.Tensor, levels: Sequence[torch.Tensor],
            counts: torch.Tensor | None, target: torch.Tensor | None = None) -> None:
        sizes = counts.tolist() if counts is not None else [1] * len(index)
        per_image = [list(t) for t in zip(*(m.to(torch.float16).cpu().split(sizes) for m in levels))]
        targets = (target.to(torch.uint8).cpu().split(sizes) if target is not None
                   else [None] * len(per_image))
        if self.enabled is None:
            need = sum(t.numel() * 2 for t in per_image[0]) * self.n_images
            self.enabled = need <= self.max_bytes
            log.info("patchhead: feature cache %s (%.2f GB for %d images, limit %.1f GB)",
                     "on" if self.enabled else "OFF: every epoch runs the backbone", need / 2**30,
                     self.n_images, self.max_bytes / 2**30)
        if self.enabled:
            for i, parts, t in zip(index.tolist(), per_image, targets):
                self.store[(split, int(i))] = Cached([p.clone() for p in parts],
                                                     None if t is None else t.clone())


def _join(cached: Sequence[Cached], device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The batch's levels (float32) and its tiles per image."""
    levels = [torch.cat([c.levels[k] for c in cached]).to(device).float()
              for k in range(len(cached[0].levels))]
    return levels, torch.tensor([len(c.levels[0]) for c in cached], device=device)


class PatchHeadModule(DetectorModule):
    """Trains the head on cached features: image loss on the pooled logits, focal patch loss
    where a patch's truth is known (good images everywhere, masked defects on their mask).

    Once every train and val image is cached, the loaders stop decoding and normalising images
    (`TensorImageDataset.labels_only`): an epoch then costs the head alone."""

    family = "patchhead"

    def __init__(self, net: PatchHeadNet, loss_fn: nn.Module, optimizer: Callable,
                 scheduler: Callable | None, mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), patch_loss_weight: float = 1.0,
                 cache_gb: float = 6.0, feature_dtype: str = "auto", channels_last: bool = False,
                 meta: dict | None = None, aggregate: Mapping | None = None) -> None:
        super().__init__(net, loss_fn, optimizer, scheduler, (), mean, std, 0.5, channels_last, meta, False,
                         aggregate)
        self.patch_loss_weight = float(patch_loss_weight)
        self.cache_gb = float(cache_gb)
        if feature_dtype not in FEATURE_DTYPES:
            raise UserError(f"detector.feature_dtype={feature_dtype}: use one of "
                            f"{', '.join(FEATURE_DTYPES)}.")
        self.feature_dtype = feature_dtype
        self.bf16_features = False  # decided on the fit's device (on_fit_start)
        self.cache: FeatureCache | None = None
        self.backbone_seconds = 0.0  # what the cache saves: backbone time spent while fitting

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_callbacks(self):
        """The run's early stopping counts epochs sized for fine-tuning (patience 5); the head's
        epochs can be two steps each. It trains all its steps; the checkpoint callback keeps the
        best val epoch."""
        from pytorch_lightning.callbacks import EarlyStopping

        stopping = [c for c in (self.trainer.callbacks if self._trainer is not None else [])
                    if isinstance(c, EarlyStopping)]
        # strict=False: a run of fewer steps than one epoch ends before any validation
        return [EarlyStopping(monitor=c.monitor, mode=c.mode, patience=10**9, strict=False)
                for c in stopping[:1]]

    def on_fit_start(self) -> None:
        split = self.trainer.datamodule.split
        self.cache = FeatureCache(self.cache_gb, len(split.train) + len(split.val))
        self.backbone_seconds = 0.0
        self.bf16_features = features_in_bf16(self.feature_dtype, self.device)
        # the frozen extractor with BatchNorm folded into its convolutions: the same features for
        # the cache, without the normalisation passes (a third of Lite0's CPU time here)
        self.__dict__["_cache_features"] = fold_batchnorm(self.net.features)
        log.info("patchhead: train and val features computed in %s",
                 "bfloat16" if self.bf16_features else "float32")

    def on_train_epoch_end(self) -> None:
        self.log("train/backbone_seconds", self.backbone_seconds)
        sets = self._datasets()
        done = all(self.cache.complete(name, len(sets[name])) for name in ("train", "val") if name in sets)
        self._images_needed(not done)

    def on_train_end(self) -> None:
        self._images_needed(True)  # validate, test and the reports after fitting read the images
        self.cache = None  # frees the features
        self.__dict__.pop("_cache_features", None)

    def _datasets(self) -> dict:
        return getattr(self.trainer.datamodule, "datasets", {}) if self.trainer is not None else {}

    def _images_needed(self, needed: bool) -> None:
        for name in ("train", "val"):
            if name in self._datasets():
                self._datasets()[name].labels_only = not needed

    def _levels(self, stage: str, b: Batch) -> tuple[list[torch.Tensor], torch.Tensor | None,
                                                     torch.Tensor | None]:
        """(levels, tiles per image, the masks' patch-grid truth for train batches where every
        image's is known, else None), from the cache where the batch is in it."""
        cached = self.cache.get(stage, b.index) if self.cache is not None else None
        if cached is not None:
            levels, counts = _join(cached, b.y.device)
            targets = [c.target for c in cached]
            target = (torch.cat(targets).to(b.y.device).float() if all(t is not None for t in targets)
                      else None)
            return levels, counts, target  # one tile per image: pooling is the identity
        x = b.x.contiguous(memory_format=torch.channels_last) if self.channels_last else b.x
        began = time.perf_counter()
        levels = self.net.cached_levels(x, self.__dict__.get("_cache_features"), self.bf16_features)
        self.backbone_seconds += time.perf_counter() - began
        target = (F.adaptive_max_pool2d(b.mask.float(), self._grid(levels)) if stage == "train"
                  and b.mask is not None else None)
        if self.cache is not None:
            self.cache.put(stage, b.index, levels, b.counts, target)
        return levels, b.counts, target

    def _grid(self, levels: Sequence[torch.Tensor]) -> tuple[int, int]:
        return tuple(levels[self.net.features.strides.index(self.net.grid_stride)].shape[-2:])

    def training_step(self, batch, batch_idx):
        b: Batch = _as_batch(batch)
        levels, counts, target = self._levels("train", b)
        patch = self.net.patch_logits(levels)
        loss = self.loss_fn(self.pool(self.net.pooled(patch), counts), b.y)
        known = self.patch_loss(patch, b, counts, target)
        if known is not None:
            self.log_train_loss(known, len(b.y), "train/patch_loss")
            loss = loss + self.patch_loss_weight * known
        self.log_train_loss(loss, len(b.y))
        return loss

    def patch_loss(self, patch: torch.Tensor, b: Batch, counts: torch.Tensor | None,
                   target: torch.Tensor | None) -> torch.Tensor | None:
        """Focal loss on the patches whose truth is known; a patch is a defect when any of its
        pixels is (`target`: the masks max-pooled onto the patch grid; None: no masks loaded)."""
        known = b.y == 0
        if b.has_mask is not None:
            known = known | b.has_mask.bool()
        if counts is not None:
            known = torch.repeat_interleave(known, counts)
        if not known.any() or self.patch_loss_weight <= 0:
            return None
        target = target if target is not None else torch.zeros_like(patch)
        return sigmoid_focal_loss(patch[known].float(), target[known], reduction="mean")

    def _eval_logits(self, stage: str, b: Batch) -> torch.Tensor:
        if stage != "val" or self.cache is None:  # test and predict: one pass, nothing kept
            return super()._eval_logits(stage, b)
        with torch.autocast(b.y.device.type, enabled=False):
            levels, counts, _ = self._levels("val", b)
            return self.pool(self.net.pooled(self.net.patch_logits(levels)).float(), counts)
