"""LightningDataModule over a fixed Split: cached tensors, transforms, loaders."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset

from defect_detection import DEFECT, GOOD
from defect_detection.data.cache import cached_images
from defect_detection.data.records import ImageRecord
from defect_detection.data.splits import SPLITS, Split


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


class TensorImageDataset(Dataset):
    """(image, label, index) from cached uint8 images; index maps back to the record.

    `images` is anything with images[row] -> uint8 3 x S x S tensor (a tensor, a memmap store,
    a decode-on-access store); `rows[i]` is the row of item i (default: the identity).
    """

    def __init__(self, images, labels: torch.Tensor, transform: Callable,
                 rows: Sequence[int] | None = None) -> None:
        self.images, self.labels, self.transform = images, labels, transform
        self.rows = list(range(len(labels))) if rows is None else list(rows)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[self.rows[index]]), self.labels[index], index


class DefectDataModule(pl.LightningDataModule):
    def __init__(self, split: Split, image_size: int, train_transform: Callable,
                 eval_transform: Callable, batch_size: int = 32, num_workers: int | None = 0,
                 pin_memory: bool | None = False, persistent_workers: bool = True,
                 cache: str = "memory", cache_dir: str | None = None) -> None:
        super().__init__()
        self.split = split
        self.image_size = image_size
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
        images = cached_images([by_path[p] for p in paths], self.image_size, self.cache, self.cache_dir,
                               "caching")
        for name in SPLITS:
            records = self.split[name]
            labels = torch.tensor([r.label for r in records], dtype=torch.long)
            transform = self.train_transform if name == "train" else self.eval_transform
            self.datasets[name] = TensorImageDataset(images, labels, transform,
                                                     [row[r.path] for r in records])

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
                          persistent_workers=self.persistent_workers, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
