"""LightningDataModule over a fixed Split: cached tensors, transforms, tiles, loaders."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from defect_detection.base import DEFECT, GOOD
from defect_detection.data.cache import as_geometry, cached_images
from defect_detection.data.geometry import Geometry
from defect_detection.data.records import ImageRecord
from defect_detection.data.splits import SPLITS, Split

log = logging.getLogger(__name__)


def auto_num_workers() -> int:
    """DataLoader workers when data.num_workers is left to the machine.

    CPU: 0. With cached tensors the train augmentation costs ~3 ms CPU per 224-px image against
    ~40 ms for the Lite0 step (measured on 2 cores), so a worker can win at most ~10% there,
    while it competes with the model's intra-op threads for the same cores; it also costs a
    process and a copy of the loader state. scripts/benchmark.py reports
    train_images_per_s_by_num_workers: set data.num_workers where it shows a gain.
    GPU: the model waits on CPU augmentation, so up to 8 workers, one core left to the main process.
    """
    if not torch.cuda.is_available():
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


class Batch(NamedTuple):
    """A batch of images as the detector sees it.

    x: the network input, T x 3 x h x w (T = number of images, or of tiles with input=tiles);
    y, index: per image (index points into the split's records); counts: tiles per image, None
    when every image is one tile; mask / has_mask: per tile 1 x h x w ground truth and per image
    whether a mask exists, None when the run does not load masks.
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor
    counts: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    has_mask: torch.Tensor | None = None


class TensorImageDataset(Dataset):
    """(image, label, index[, mask, has_mask]) from cached uint8 images; index maps back to the record.

    `images` is anything with images[row] -> uint8 3 x H x W tensor (a tensor, a memmap store,
    a ragged store, a decode-on-access store); `rows[i]` is the row of item i (default: the
    identity). With `masks` (same rows, 1 x H x W uint8) the transform moves image and mask
    together (flips, crops), so the mask stays on its defect.
    """

    def __init__(self, images, labels: torch.Tensor, transform: Callable,
                 rows: Sequence[int] | None = None, masks=None,
                 has_mask: torch.Tensor | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform
        self.rows = list(range(len(labels))) if rows is None else list(rows)
        self.masks, self.has_mask = masks, has_mask
        # set by a family that holds what it needs of every image (the patch head's feature
        # cache): items then carry labels and indices only, and no pixel is read or normalised
        self.labels_only = False

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if self.labels_only:
            empty = torch.zeros(0)
            return ((empty, self.labels[index], index) if self.masks is None
                    else (empty, self.labels[index], index, empty, self.has_mask[index]))
        row = self.rows[index]
        if self.masks is None:
            return self.transform(self.images[row]), self.labels[index], index
        image, mask = self.transform(tv_tensors.Image(self.images[row]), tv_tensors.Mask(self.masks[row]))
        return (image.as_subclass(torch.Tensor), self.labels[index], index, mask.as_subclass(torch.Tensor),
                self.has_mask[index])


class TileCollate:
    """Stacks a list of dataset items into a Batch, cutting each image into tiles for input=tiles.

    Tiles of every image of the batch are cut by two tensor gathers per image (Geometry.cut) and
    scored in one forward pass: no Python loop over tiles.
    """

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry

    def __call__(self, items: Sequence) -> Batch:
        images = [it[0] for it in items]
        y = torch.stack([torch.as_tensor(it[1]) for it in items])
        index = torch.tensor([int(it[2]) for it in items], dtype=torch.long)
        masks = [it[3] for it in items] if len(items[0]) > 3 else None
        has_mask = torch.stack([torch.as_tensor(it[4]) for it in items]) if masks is not None else None
        if images[0].numel() == 0:  # labels only (TensorImageDataset.labels_only): no pixels to batch
            return Batch(torch.zeros(len(items), 0), y, index, None, None, has_mask)
        if self.geometry.name != "tiles":
            return Batch(torch.stack(images), y, index, None,
                         torch.stack(masks) if masks is not None else None, has_mask)
        tiles = [self.geometry.cut(im) for im in images]
        counts = torch.tensor([len(t) for t in tiles], dtype=torch.long)
        mask_tiles = torch.cat([self.geometry.cut(m) for m in masks]) if masks is not None else None
        return Batch(torch.cat(tiles), y, index, counts, mask_tiles, has_mask)


class DefectDataModule(pl.LightningDataModule):
    """Loaders of a fixed split: images prepared once by the input geometry (cache), augmented
    as tensors, batched as images or tiles. `load_masks`: also cache the ground-truth masks,
    prepared like their images (the segmenter's pixel loss, tile labels)."""

    def __init__(self, split: Split, image_size, train_transform: Callable,
                 eval_transform: Callable, batch_size: int = 32, num_workers: int | None = 0,
                 pin_memory: bool | None = False, persistent_workers: bool = True,
                 cache: str = "memory", cache_dir: str | None = None,
                 geometry: Geometry | None = None, load_masks: bool = False,
                 sizes: dict[str, tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.split = split
        self.geometry = geometry if geometry is not None else as_geometry(image_size)
        self.image_size = image_size
        self.load_masks = load_masks
        self.sizes = sizes  # original (h, w) per path when known (read for tiles before training)
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.batch_size = batch_size
        self.num_workers = auto_num_workers() if num_workers is None else int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.persistent_workers = bool(persistent_workers) and self.num_workers > 0
        self.cache, self.cache_dir = cache, cache_dir
        self.datasets: dict[str, TensorImageDataset] = {}
        self.bad_images: list = []  # files dropped by data.on_bad_image=skip (data/validate.py)

    def records(self, stage: str) -> list[ImageRecord]:
        return self.split[stage]

    def class_counts(self, stage: str = "train") -> tuple[int, int]:
        """(n_good, n_defect) of a split: what `auto` loss weights are computed from."""
        labels = [r.label for r in self.split[stage]]
        return labels.count(GOOD), labels.count(DEFECT)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        # One store for every split, keyed by path: another split seed reuses the disk cache.
        paths = sorted({r.path for name in SPLITS for r in self.split[name]})
        row = {path: i for i, path in enumerate(paths)}
        by_path = {r.path: r for name in SPLITS for r in self.split[name]}
        unique = [by_path[p] for p in paths]
        sizes = [self.sizes[p] for p in paths] if self.sizes else None
        images = cached_images(unique, self.geometry, self.cache, self.cache_dir, "caching", sizes=sizes)
        masks = None
        if self.load_masks:
            masks = cached_images(unique, self.geometry, self.cache, self.cache_dir, "caching", kind="mask",
                                  sizes=sizes)
        for name in SPLITS:
            records = self.split[name]
            labels = torch.tensor([r.label for r in records], dtype=torch.long)
            transform = self.train_transform if name == "train" else self.eval_transform
            has_mask = torch.tensor([bool(r.mask_path) for r in records]) if masks is not None else None
            self.datasets[name] = TensorImageDataset(images, labels, transform,
                                                     [row[r.path] for r in records], masks, has_mask)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        sampler = None
        trainer = self.trainer
        if name != "train" and trainer is not None and trainer.world_size > 1:
            # DDP evaluation: each sample on exactly one rank. Lightning's default DistributedSampler
            # pads with repeats, which torchmetrics would count twice (val/test metrics off by a sample).
            sampler = UnrepeatedDistributedSampler(self.datasets[name], num_replicas=trainer.world_size,
                                                   rank=trainer.global_rank, shuffle=False)
        return DataLoader(self.datasets[name], batch_size=self.batch_size,
                          shuffle=shuffle if sampler is None else None, sampler=sampler,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.persistent_workers, drop_last=False,
                          collate_fn=TileCollate(self.geometry))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
