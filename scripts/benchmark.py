#!/usr/bin/env python
"""Throughput of the framework against the seed's plain loop, in one process on the same data.

    python scripts/benchmark.py                 # real MVTec bottle (../shared/data/mvtec), < 10 min
    python scripts/benchmark.py --quick         # smoke check: 40 images at 96 px, one epoch
    python scripts/benchmark.py --data-root /data/mvtec --categories bottle cable --epochs 5 --mlflow
    python scripts/benchmark.py --native        # the native-resolution candidate: 500 photos of 1024 px

Same model (backbone config, freezing, weighted CE, Adam), batch size and augmentation
parameters everywhere; the paths differ only in what the framework changes:

  a  seed loop: PIL decode of the full-size file + torchvision transforms every epoch,
     num_workers=0, contiguous tensors, a plain train loop and a torch.no_grad eval loop
  b  framework training: Hydra-composed config, DefectDataModule over the decoded-image cache,
     Lightning Trainer.fit (per-epoch time; validation off), without and with MLflow logging
  c  framework evaluation: Trainer.test over the cache (metrics, channels_last, inference_mode,
     BatchNorm folded into the convolutions: backbone.fold_batchnorm)
  d  ONNX Runtime on the same preprocessed tensors (defect-export's graph, parity-checked)
  bare  a plain PyTorch loop over the same cached loader and model: b/bare is the cost of
     Lightning + Hydra + MLflow

`--native` instead times the auto recipe's native-resolution candidate end to end, as auto runs
it (`experiment=auto auto.only=[patchhead-native]`), on `--native-images` synthetic photos of
`--native-size` px: the whole candidate (decode, features once, head epochs, val, test, reports),
the backbone's share, and the target of at most 5 minutes per candidate on 2 cores.

The paths run round-robin: each round gives every training path one epoch and every eval
path one pass, so a change in machine load hits all of them alike; images/s is the median over
rounds (per-round values are kept), and CPU ms per image (this process, all threads) is given
beside it as the figure that other processes' load barely moves. The cache build is timed on
its own (it is paid once per run, or once per dataset version with data.cache=disk). Prints the
JSON last and saves it under outputs/benchmark/ (or --out).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from defect_detection import UserError, project_root
from defect_detection.config import CONFIG_DIR
from defect_detection.data.cache import cached_images
from defect_detection.data.splits import Split
from defect_detection.models.batchnorm_folding import fold_batchnorm
from defect_detection.models.exporting import export_onnx
from defect_detection.models.inference import Predictor, save_bundle
from defect_detection.models.onnx_predictor import OnnxPredictor
from defect_detection.pipeline.builders import build_datamodule, build_module
from defect_detection.pipeline.fit import build_logger
from defect_detection.tracking.mlflow_run import RunTracker, flatten

log = logging.getLogger("benchmark")
DEFAULT_ROOT = project_root().parent / "shared" / "data" / "mvtec"


# -- measurement helpers --------------------------------------------------------------------
def uptime() -> dict:
    one, five, fifteen = os.getloadavg()
    text = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"load_1m": one, "load_5m": five, "load_15m": fifteen, "uptime": text}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Meter:
    """Wall and CPU seconds per pass of each path; medians over the interleaved rounds.

    Paths run round-robin (one epoch / one eval pass each per round), so a change in machine
    load hits every path alike. CPU seconds per image (all threads of this process) barely
    depend on other processes' load: the figure to compare when the machine was busy.
    """

    def __init__(self) -> None:
        self.images: dict[str, int] = {}
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def add(self, name: str, n_images: int, wall: float, cpu: float) -> None:
        self.images[name] = n_images
        self.wall.setdefault(name, []).append(wall)
        self.cpu.setdefault(name, []).append(cpu)

    def timed(self, name: str, n_images: int, fn):
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        self.add(name, n_images, time.perf_counter() - wall, time.process_time() - cpu)
        return out

    def images_per_s(self) -> dict[str, float]:
        return {k: round(self.images[k] / statistics.median(v), 2) for k, v in self.wall.items()}

    def cpu_ms_per_image(self) -> dict[str, float]:
        return {k: round(1000 * statistics.median(v) / self.images[k], 1) for k, v in self.cpu.items()}

    def rounds(self) -> dict[str, list[float]]:
        return {k: [round(self.images[k] / w, 2) for w in v] for k, v in self.wall.items()}


class EpochTimer(pl.Callback):
    """Wall and CPU seconds of each training epoch (data + steps + Lightning's per-step work)."""

    def __init__(self) -> None:
        self.epochs: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))


# -- the seed's plain loop --------------------------------------------------------------------
class SeedDataset(Dataset):
    """As the seed wrote it: open the full-size file every time, transform the PIL image."""

    def __init__(self, records, transform) -> None:
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        image = Image.open(self.records[i].path).convert("RGB")
        return self.transform(image), self.records[i].label


def seed_transforms(cfg: DictConfig) -> tuple[T.Compose, T.Compose]:
    """torchvision (v1) PIL transforms with the augmentation config's parameters."""
    aug, size, bb = cfg.augmentation, cfg.data.image_size, cfg.backbone
    train = [T.RandomResizedCrop(size, scale=tuple(aug.crop_scale)) if aug.get("crop_scale")
             else T.Resize((size, size))]
    if aug.get("hflip"):
        train.append(T.RandomHorizontalFlip(aug.hflip))
    if aug.get("vflip"):
        train.append(T.RandomVerticalFlip(aug.vflip))
    if aug.get("rotation"):
        train.append(T.RandomRotation(aug.rotation))
    if aug.get("color_jitter"):
        train.append(T.ColorJitter(aug.color_jitter, aug.color_jitter, aug.color_jitter))
    tail = [T.ToTensor(), T.Normalize(list(bb.mean), list(bb.std))]
    return T.Compose(train + tail), T.Compose([T.Resize((size, size)), *tail])


class PlainTrainer:
    """The seed's loop: zero_grad, forward, loss, backward, step; one epoch per call."""

    def __init__(self, module, loader: DataLoader, device: torch.device, channels_last: bool,
                 keep_frozen_bn_eval: bool) -> None:
        self.module, self.loader, self.device = module.to(device), loader, device
        self.channels_last, self.keep_frozen_bn_eval = channels_last, keep_frozen_bn_eval
        self.module.net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        opt = module.configure_optimizers()
        self.optimizer = opt["optimizer"] if isinstance(opt, dict) else opt

    def epoch(self) -> None:
        net, loss_fn = self.module.net, self.module.loss_fn
        self.module.train() if self.keep_frozen_bn_eval else net.train()  # the seed: every BN trains
        for x, y, *_ in self.loader:
            x, y = x.to(self.device), y.to(self.device)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.optimizer.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            self.optimizer.step()


class FrameworkTrainer:
    """One Lightning epoch per call: a fresh Trainer from the composed config, fit on the module."""

    def __init__(self, cfg: DictConfig, module, dm, logger=None, precision: str | None = None) -> None:
        self.cfg, self.module, self.dm, self.logger, self.precision = cfg, module, dm, logger, precision
        self.fit_wall: list[float] = []

    def epoch(self) -> tuple[float, float]:
        timer = EpochTimer()
        trainer = _trainer(self.cfg, 1, self.logger, [timer], self.precision)
        start = time.perf_counter()
        trainer.fit(self.module, datamodule=self.dm)
        self.fit_wall.append(time.perf_counter() - start)
        return timer.epochs[0]


def plain_eval(net, loader, device: torch.device, channels_last: bool, bf16: bool = False,
               grad_mode=torch.inference_mode) -> np.ndarray:
    """p_defect of one pass of a plain eval loop."""
    net.to(device).eval()
    out = []
    with grad_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for x, *_ in loader:
            x = x.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(net(x).float().softmax(1)[:, 1].cpu())
    return torch.cat(out).numpy()


# -- the benchmark ----------------------------------------------------------------------------
def compose_cfg(args, out_dir: Path) -> DictConfig:
    overrides = [
        "data=mvtec", f"data.root={args.data_root}", f"data.categories=[{','.join(args.categories)}]",
        f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}",
        f"backbone={args.backbone}", "augmentation=seed_strong", f"trainer.max_epochs={args.epochs}",
        f"paths.output_dir={out_dir}", f"logger.tracking_uri=sqlite:///{out_dir}/mlruns/mlflow.db",
        f"logger.artifact_location={out_dir}/mlruns/artifacts", "experiment_name=benchmark",
        *args.override,
    ]
    if args.num_workers is not None:
        overrides.append(f"data.num_workers={args.num_workers}")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def thin(records: list, limit: int | None) -> list:
    if not limit or limit >= len(records):
        return records
    return [records[i] for i in np.linspace(0, len(records) - 1, limit).round().astype(int)]


def run(args, work: Path) -> dict:
    result: dict = {"load_before": uptime(), "started": datetime.now().isoformat(timespec="seconds")}
    started = time.perf_counter()
    timings: dict[str, float] = {}
    rss: dict[str, float] = {"after_imports": round(rss_mb(), 1)}
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    meter = Meter()

    # Hydra compose + records + split + datamodule: what defect-train does before fitting
    t = time.perf_counter()
    cfg = compose_cfg(args, work)
    timings["hydra_compose_s"] = time.perf_counter() - t
    t = time.perf_counter()
    dm = build_datamodule(cfg)  # the framework's records, split, transforms, loaders and cache mode
    timings["records_and_split_s"] = time.perf_counter() - t
    records = instantiate(cfg.data.records)
    split = dm.split
    if args.limit and args.limit < len(records):
        records = thin(records, args.limit)
        split = instantiate(cfg.split.make)(records)
    # evaluate on every image training does not see: val + test of the framework's split
    split = dm.split = Split(split.train, split.val, split.val + split.test, split.leaky, split.notes)
    n_train, n_eval = len(split.train), len(split.test)
    result["data"] = {"root": str(args.data_root), "categories": args.categories, "images": len(records),
                      "train": n_train, "eval": n_eval, "image_size": args.image_size,
                      "batch_size": args.batch_size, "backbone": args.backbone,
                      "augmentation": OmegaConf.to_container(cfg.augmentation),
                      "channels_last": bool(cfg.backbone.get("channels_last", False)),
                      "num_workers": dm.num_workers, "device": str(device), "cpu_count": os.cpu_count(),
                      "torch_threads": torch.get_num_threads(), "epochs": args.epochs,
                      "eval_repeats": args.repeats}

    # model template: every path starts from a copy of the same weights
    labels = [r.label for r in split.train]
    template = build_module(cfg, (labels.count(0), labels.count(1)))
    rss["after_model"] = round(rss_mb(), 1)
    channels_last = template.channels_last
    _warm_up(template, args, device, n_train, n_eval)  # one-off kernel setup: no path below pays it

    # cache build (memory mode, as in training) and a cold/warm disk-cache round
    t = time.perf_counter()
    dm.setup("fit")
    timings["cache_build_memory_s"] = time.perf_counter() - t
    rss["after_cache"] = round(rss_mb(), 1)
    cache_mb = len(records) * 3 * args.image_size ** 2 / 2**20
    if not args.quick:
        by_path = sorted({r.path: r for r in records}.values(), key=lambda r: r.path)
        t = time.perf_counter()
        cached_images(by_path, args.image_size, "disk", work / "cache")
        timings["cache_build_disk_cold_s"] = time.perf_counter() - t
        t = time.perf_counter()
        cached_images(by_path, args.image_size, "disk", work / "cache")
        timings["cache_open_disk_warm_s"] = time.perf_counter() - t

    # -- training: every path one epoch per round, round-robin --------------------------------
    torch.manual_seed(0)
    framework = FrameworkTrainer(cfg, copy.deepcopy(template), dm)
    paths: list[tuple[str, object]] = [("b_framework_train", framework)]
    if not args.no_mlflow_epoch:
        t = time.perf_counter()
        logger = build_logger(cfg)
        tracker = RunTracker.from_lightning_logger(logger)
        tracker.log_params(flatten(cfg))  # what defect-train logs before fitting
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        timings["b_mlflow_run_setup_s"] = time.perf_counter() - t
        paths.append(("b_framework_train_mlflow", FrameworkTrainer(cfg, copy.deepcopy(template), dm, logger)))
    paths.append(("bare_train_cached", PlainTrainer(copy.deepcopy(template), dm.train_dataloader(), device,
                                                    channels_last, keep_frozen_bn_eval=True)))
    train_tf, eval_tf = seed_transforms(cfg)
    seed = PlainTrainer(copy.deepcopy(template), DataLoader(SeedDataset(split.train, train_tf),
                        batch_size=args.batch_size, shuffle=True, num_workers=0),
                        device, channels_last=False, keep_frozen_bn_eval=False)
    paths.append(("a_seed_train", seed))
    if not args.quick:  # ablations: bf16-mixed training, contiguous memory format
        paths.append(("b_framework_train_bf16_mixed",
                      FrameworkTrainer(cfg, copy.deepcopy(template), dm, precision="bf16-mixed")))
        paths.append(("bare_train_cached_contiguous", PlainTrainer(
            copy.deepcopy(template), dm.train_dataloader(), device, False, keep_frozen_bn_eval=True)))
    for n in args.workers:  # DataLoader workers over the cache, framework fit
        if n != dm.num_workers:
            dm_w = copy.copy(dm)
            dm_w.num_workers, dm_w.persistent_workers = n, n > 0
            paths.append((f"b_framework_train_workers_{n}",
                          FrameworkTrainer(cfg, copy.deepcopy(template), dm_w)))
    for round_ in range(args.epochs):
        for name, path in paths:
            if isinstance(path, FrameworkTrainer):
                meter.add(name, n_train, *path.epoch())
            else:
                meter.timed(name, n_train, path.epoch)
            if round_ == 0 and name == "bare_train_cached":
                rss["peak_framework"] = round(peak_rss_mb(), 1)  # before the seed loop and ablations
    timings["b_fit_wall_s"] = sum(framework.fit_wall)
    if not args.no_mlflow_epoch:
        tracker.finish()
    trained = framework.module

    # -- evaluation: every path one pass per round over the same images -----------------------
    batches = [x for x, *_ in dm.test_dataloader()]  # the exact normalised tensors c and d score
    loader = [(x,) for x in batches]
    net = trained.net
    contiguous = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    folded = fold_batchnorm(net)  # same memory format as net
    seed_eval_loader = DataLoader(SeedDataset(split.test, eval_tf), batch_size=args.batch_size, num_workers=0)
    bundle = save_bundle(work / "bundle.pt", net, backbone=cfg.backbone.name, image_size=args.image_size,
                         mean=cfg.backbone.mean, std=cfg.backbone.std, threshold=float(trained.threshold))
    t = time.perf_counter()
    onnx_path = export_onnx(Predictor(bundle), work / "model.onnx")
    timings["onnx_export_s"] = time.perf_counter() - t
    onnx = OnnxPredictor(onnx_path)

    def framework_eval() -> np.ndarray:
        _trainer(cfg, 1, None).test(trained, datamodule=dm, verbose=False)
        return trained.outputs["test"]["p_defect"].numpy()

    eval_paths = {
        "c_framework_eval": framework_eval,
        "bare_eval_cached": lambda: plain_eval(net, loader, device, channels_last),
        "bare_eval_cached_contiguous": lambda: plain_eval(contiguous, loader, device, False),
        "bare_eval_cached_bn_folded": lambda: plain_eval(folded, loader, device, channels_last),
        "bare_eval_cached_bf16": lambda: plain_eval(net, loader, device, channels_last, bf16=True),
        "d_onnxruntime": lambda: np.concatenate([onnx._scores(x) for x in batches]),
        "a_seed_eval": lambda: plain_eval(seed.module.net, seed_eval_loader, device, False,
                                          grad_mode=torch.no_grad),
    }
    for name, fn in eval_paths.items():  # one untimed pass: first-call setup of each path
        if name != "a_seed_eval":  # (the seed's model already met these shapes in _warm_up)
            fn()
    scores = {}
    for _ in range(args.repeats):
        for name, fn in eval_paths.items():
            scores[name] = meter.timed(name, n_eval, fn)
    paths_eval = [r.path for r in split.test]  # files to decisions: decode of the full-size file included
    meter.timed("predictor_eager_from_files", n_eval, lambda: Predictor(bundle).predict(paths_eval))
    meter.timed("predictor_onnx_from_files", n_eval, lambda: onnx.predict(paths_eval))
    rss["peak_all"] = round(peak_rss_mb(), 1)

    threshold = float(trained.threshold)
    p_fp32 = scores["bare_eval_cached"]
    result["bf16_accuracy"] = dict(
        compare(scores["bare_eval_cached_bf16"], p_fp32, threshold),
        framework_vs_bare_fp32_max_abs_diff=float(np.abs(scores["c_framework_eval"] - p_fp32).max()),
        bn_folded_vs_plain_max_abs_diff=float(np.abs(scores["bare_eval_cached_bn_folded"] - p_fp32).max()),
        note="bf16 autocast vs fp32 on the same images and model (after the benchmark's short "
             "training, so many scores sit near the threshold)")
    result["onnx_parity"] = dict(compare(scores["d_onnxruntime"], p_fp32, threshold), tolerance=1e-4)
    result["onnx_parity"]["ok"] = result["onnx_parity"]["max_abs_diff_p_defect"] <= 1e-4

    tput = meter.images_per_s()
    result["images_per_s"] = tput
    result["cpu_ms_per_image"] = meter.cpu_ms_per_image()
    result["images_per_s_each_round"] = meter.rounds()
    result["ratios"] = ratios(tput)
    result["ratios_by_cpu_time"] = ratios({k: 1000 / v for k, v in result["cpu_ms_per_image"].items() if v})
    result["targets"] = targets(result["ratios"], result["onnx_parity"])
    result["train_images_per_s_by_num_workers"] = {
        str(dm.num_workers): tput["b_framework_train"],
        **{k.rsplit("_", 1)[1]: v for k, v in tput.items() if k.startswith("b_framework_train_workers_")}}
    result["memory_mb"] = {**rss, "cache_mb": round(cache_mb, 1)}
    result["estimate_1300_images_256px"] = estimate(rss, cache_mb, len(records), args, tput, timings)
    result["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    result["load_after"] = uptime()
    result["total_wall_s"] = round(time.perf_counter() - started, 1)
    return result


def compare(p: np.ndarray, reference: np.ndarray, threshold: float) -> dict:
    diff = np.abs(p - reference)
    return {"max_abs_diff_p_defect": float(diff.max()), "mean_abs_diff_p_defect": float(diff.mean()),
            "decision_flips": int(((p >= threshold) != (reference >= threshold)).sum()),
            "threshold": threshold, "n_images": len(p)}


def _trainer(cfg: DictConfig, epochs: int, logger, callbacks=(), precision: str | None = None) -> pl.Trainer:
    extra = {"precision": precision} if precision else {}
    bar = cfg.get("callbacks", {}).get("progress_bar")
    return instantiate(cfg.trainer, max_epochs=epochs, logger=logger or False,
                       callbacks=[*callbacks, *([instantiate(bar)] if bar else [])],
                       limit_val_batches=0, enable_checkpointing=False, **extra)


def _warm_up(template, args, device: torch.device, n_train: int, n_eval: int) -> None:
    """Run every batch shape once in both memory formats: oneDNN builds kernels per shape on
    first use, and whichever path met a shape first would otherwise pay for it."""
    module = copy.deepcopy(template).to(device)
    b, s = args.batch_size, args.image_size
    train_sizes = {min(b, n_train), n_train % b} - {0}
    eval_sizes = {min(b, n_eval), n_eval % b} - {0}
    for fmt in (torch.channels_last, torch.contiguous_format):
        module.net.to(memory_format=fmt)
        module.train()
        for n in train_sizes:
            x = torch.randn(n, 3, s, s, device=device).contiguous(memory_format=fmt)
            module.loss_fn(module.net(x), torch.zeros(n, dtype=torch.long, device=device)).backward()
        module.eval()
        with torch.inference_mode():
            for n in eval_sizes:
                x = torch.randn(n, 3, s, s, device=device).contiguous(memory_format=fmt)
                module.net(x)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    module.net(x)


def ratios(t: dict) -> dict:
    def r(a: str, b: str) -> float | None:
        return round(t[a] / t[b], 3) if a in t and b in t and t[b] else None

    return {
        "b_over_a_train": r("b_framework_train", "a_seed_train"),
        "c_over_a_eval": r("c_framework_eval", "a_seed_eval"),
        "d_over_c_onnx_vs_framework_eval": r("d_onnxruntime", "c_framework_eval"),
        "d_over_bare_eval_onnx_vs_eager": r("d_onnxruntime", "bare_eval_cached"),
        "b_over_bare_train": r("b_framework_train", "bare_train_cached"),
        "b_mlflow_over_bare_train": r("b_framework_train_mlflow", "bare_train_cached"),
        "c_over_bare_eval": r("c_framework_eval", "bare_eval_cached"),
        "bf16_over_fp32_eval": r("bare_eval_cached_bf16", "bare_eval_cached"),
        "bn_folded_over_plain_eval": r("bare_eval_cached_bn_folded", "bare_eval_cached"),
        "channels_last_over_contiguous_eval": r("bare_eval_cached", "bare_eval_cached_contiguous"),
        "channels_last_over_contiguous_train": r("bare_train_cached", "bare_train_cached_contiguous"),
        "bf16_mixed_over_fp32_train": r("b_framework_train_bf16_mixed", "b_framework_train"),
        "onnx_over_eager_from_files": r("predictor_onnx_from_files", "predictor_eager_from_files"),
    }


def targets(r: dict, parity: dict) -> dict:
    def at_least(value, target):
        return None if value is None else bool(value >= target)

    return {"train_b_over_a_ge_2.0": at_least(r["b_over_a_train"], 2.0),
            "eval_c_over_a_ge_3.0": at_least(r["c_over_a_eval"], 3.0),
            "framework_within_10pct_of_bare": at_least(r["b_over_bare_train"], 0.9),
            "framework_with_mlflow_within_10pct_of_bare": at_least(r["b_mlflow_over_bare_train"], 0.9),
            "onnx_d_over_c_ge_1.3": at_least(r["d_over_c_onnx_vs_framework_eval"], 1.3),
            "onnx_parity_le_1e-4": parity["ok"]}


def estimate(rss: dict, cache_mb: float, n_images: int, args, tput: dict, timings: dict) -> dict:
    """Peak RSS and times of a ~1,300-image run at 256 px, scaled from this run.

    RSS = fixed part (interpreter, libraries, weights: RSS after building the model)
        + the uint8 cache (N x 3 x S x S bytes, exact)
        + working memory (framework peak minus fixed part minus cache: activations of one
          batch, gradients, optimiser state, Lightning/MLflow state, allocator slack), scaled
          by pixel count (256/S)^2: an upper bound, since only activations grow with pixels.
    Times scale the measured per-image costs by pixel count (model) and count (images); the
    cache build is per full-size file (cable/hazelnut are 1024 px vs bottle's 900: x1.3).
    """
    target_n, target_s = 1300, 256
    scale = (target_s / args.image_size) ** 2
    fixed = rss["after_model"]
    work = max(0.0, rss["peak_framework"] - fixed - cache_mb)
    cache_target = target_n * 3 * target_s ** 2 / 2**20
    peak = fixed + cache_target + work * scale
    n_train = round(target_n * 0.6)
    decode_per_image = timings["cache_build_memory_s"] / max(1, n_images)
    return {
        "peak_rss_mb": round(peak, 0), "peak_rss_gb": round(peak / 1024, 2),
        "fixed_mb": fixed, "cache_mb": round(cache_target, 1), "working_mb_scaled": round(work * scale, 1),
        "cache_build_s": round(decode_per_image * target_n * 1.3, 1),
        "framework_train_epoch_s": round(n_train / tput["b_framework_train"] * scale, 1),
        "seed_train_epoch_s": round(n_train / tput["a_seed_train"] * scale, 1),
        "method": "peak = RSS after model build + 1300*3*256^2 B cache + (framework peak - that - "
                  "this cache) * (256/S)^2; epoch times = 780 train images / measured images/s * (256/S)^2; "
                  "cache build = measured s/image * 1300 * 1.3 (1024 px files)",
    }


def log_to_mlflow(cfg: DictConfig, result: dict) -> str | None:
    """One run in experiment `benchmark` of the project's store (data.* and images/s metrics)."""
    project_cfg = compose_cfg_for_tracking(cfg)
    logger = build_logger(project_cfg)
    tracker = RunTracker.from_lightning_logger(logger)
    tracker.log_params({f"data.{k}": v for k, v in result["data"].items()})
    metrics = {f"images_per_s/{k}": v for k, v in result["images_per_s"].items()}
    metrics.update({f"ratio/{k}": v for k, v in result["ratios"].items() if v is not None})
    metrics.update({f"memory_mb/{k}": v for k, v in result["memory_mb"].items()})
    metrics["bf16/max_abs_diff_p_defect"] = result["bf16_accuracy"]["max_abs_diff_p_defect"]
    metrics["onnx/max_abs_diff_p_defect"] = result["onnx_parity"]["max_abs_diff_p_defect"]
    tracker.log_metrics(metrics)
    tracker.set_tags({"load_before": result["load_before"]["uptime"],
                      "load_after": result["load_after"]["uptime"]})
    tracker.log_dict(result, "benchmark.json")
    tracker.finish()
    return tracker.run_id


def compose_cfg_for_tracking(cfg: DictConfig) -> DictConfig:
    tracking = copy.deepcopy(cfg)
    OmegaConf.set_struct(tracking, False)
    mlruns = Path(str(project_root())) / "mlruns"
    tracking.logger.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{mlruns}/mlflow.db")
    tracking.logger.artifact_location = str(mlruns / "artifacts")
    return tracking


# -- runtimes: eager vs ONNX Runtime vs OpenVINO, fp32 and int8, against the arithmetic bound ---
RUNTIME_VARIANTS = ("eager fp32", "onnxruntime fp32", "openvino fp32", "onnxruntime int8", "openvino int8")


def _runtime_predictor(variant: str, files: dict, threads: int):
    from defect_detection.models.openvino_predictor import OpenVinoPredictor

    runtime, precision = variant.split()
    path = files[(runtime, precision)]
    if runtime == "onnxruntime":
        return OnnxPredictor(path, threads=threads)
    return OpenVinoPredictor(path, threads=threads, hint="LATENCY")


def run_runtimes(args, work: Path) -> dict:
    """Every runtime on the same prepared inputs of each model's test split; parity on val and test."""
    from defect_detection.models.exporting import parity
    from defect_detection.models.loading import load_predictor
    from defect_detection.pipeline.export import export, run_images
    from defect_detection.runtime_speed import (
        best_batch,
        flops_per_input,
        gemm_peak_gflops,
        latency_ms,
        torch_threads,
    )
    from defect_detection.tracking.mlflow_run import fluent_tracking_uri
    from defect_detection.tracking.summary import default_store_uri

    uri = os.environ.get("MLFLOW_TRACKING_URI") or default_store_uri()
    peak = {t: gemm_peak_gflops(t) for t in args.threads}
    log.info("fp32 GEMM peak: %s GFLOP/s", {t: round(v, 1) for t, v in peak.items()})
    models = []
    with fluent_tracking_uri(uri):
        for k, source in enumerate(args.runtimes):
            reference = load_predictor(source)
            val, test = run_images(source, "val", uri), run_images(source, "test", uri)
            if not val or not test:
                raise UserError(f"{source}: --runtimes needs MLflow model URIs whose runs logged "
                                "scores/val_scores.csv and test_scores.csv (defect-train does).")
            files, exports = {("eager", "fp32"): None}, {}
            for runtime, fmt in (("onnxruntime", "onnx"), ("openvino", "openvino")):
                for quantize in (None, "int8"):
                    out = work / f"m{k}-{fmt}-{quantize or 'fp32'}{'.onnx' if fmt == 'onnx' else '.xml'}"
                    start = time.perf_counter()
                    report = export(source, out, fmt=fmt, quantize=quantize, force=True,
                                    tracking_uri=uri)
                    report["export_s"] = time.perf_counter() - start
                    precision = quantize or "fp32"
                    files[(runtime, precision)], exports[f"{runtime} {precision}"] = out, report
            x = reference.preprocess(thin(test, args.runtime_images))
            flops = flops_per_input(reference.net, x.shape[1:])
            per_image = len(reference.preprocess(test[:1]))
            variants = {}
            for variant in RUNTIME_VARIANTS:
                runtime, precision = variant.split()
                entry = {"threads": {}}
                if runtime != "eager":
                    checker = _runtime_predictor(variant, files, max(args.threads))
                    entry["parity_val"] = parity(reference, checker, val)
                    entry["parity_test"] = parity(reference, checker, test)
                    entry["size_mb"] = exports[variant]["size_mb"]
                    entry["export_s"] = exports[variant]["export_s"]
                for t in args.threads:
                    if runtime == "eager":
                        scorer, ctx = reference._tile_logits, torch_threads(t)
                    else:
                        scorer = _runtime_predictor(variant, files, t)._tile_logits
                        ctx = contextlib.nullcontext()
                    with ctx:
                        lat = latency_ms(scorer, x, calls=args.latency_calls)
                        tput = best_batch(scorer, x, args.runtime_batches, repeats=args.repeats)
                    bound = peak[t] * 1e9 / flops
                    entry["threads"][str(t)] = {**lat, **tput, "bound_inputs_per_s": bound,
                                                "fraction_of_bound": tput["inputs_per_s"] / bound}
                    log.info("%s %s threads=%d: p50 %.1f ms, %.1f inputs/s at batch %d (%.0f%% of bound)",
                             Path(str(source)).name, variant, t, lat["p50_ms"], tput["inputs_per_s"],
                             tput["best_batch"], 100 * tput["inputs_per_s"] / bound)
                variants[variant] = entry
            models.append({"source": source, "meta": reference.meta, "input_shape": list(x.shape[1:]),
                           "inputs_per_image": per_image, "n_val": len(val), "n_test": len(test),
                           "n_timed_inputs": len(x), "gflops_per_input": flops / 1e9, "variants": variants})
    return {"kind": "runtimes", "machine": machine(), "load": uptime(), "gemm_peak_gflops": peak,
            "threads": args.threads, "batches": args.runtime_batches, "models": models}


def machine() -> dict:
    import onnxruntime
    import openvino

    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "openvino": openvino.__version__,
            "isa": sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "vnni")))}


def runtimes_markdown(result: dict) -> str:
    """The speed table the README quotes, one block per model."""
    lines = ["fp32 GEMM peak (torch.mm 2048^2, best of 7): "
             + ", ".join(f"{v:.1f} GFLOP/s at {t} thread(s)" for t, v in result["gemm_peak_gflops"].items()),
             f"Machine: {result['machine']}", ""]
    for m in result["models"]:
        lines += [f"### {m['source']} ({m['meta'].get('input', {}).get('name', 'square')}, input "
                  f"{'x'.join(map(str, m['input_shape']))}, {m['inputs_per_image']} input(s) per image, "
                  f"{m['gflops_per_input']:.3f} GFLOP per input)", "",
                  "| runtime | threads | p50 ms (batch 1) | p99 ms | inputs/s (best batch) | best batch "
                  "| % of fp32 bound | val flips | test flips | max abs dp (test) | MB |",
                  "|---" * 11 + "|"]
        for variant, e in m["variants"].items():
            pv, pt = e.get("parity_val"), e.get("parity_test")
            flips = ["-" if q is None else f"{q['decision_flips']}/{q['n_images']}" for q in (pv, pt)]
            dp = "-" if pt is None else f"{pt['max_abs_diff_p_defect']:.2e}"
            for t, r in e["threads"].items():
                lines.append(
                    f"| {variant} | {t} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['inputs_per_s']:.1f} "
                    f"| {r['best_batch']} | {100 * r['fraction_of_bound']:.0f} | {flips[0]} | {flips[1]} "
                    f"| {dp} | {e.get('size_mb', '-')} |")
        lines.append("")
    return "\n".join(lines)


NATIVE_TARGET_S = 300.0  # a candidate that always fits a 10-20 minute auto budget beside the others


def run_native(args, work: Path) -> dict:
    """The native candidate on synthetic photos of --native-size px, timed as auto runs it."""
    from mlflow import MlflowClient

    from defect_detection.api import fit
    from defect_detection.data.synthetic import synthetic_records

    n = int(args.native_images)
    per_defect = max(1, n // 12)  # 3 defect types: a quarter of the photos are defects
    goods = n - 3 * per_defect
    records = {"n_train_good": goods * 4 // 5, "n_test_good": goods - goods * 4 // 5,
               "n_per_defect": per_defect, "image_size": args.native_size, "grey": True, "defect_scale": 0.3}
    as_yaml = {k: str(v).lower() if isinstance(v, bool) else v for k, v in records.items()}
    overrides = ["data=synthetic", f"data.root={work}/data", "data.categories=[plate]",
                 *[f"data.records.{k}={v}" for k, v in as_yaml.items()],
                 "experiment=auto", "auto.only=[patchhead-native]", f"paths.root_dir={work}",
                 "log_data_summary=false", *args.override]
    result: dict = {"load_before": uptime(), "started": datetime.now().isoformat(timespec="seconds"),
                    "photos": n, "photo_px": args.native_size, "overrides": overrides}
    began = time.perf_counter()
    synthetic_records(f"{work}/data", ["plate"], **records)  # generated before the clock starts
    result["generate_s"] = round(time.perf_counter() - began, 1)
    began, cpu = time.perf_counter(), time.process_time()
    out = fit(*overrides)
    result["candidate_s"] = round(time.perf_counter() - began, 1)
    # CPU seconds of this process (all threads): what other jobs' load on the machine barely moves
    result["candidate_cpu_s"] = round(time.process_time() - cpu, 1)
    run = MlflowClient(f"sqlite:///{work}/mlruns/mlflow.db").get_run(out.run_id)
    m = run.data.metrics
    result.update({
        "backbone_s": round(m.get("train/backbone_seconds", float("nan")), 1),
        "epochs": int(m.get("epoch", -1)) + 1, "image_size": run.data.params.get("data.image_size"),
        "test_auroc": m.get("test/auroc"), "test_recall": m.get("test/recall"), "target_s": NATIVE_TARGET_S,
        "within_target": result["candidate_s"] <= NATIVE_TARGET_S, "load_after": uptime(),
        "machine": machine()})
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=DEFAULT_ROOT,
                   help="MVTec AD root (default: %(default)s)")
    p.add_argument("--categories", nargs="+", default=["bottle"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--epochs", type=int, default=3,
                   help="training rounds: one epoch of every path each; the median counts (default 3)")
    p.add_argument("--limit", type=int, default=None, help="use at most N images (evenly thinned)")
    p.add_argument("--repeats", type=int, default=3, help="eval passes; the median counts (default 3)")
    p.add_argument("--workers", type=int, nargs="*", default=[1, 2],
                   help="also time one framework epoch with these num_workers (default: 1 2)")
    p.add_argument("--num-workers", type=int, default=None, help="data.num_workers for the main paths")
    p.add_argument("--device", default="auto",
                   help="auto, cpu or cuda (plain loops; the trainer follows its config)")
    p.add_argument("--no-mlflow-epoch", action="store_true", help="skip the fit with MLflow logging on")
    p.add_argument("--mlflow", action="store_true", help="log the results to the project's MLflow store")
    p.add_argument("--quick", action="store_true", help="smoke check: 40 images, 96 px, 1 epoch, 1 repeat")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default outputs/benchmark/<time>.json)")
    p.add_argument("--runtimes", nargs="+", default=None, metavar="MODEL",
                   help="instead of training: time eager / ONNX Runtime / OpenVINO, fp32 and int8, on these "
                   "MLflow models (runs:/ID/model, models:/NAME@alias) with their runs' val and test "
                   "images")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="--runtimes: thread counts")
    p.add_argument("--runtime-batches", type=int, nargs="+", default=[1, 8, 32],
                   help="--runtimes: batch sizes")
    p.add_argument("--runtime-images", type=int, default=64, help="--runtimes: timed inputs per model")
    p.add_argument("--latency-calls", type=int, default=60, help="--runtimes: batch-1 calls for p50/p99")
    p.add_argument("--markdown", type=Path, default=None, help="--runtimes: also write the table here")
    p.add_argument("--native", action="store_true",
                   help="time the auto recipe's native-resolution candidate (patchhead-native) instead")
    p.add_argument("--native-images", type=int, default=500, help="--native: photos (default 500)")
    p.add_argument("--native-size", type=int, default=1024, help="--native: photo side in px (default 1024)")
    p.add_argument("override", nargs="*", help="extra Hydra overrides, e.g. backbone.channels_last=false")
    args = p.parse_args(argv)
    if args.quick:
        args.limit = args.limit or 40
        args.image_size = 96 if args.image_size == 224 else args.image_size
        args.epochs, args.repeats, args.workers = 1, 1, [1]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*limit_val_batches=0.*")
    warnings.filterwarnings("ignore", ".*in eval mode at the start of training.*")  # frozen BN, refits
    kind, measure = ("runtimes", run_runtimes) if args.runtimes else ("benchmark", run)
    if args.native:
        kind, measure = "native", run_native
    if kind == "benchmark" and not (args.data_root / args.categories[0]).is_dir():
        raise SystemExit(f"error: {args.data_root / args.categories[0]} not found. Pass --data-root "
                         "/path/to/mvtec (the folder holding bottle/, cable/, ...).")
    try:
        with tempfile.TemporaryDirectory(prefix=f"defect-{kind}-") as work:  # caches, MLflow, exports
            result = measure(args, Path(work))
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    result["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    out = args.out or project_root() / "outputs" / "benchmark" / f"{kind}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.mlflow and kind == "benchmark":
        result["mlflow_run_id"] = log_to_mlflow(compose_cfg(args, out.parent), result)
    out.write_text(json.dumps(result, indent=1))
    log.info("saved %s", out)
    if args.runtimes and args.markdown:
        args.markdown.write_text(runtimes_markdown(result))
    print(runtimes_markdown(result) if args.runtimes else json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
