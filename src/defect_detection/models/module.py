"""The LightningModules: what every detector family shares, and the fine-tuned classifier.

`DetectorModule` holds the contract every family keeps: `net` maps a normalised batch of tiles
(T x 3 x h x w; one tile per image except with input=tiles) to two-class logits per tile, the
tiles of an image are pooled into image logits (models/aggregation.py), p_defect =
softmax(logits / temperature)[:, 1], and validation/test collect every image's score, label and
logits for the threshold, calibration and reports. A family subclasses it and says how it
learns (`training_step`) and, where it has one, what its own map is (`net.anomaly_map`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import BinaryConfusionMatrix

from defect_detection.data.datamodule import Batch
from defect_detection.evaluation.metrics import decision_metrics, ranking_metrics
from defect_detection.models.aggregation import image_logits
from defect_detection.models.batchnorm_folding import fold_batchnorm


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _as_batch(batch) -> Batch:
    return batch if isinstance(batch, Batch) else Batch(*batch)


class DetectorModule(pl.LightningModule):
    """One detector family's training and scoring; `threshold` and `temperature` are buffers so
    checkpoints carry the decision rule."""

    family: ClassVar[str] = ""

    def __init__(self, net: nn.Module, loss_fn: nn.Module | None, optimizer: Callable | None,
                 scheduler: Callable | None, frozen_bn: Sequence[nn.Module] = (),
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                 threshold: float = 0.5, channels_last: bool = False, meta: dict | None = None,
                 fold_batchnorm: bool = False, aggregate: Mapping | None = None) -> None:
        super().__init__()
        self.net, self.loss_fn = net, loss_fn
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self._frozen_bn = list(frozen_bn)
        self.channels_last = channels_last
        self.fold_batchnorm = fold_batchnorm  # score val/test/predict with BatchNorm folded in
        self.meta = dict(meta or {})  # family, backbone, geometry: what rebuilds the net from a .ckpt
        agg = dict(aggregate or {})
        self.aggregate = {"how": agg.get("how", "max"), "k": int(agg.get("k", 3)),
                          "tau": float(agg.get("tau", 1.0))}
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.register_buffer("threshold", torch.tensor(float(threshold)))
        self.register_buffer("temperature", torch.tensor(1.0))  # logits / T; 1 until calibrated on val
        self.val_decisions, self.val_ranking = decision_metrics("val/"), ranking_metrics("val/")
        self.test_decisions, self.test_ranking = decision_metrics("test/"), ranking_metrics("test/")
        self.test_confusion = BinaryConfusionMatrix()
        self.outputs: dict[str, dict[str, torch.Tensor]] = {}
        self._collect: dict[str, list] = {}
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    # -- model -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def _score(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for evaluation: the BatchNorm-folded copy when one is in use, else the net.

        Always in fp32, also when the Trainer trains in bf16-mixed: the threshold is chosen on
        these scores and the bundle, pyfunc and ONNX export score in fp32, so the run's reports
        and its model decide alike."""
        net = self.__dict__.get("_scoring_net", self.net)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, enabled=False):
            return net(x.float())

    def _start_scoring(self) -> None:
        """Fold BatchNorm into a scoring copy of the current weights (rebuilt every epoch, kept
        out of the module's children so checkpoints, DDP and Grad-CAM only see the real net)."""
        self._stop_scoring()
        if self.fold_batchnorm:  # the copy keeps the net's memory format (channels_last)
            self.__dict__["_scoring_net"] = fold_batchnorm(self.net)

    def _stop_scoring(self) -> None:
        self.__dict__.pop("_scoring_net", None)

    def pool(self, tile_logits: torch.Tensor, counts: torch.Tensor | None) -> torch.Tensor:
        """Image logits from tile logits (identity with one tile per image)."""
        return image_logits(tile_logits, counts, **self.aggregate)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """p_defect of logits, tempered exactly as Predictor does with the bundle's temperature."""
        return (logits.float() / self.temperature).softmax(dim=1)[:, 1]

    def p_defect(self, x: torch.Tensor) -> torch.Tensor:
        return self.probabilities(self(x))

    def eval_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """val/test loss of image logits (the checkpoint monitor by default)."""
        if self.loss_fn is not None:
            return self.loss_fn(logits, y)
        return nn.functional.cross_entropy(logits, y)

    def set_threshold(self, value: float) -> None:
        self.threshold.fill_(float(value))

    def set_temperature(self, value: float) -> None:
        self.temperature.fill_(float(value))

    def train(self, mode: bool = True):
        super().train(mode)
        for bn in self._frozen_bn:  # frozen BatchNorm keeps its ImageNet statistics
            bn.eval()
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning 2.x never calls .train() during fit (it only restores captured per-module modes
        # after validation): without this, frozen BatchNorm would update its statistics in training
        # mode, which also costs ~25% more BatchNorm time per step.
        self.train()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["defect_meta"] = {**self.meta, "mean": self.mean.tolist(), "std": self.std.tolist(),
                                     "threshold": float(self.threshold),
                                     "temperature": float(self.temperature)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # checkpoints written before calibration existed have no temperature buffer
        checkpoint.get("state_dict", {}).setdefault("temperature", torch.tensor(1.0))

    # -- steps -----------------------------------------------------------------------------
    def log_train_loss(self, loss: torch.Tensor, n: int, name: str = "train/loss") -> None:
        self.log(name, loss, on_step=True, on_epoch=True, prog_bar=name == "train/loss", batch_size=n,
                 sync_dist=True)  # DDP: the epoch value is the mean over every rank's batches

    def _eval_logits(self, stage: str, b: Batch) -> torch.Tensor:
        """Image logits of a val/test batch (a family may serve val from a cache of its own)."""
        return self.pool(self._score(b.x).float(), b.counts)

    def _eval_step(self, stage: str, batch, threshold: float) -> None:
        b = _as_batch(batch)
        y, idx = b.y, b.index
        logits = self._eval_logits(stage, b)
        p = self.probabilities(logits)
        pred = (p >= threshold).long()
        decisions = getattr(self, f"{stage}_decisions")
        ranking = getattr(self, f"{stage}_ranking")
        decisions.update(pred, y)
        ranking.update(p, y)
        self.log(f"{stage}/loss", self.eval_loss(logits, y), on_epoch=True, prog_bar=stage == "val",
                 batch_size=len(y), sync_dist=True)
        self.log_dict(decisions, on_epoch=True, batch_size=len(y))
        self.log_dict(ranking, on_epoch=True, prog_bar=stage == "val", batch_size=len(y))
        self._collect.setdefault(stage, []).append((p.detach().cpu(), y.cpu(), idx.cpu(),
                                                    logits.detach().cpu()))
        if stage == "test":
            self.test_confusion.update(pred, y)

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch, 0.5)

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch, float(self.threshold))

    def _gather(self, stage: str) -> None:
        """Per-sample outputs of the whole split on every rank (threshold, calibration and reports
        need all of val/test, not one rank's shard), ordered by index, each index once."""
        parts = self._collect.pop(stage, [])
        if _world_size() > 1:  # DDP: every rank takes part, even one that saw no batch
            shards = [None] * _world_size()
            torch.distributed.all_gather_object(shards, parts)
            parts = [part for shard in shards for part in shard]
        if parts:
            p, y, idx, logits = (torch.cat(t) for t in zip(*parts))
            # a DistributedSampler pads the split to a multiple of the world size by repeating
            # samples: keep the first copy of each index
            order = torch.argsort(idx, stable=True)
            idx = idx[order]
            keep = torch.ones_like(idx, dtype=torch.bool)
            keep[1:] = idx[1:] != idx[:-1]
            order = order[keep]
            self.outputs[stage] = {"p_defect": p[order], "label": y[order], "index": idx[keep],
                                   "logits": logits[order]}

    def on_validation_epoch_start(self) -> None:
        self._collect.pop("val", None)
        self._start_scoring()

    def on_validation_epoch_end(self) -> None:
        self._stop_scoring()
        self._gather("val")

    def on_test_epoch_start(self) -> None:
        self._collect.pop("test", None)
        self.test_confusion.reset()
        self._start_scoring()

    def on_test_epoch_end(self) -> None:
        self._stop_scoring()
        self._gather("test")
        (tn, fp), (fn, tp) = self.test_confusion.compute().tolist()
        # compute() already summed the counts over ranks: every rank holds the same numbers, so
        # the mean that sync_dist takes changes nothing (it only silences Lightning's DDP warning)
        self.log_dict({"test/tn": float(tn), "test/fp": float(fp), "test/fn": float(fn),
                       "test/tp": float(tp), "test/threshold": float(self.threshold)}, sync_dist=True)

    def predict_step(self, batch, batch_idx):
        if isinstance(batch, torch.Tensor):
            return self.probabilities(self._score(batch))
        b = _as_batch(batch)
        return self.probabilities(self.pool(self._score(b.x).float(), b.counts))

    def on_predict_epoch_start(self) -> None:
        self._start_scoring()

    def on_predict_epoch_end(self) -> None:
        self._stop_scoring()

    # -- optimisation ----------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class DefectClassifier(DetectorModule):
    """The fine-tuned classifier (image labels): an ImageNet backbone with a two-class head,
    trained with the image-level loss on the pooled tile logits. Its map is Grad-CAM
    (explain/gradcam.py). With input=tiles and `tile_loss_weight` > 0, tiles that a mask covers
    (and every tile of a good image) also get a tile label and a tile loss."""

    family = "classifier"

    def __init__(self, net: nn.Module, loss_fn: nn.Module, optimizer: Callable, scheduler: Callable | None,
                 frozen_bn: Sequence[nn.Module] = (), mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5), threshold: float = 0.5,
                 channels_last: bool = False, meta: dict | None = None,
                 fold_batchnorm: bool = False, aggregate: Mapping | None = None,
                 tile_loss_weight: float = 0.0, tile_min_pixels: int = 1) -> None:
        super().__init__(net, loss_fn, optimizer, scheduler, frozen_bn, mean, std, threshold, channels_last,
                         meta, fold_batchnorm, aggregate)
        self.tile_loss_weight, self.tile_min_pixels = float(tile_loss_weight), int(tile_min_pixels)

    def training_step(self, batch, batch_idx):
        b = _as_batch(batch)
        tile_logits = self(b.x)
        loss = self.loss_fn(self.pool(tile_logits, b.counts), b.y)
        if self.tile_loss_weight > 0 and b.mask is not None and b.counts is not None:
            tile_loss = self._tile_loss(tile_logits, b)
            if tile_loss is not None:
                self.log_train_loss(tile_loss, len(b.y), "train/tile_loss")
                loss = loss + self.tile_loss_weight * tile_loss
        self.log_train_loss(loss, len(b.y))
        return loss

    def _tile_loss(self, tile_logits: torch.Tensor, b: Batch) -> torch.Tensor | None:
        """Tile labels where they are known: every tile of a good image is good; a tile of a
        masked defect image is a defect when its mask holds >= tile_min_pixels pixels."""
        per_image = torch.repeat_interleave(torch.arange(len(b.y), device=b.y.device), b.counts)
        known = (b.y[per_image] == 0) | b.has_mask[per_image]
        if not known.any():
            return None
        labels = (b.mask.flatten(1).sum(1) >= self.tile_min_pixels).long() * b.y[per_image]
        return self.loss_fn(tile_logits[known], labels[known])
