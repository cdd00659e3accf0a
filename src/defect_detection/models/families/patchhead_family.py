"""The patch-head family: a light head on frozen, cached features (models/families/patchhead.py)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
from hydra.utils import instantiate

from defect_detection.base import UserError
from defect_detection.data.images import load_rgb
from defect_detection.data.splits import Split
from defect_detection.models.batchnorm_folding import fold_batchnorm
from defect_detection.models.families.contract import Family
from defect_detection.models.families.patchhead import PatchHeadModule, PatchHeadNet, features_in_bf16
from defect_detection.models.losses import build_loss
from defect_detection.schema import ModelSettings, instantiable


def build_module(s: ModelSettings, class_counts: tuple[int, int], meta: dict) -> PatchHeadModule:
    bb, det = s.backbone, s.detector
    strides = list(det.strides)
    meta.update({"strides": strides, "width": det.width, "neighbourhood": det.neighbourhood,
                 "topk": det.topk, "grid_stride": det.grid_stride})
    net = PatchHeadNet(bb.name, strides, bb.pretrained, bb.weights_path, det.width, det.neighbourhood,
                       det.topk, det.grid_stride, download=bb.download)
    loss = build_loss(s.loss.name, class_counts, s.loss.weights, s.loss.gamma)
    optimizer = instantiate(instantiable(s.optimizer))
    head_lr, steps = float(det.head_lr), int(det.steps)

    def head_optimizer(params):  # the optimizer group's kind and weight decay, the head's own rate
        return optimizer(params=params, lr=head_lr)

    def cosine(optimizer):  # over the head's own steps (scheduler/ is sized for trainer.max_epochs)
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)

    return PatchHeadModule(net, loss, head_optimizer, cosine, bb.mean, bb.std, det.patch_loss_weight,
                           det.cache_gb, det.feature_dtype, channels_last=bb.channels_last, meta=meta,
                           aggregate=meta.get("aggregate"))


def build_net(meta: dict) -> PatchHeadNet:
    return PatchHeadNet(meta["backbone"], meta["strides"], pretrained=False, width=int(meta["width"]),
                        neighbourhood=int(meta["neighbourhood"]), topk=int(meta["topk"]),
                        grid_stride=int(meta.get("grid_stride", 16)))


def check_split(s: ModelSettings, split: Split) -> None:
    """Image labels need defects to learn from; a good-only train split fits PatchCore."""
    if not any(r.label != 0 for r in split.train):
        raise UserError("detector=patchhead learns from labelled defects, but the train split has no defect "
                        "image: use detector=patchcore, which learns from good parts alone, or add defect "
                        "images (or change the split fractions).")


def trainer_of(detector) -> dict:
    """A number of head steps, not epochs: a line of 40 train photos has 2 batches an epoch, one
    of 400 has 13, and the head needs a few hundred steps either way (they cost milliseconds)."""
    steps = int(detector.get("steps", 400))
    # validated every tenth of the steps, not every epoch: a 150-photo line has 134 epochs of 3
    # steps, and each validation and checkpoint write cost more than the steps between them
    return {"max_epochs": -1, "max_steps": steps, "check_val_every_n_epoch": None,
            "val_check_interval": max(1, steps // 10)}


# MLflow logging, validations, checkpoints and the reports, beside what the probe times: 500
# synthetic photos of 1024 px took 157 s (scripts/benchmark.py --native), the probe's parts 105 s
FIXED_S = 50.0


def _timed(fn, repeats: int = 2) -> float:
    fn()  # oneDNN builds its kernels for a new shape on the first call
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats


def estimate_seconds(s: ModelSettings, hw: tuple[int, int], counts: Mapping[str, Mapping[str, int]],
                     sample: Sequence[str], device: torch.device, batch_size: int = 32) -> float:
    """Seconds for a run, from its parts timed at the run's input size: what it costs is one
    backbone pass per image and a few hundred head steps, not a fine-tuned candidate's epochs.
    (Scaling the first candidate's time by pixels, as auto does across fine-tuned families, put
    the native candidate at 10x its cost, so the budget always skipped it.) Every photo is
    decoded once; train and val pass the backbone once to be cached, val and test once more in
    float32 after fitting; each step runs the head on a batch of cached features."""
    det = s.detector
    net = PatchHeadNet(s.backbone.name, list(det.strides), pretrained=False, width=det.width,
                       neighbourhood=det.neighbourhood, topk=det.topk, grid_stride=det.grid_stride,
                       download=False).to(device).eval()
    x = torch.zeros(2, 3, *hw, device=device)
    bf16, folded = features_in_bf16(det.feature_dtype, device), fold_batchnorm(net.features)
    per_fp32 = _timed(lambda: net.levels(x)) / len(x)  # scoring after fitting: the plain network
    per_cached = _timed(lambda: net.cached_levels(x, folded, bf16)) / len(x)
    batch = [m.repeat(max(1, batch_size // len(x)), 1, 1, 1) for m in net.levels(x)]

    def step() -> None:
        net.zero_grad()
        net.pooled(net.patch_logits(batch))[:, 1].sum().backward()

    per_step = _timed(step)
    paths = list(sample)[:3]
    per_decode = _timed(lambda: [load_rgb(p).resize(hw[::-1]) for p in paths], 1) / max(1, len(paths))
    n = {k: sum(v.values()) for k, v in counts.items()}
    return (FIXED_S + sum(n.values()) * per_decode + (n["train"] + n["val"]) * per_cached
            + (n["val"] + n["test"]) * per_fp32 + int(det.steps) * per_step)


# train images as seen (their features are cached); masks read where they exist (patch loss)
FAMILY = Family("patchhead", build_module, build_net, augments=False, needs_masks=True,
                check_split=check_split, trainer_of=trainer_of, estimate_seconds=estimate_seconds)
