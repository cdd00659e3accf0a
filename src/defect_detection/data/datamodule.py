"""LightningDataModule over a fixed Split: cached tensors, transforms, loaders."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from defect_detection import DEFECT, GOOD
from defect_detection.data.cache import decode_images
from defect_detection.data.records import ImageRecord
from defect_detection.data.splits import SPLITS, Split


class TensorImageDataset(Dataset):
    """(image, label, index) from a cached uint8 tensor; index maps back to the record."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(self.images[index]), self.labels[index], index


class DefectDataModule(pl.LightningDataModule):
    def __init__(self, split: Split, image_size: int, train_transform: Callable,
                 eval_transform: Callable, batch_size: int = 32, num_workers: int = 0,
                 pin_memory: bool = False, persistent_workers: bool = False) -> None:
        super().__init__()
        self.split = split
        self.image_size = image_size
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.batch_size, self.num_workers = batch_size, num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.datasets: dict[str, TensorImageDataset] = {}

    def records(self, stage: str) -> list[ImageRecord]:
        return self.split[stage]

    def class_counts(self, stage: str = "train") -> tuple[int, int]:
        """(n_good, n_defect) of a split: what `auto` loss weights are computed from."""
        labels = [r.label for r in self.split[stage]]
        return labels.count(GOOD), labels.count(DEFECT)

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for name in SPLITS:
            records = self.split[name]
            images = decode_images(records, self.image_size, f"decoding {name}:")
            labels = torch.tensor([r.label for r in records], dtype=torch.long)
            transform = self.train_transform if name == "train" else self.eval_transform
            self.datasets[name] = TensorImageDataset(images, labels, transform)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(self.datasets[name], batch_size=self.batch_size, shuffle=shuffle,
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
