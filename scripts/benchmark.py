#!/usr/bin/env python
"""Throughput of the framework against the seed's plain loop, in one process on the same data.

    python scripts/benchmark.py                 # real MVTec bottle (../shared/data/mvtec), < 10 min
    python scripts/benchmark.py --quick         # smoke check: 40 images at 96 px, one epoch
    python scripts/benchmark.py --data-root /data/mvtec --categories bottle cable --epochs 3 --mlflow

Same model (backbone config, freezing, weighted CE, Adam), batch size and augmentation
parameters everywhere; the paths differ only in what the framework changes:

  a  seed loop: PIL decode of the full-size file + torchvision transforms every epoch,
     num_workers=0, contiguous tensors, a plain train loop and a torch.no_grad eval loop
  b  framework training: Hydra-composed config, DefectDataModule over the decoded-image cache,
     Lightning Trainer.fit (per-epoch time; validation off), without and with MLflow logging
  c  framework evaluation: Trainer.test over the cache (metrics, channels_last, inference_mode)
  d  ONNX Runtime on the same preprocessed tensors (defect-export's graph, parity-checked)
  bare  a plain PyTorch loop over the same cached loader and model: b/bare is the cost of
     Lightning + Hydra + MLflow

Images/s are images seen per second of loop time (cache building reported on its own, and
amortised in `b_including_cache_build`). Prints the JSON last and saves it under
outputs/benchmark/ (or --out).
"""

from __future__ import annotations

import argparse
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
from defect_detection.export import export_onnx
from defect_detection.models.inference import Predictor, save_bundle
from defect_detection.models.onnx_predictor import OnnxPredictor
from defect_detection.tracking.mlflow_run import RunTracker, flatten
from defect_detection.train import build_datamodule, build_logger, build_module

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


class EpochTimer(pl.Callback):
    """Seconds of each training epoch (data loading + steps + Lightning's per-step work)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def ips(n_images: int, seconds: float) -> float:
    return round(n_images / seconds, 2) if seconds > 0 else float("nan")


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


def _optimizer(module) -> torch.optim.Optimizer:
    opt = module.configure_optimizers()
    return opt["optimizer"] if isinstance(opt, dict) else opt


def plain_train(module, loader: DataLoader, epochs: int, device: torch.device, channels_last: bool,
                keep_frozen_bn_eval: bool) -> list[float]:
    """The seed's loop: zero_grad, forward, loss, backward, step. Returns seconds per epoch."""
    net, loss_fn, optimizer = module.net.to(device), module.loss_fn.to(device), _optimizer(module)
    seconds = []
    for _ in range(epochs):
        module.train() if keep_frozen_bn_eval else net.train()
        start = time.perf_counter()
        for x, y, *_ in loader:
            x, y = x.to(device), y.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds


def plain_eval(net, loader: DataLoader, device: torch.device, channels_last: bool, bf16: bool = False,
               grad_mode=torch.no_grad) -> tuple[float, np.ndarray]:
    """(seconds, p_defect): one pass of a plain eval loop."""
    net.to(device).eval()
    out = []
    start = time.perf_counter()
    with grad_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for x, *_ in loader:
            x = x.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(net(x).float().softmax(1)[:, 1].cpu())
    return time.perf_counter() - start, torch.cat(out).numpy()


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


def run(args) -> dict:
    result: dict = {"load_before": uptime(), "started": datetime.now().isoformat(timespec="seconds")}
    timings: dict[str, float] = {}
    rss: dict[str, float] = {"after_imports": round(rss_mb(), 1)}
    work = Path(tempfile.mkdtemp(prefix="defect-benchmark-"))
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))

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
                      "num_workers": dm.num_workers, "device": str(device),
                      "torch_threads": torch.get_num_threads(), "epochs": args.epochs}

    # model template: every path starts from a copy of the same weights
    labels = [r.label for r in split.train]
    template = build_module(cfg, (labels.count(0), labels.count(1)))
    rss["after_model"] = round(rss_mb(), 1)
    channels_last = template.channels_last

    # warm-up: first calls pay one-off kernel/primitive setup; no path below should
    _warm_up(template, args, device)

    # cache build (memory mode, as in training) and a cold/warm disk-cache round
    t = time.perf_counter()
    dm.setup("fit")
    timings["cache_build_memory_s"] = time.perf_counter() - t
    rss["after_cache"] = round(rss_mb(), 1)
    cache_mb = len(records) * 3 * args.image_size ** 2 / 2**20
    if not args.quick:
        paths_sorted = sorted({r.path: r for r in records}.values(), key=lambda r: r.path)
        t = time.perf_counter()
        cached_images(paths_sorted, args.image_size, "disk", work / "cache")
        timings["cache_build_disk_cold_s"] = time.perf_counter() - t
        t = time.perf_counter()
        cached_images(paths_sorted, args.image_size, "disk", work / "cache")
        timings["cache_open_disk_warm_s"] = time.perf_counter() - t

    tput: dict[str, float] = {}
    epochs = args.epochs

    # (b) framework training, no logger / MLflow logger
    fit_b, timer_b, trained = _framework_fit(cfg, template, dm, epochs, logger=None)
    timings["b_fit_wall_s"] = fit_b
    tput["b_framework_train"] = ips(n_train * epochs, sum(timer_b))
    tput["b_framework_train_first_epoch"] = ips(n_train, timer_b[0])
    tput["b_including_cache_build"] = ips(n_train * epochs, sum(timer_b) + timings["cache_build_memory_s"])
    if not args.no_mlflow_epoch:
        t = time.perf_counter()
        logger = build_logger(cfg)
        tracker = RunTracker.from_lightning_logger(logger)
        tracker.log_params(flatten(cfg))
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        timings["b_mlflow_setup_s"] = time.perf_counter() - t
        fit_m, timer_m, _ = _framework_fit(cfg, template, dm, epochs, logger=logger)
        tracker.finish()
        timings["b_mlflow_fit_wall_s"] = fit_m
        tput["b_framework_train_mlflow"] = ips(n_train * epochs, sum(timer_m))

    # bare PyTorch over the same cached loader, model and memory format
    bare = copy.deepcopy(template)
    torch.manual_seed(0)
    bare_s = plain_train(bare, dm.train_dataloader(), epochs, device, channels_last, keep_frozen_bn_eval=True)
    tput["bare_train_cached"] = ips(n_train * epochs, sum(bare_s))
    tput["bare_train_cached_first_epoch"] = ips(n_train, bare_s[0])

    # (c) framework evaluation: Trainer.test over the cache, median of repeats
    eval_s, p_framework = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        _trainer(cfg, epochs, logger=None).test(trained, datamodule=dm, verbose=False)
        eval_s.append(time.perf_counter() - t)
        p_framework = trained.outputs["test"]["p_defect"].numpy()
    tput["c_framework_eval"] = ips(n_eval, statistics.median(eval_s))

    # bare eval (fp32 and bf16 autocast, channels_last and not) on the same cached tensors
    eval_loader = dm.test_dataloader()
    batches = [x for x, *_ in eval_loader]  # the exact normalised tensors c and d score
    net = trained.net
    runs = [plain_eval(net, batches_loader(batches), device, channels_last, grad_mode=torch.inference_mode)
            for _ in range(args.repeats)]
    p_fp32 = runs[0][1]
    tput["bare_eval_cached"] = ips(n_eval, statistics.median(r[0] for r in runs))
    contiguous = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    tput["bare_eval_cached_contiguous"] = ips(n_eval, statistics.median(
        plain_eval(contiguous, batches_loader(batches), device, False, grad_mode=torch.inference_mode)[0]
        for _ in range(args.repeats)))
    bf16_runs = [plain_eval(net, batches_loader(batches), device, channels_last, bf16=True,
                            grad_mode=torch.inference_mode) for _ in range(args.repeats)]
    p_bf16 = bf16_runs[0][1]
    tput["bare_eval_cached_bf16"] = ips(n_eval, statistics.median(r[0] for r in bf16_runs))
    threshold = float(trained.threshold)
    result["bf16_accuracy"] = {
        "max_abs_diff_p_defect": float(np.abs(p_bf16 - p_fp32).max()),
        "mean_abs_diff_p_defect": float(np.abs(p_bf16 - p_fp32).mean()),
        "decision_flips": int(((p_bf16 >= threshold) != (p_fp32 >= threshold)).sum()),
        "threshold": threshold, "n_images": n_eval,
        "framework_vs_bare_fp32_max_abs_diff": float(np.abs(p_framework - p_fp32).max()),
        "note": "model after the benchmark's short training; scores near the threshold flip first"}
    if not args.quick:
        _, timer_bf16, _ = _framework_fit(cfg, template, dm, 1, logger=None, precision="bf16-mixed")
        tput["b_framework_train_bf16_mixed"] = ips(n_train, timer_bf16[0])
        contiguous_train = copy.deepcopy(template)
        contiguous_train.net.to(memory_format=torch.contiguous_format)
        s = plain_train(contiguous_train, dm.train_dataloader(), 1, device, False, keep_frozen_bn_eval=True)
        tput["bare_train_cached_contiguous"] = ips(n_train, s[0])
    rss["peak_framework"] = round(peak_rss_mb(), 1)

    # (a) the seed's plain loop: PIL decode + transforms of the full-size files every epoch
    train_tf, eval_tf = seed_transforms(cfg)
    seed = copy.deepcopy(template)
    seed.net.to(memory_format=torch.contiguous_format)
    torch.manual_seed(0)
    seed_loader = DataLoader(SeedDataset(split.train, train_tf), batch_size=args.batch_size, shuffle=True,
                             num_workers=0)
    seed_s = plain_train(seed, seed_loader, epochs, device, False, keep_frozen_bn_eval=False)
    tput["a_seed_train"] = ips(n_train * epochs, sum(seed_s))
    seed_eval_loader = DataLoader(SeedDataset(split.test, eval_tf), batch_size=args.batch_size, num_workers=0)
    seed_eval_s, _ = plain_eval(seed.net, seed_eval_loader, device, False)
    tput["a_seed_eval"] = ips(n_eval, seed_eval_s)

    # DataLoader workers with the cache (framework fit, one epoch each)
    workers = {str(dm.num_workers): tput["b_framework_train"]}
    for n in args.workers:
        if n == dm.num_workers:
            continue
        dm_w = copy.copy(dm)
        dm_w.num_workers, dm_w.persistent_workers = n, n > 0
        _, timer_w, _ = _framework_fit(cfg, template, dm_w, 1, logger=None)
        workers[str(n)] = ips(n_train, timer_w[0])
    result["train_images_per_s_by_num_workers"] = workers

    # (d) ONNX Runtime on the same tensors, after export + parity against eager fp32
    bundle = save_bundle(work / "bundle.pt", net, backbone=cfg.backbone.name, image_size=args.image_size,
                         mean=cfg.backbone.mean, std=cfg.backbone.std, threshold=threshold)
    t = time.perf_counter()
    onnx_path = export_onnx(Predictor(bundle), work / "model.onnx")
    timings["onnx_export_s"] = time.perf_counter() - t
    onnx = OnnxPredictor(onnx_path)
    ort_s, p_onnx = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        p_onnx = np.concatenate([onnx._scores(x) for x in batches])
        ort_s.append(time.perf_counter() - t)
    tput["d_onnxruntime"] = ips(n_eval, statistics.median(ort_s))
    result["onnx_parity"] = {"max_abs_diff_p_defect": float(np.abs(p_onnx - p_fp32).max()),
                             "decision_flips": int(((p_onnx >= threshold) != (p_fp32 >= threshold)).sum()),
                             "n_images": n_eval, "tolerance": 1e-4}
    result["onnx_parity"]["ok"] = result["onnx_parity"]["max_abs_diff_p_defect"] <= 1e-4

    # files to decisions: Predictor / OnnxPredictor.predict on paths (decode of the full-size file included)
    paths = [r.path for r in split.test]
    for name, predictor in (("predictor_eager_from_files", Predictor(bundle)),
                            ("predictor_onnx_from_files", onnx)):
        t = time.perf_counter()
        predictor.predict(paths)
        tput[name] = ips(len(paths), time.perf_counter() - t)
    rss["peak_all"] = round(peak_rss_mb(), 1)

    result["images_per_s"] = tput
    result["ratios"] = ratios(tput)
    result["targets"] = targets(result["ratios"], result["onnx_parity"])
    result["memory_mb"] = {**rss, "cache_mb": round(cache_mb, 1)}
    result["estimate_1300_images_256px"] = estimate(rss, cache_mb, len(records), args, tput, timings)
    result["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
    result["load_after"] = uptime()
    return result


def batches_loader(batches: list[torch.Tensor]):
    return [(x,) for x in batches]


def _trainer(cfg: DictConfig, epochs: int, logger, callbacks=(), precision: str | None = None) -> pl.Trainer:
    extra = {"precision": precision} if precision else {}
    bar = cfg.get("callbacks", {}).get("progress_bar")
    return instantiate(cfg.trainer, max_epochs=epochs, logger=logger or False,
                       callbacks=[*callbacks, *([instantiate(bar)] if bar else [])],
                       limit_val_batches=0, enable_checkpointing=False, **extra)


def _framework_fit(cfg, template, dm, epochs: int, logger, precision: str | None = None):
    module = copy.deepcopy(template)
    timer = EpochTimer()
    trainer = _trainer(cfg, epochs, logger, [timer], precision)
    torch.manual_seed(0)
    t = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return time.perf_counter() - t, timer.seconds, module


def _warm_up(template, args, device: torch.device) -> None:
    module = copy.deepcopy(template).to(device)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    y = torch.zeros(args.batch_size, dtype=torch.long, device=device)
    for fmt in (torch.channels_last, torch.contiguous_format):
        module.net.to(memory_format=fmt)
        xf = x.contiguous(memory_format=fmt)
        module.train()
        module.loss_fn(module.net(xf), y).backward()
        with torch.inference_mode():
            module.eval()
            module.net(xf)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                module.net(xf)


def ratios(t: dict) -> dict:
    def r(a: str, b: str) -> float | None:
        return round(t[a] / t[b], 3) if a in t and b in t and t[b] else None

    return {
        "b_over_a_train": r("b_framework_train", "a_seed_train"),
        "b_including_cache_build_over_a_train": r("b_including_cache_build", "a_seed_train"),
        "c_over_a_eval": r("c_framework_eval", "a_seed_eval"),
        "d_over_c_onnx_vs_framework_eval": r("d_onnxruntime", "c_framework_eval"),
        "d_over_bare_eval_onnx_vs_eager": r("d_onnxruntime", "bare_eval_cached"),
        "b_over_bare_train": r("b_framework_train", "bare_train_cached"),
        "b_mlflow_over_bare_train": r("b_framework_train_mlflow", "bare_train_cached"),
        "c_over_bare_eval": r("c_framework_eval", "bare_eval_cached"),
        "bf16_over_fp32_eval": r("bare_eval_cached_bf16", "bare_eval_cached"),
        "channels_last_over_contiguous_eval": r("bare_eval_cached", "bare_eval_cached_contiguous"),
        "channels_last_over_contiguous_train": r("bare_train_cached", "bare_train_cached_contiguous"),
        "bf16_mixed_over_fp32_train": r("b_framework_train_bf16_mixed", "b_framework_train"),
        "onnx_over_eager_from_files": r("predictor_onnx_from_files", "predictor_eager_from_files"),
    }


def targets(r: dict, parity: dict) -> dict:
    def at_least(value, target):
        return None if value is None else bool(value >= target)

    overhead = [v for v in (r["b_over_bare_train"], r["b_mlflow_over_bare_train"]) if v is not None]
    return {"train_b_over_a_ge_2.0": at_least(r["b_over_a_train"], 2.0),
            "eval_c_over_a_ge_3.0": at_least(r["c_over_a_eval"], 3.0),
            "framework_within_10pct_of_bare": at_least(min(overhead) if overhead else None, 0.9),
            "onnx_d_over_c_ge_1.3": at_least(r["d_over_c_onnx_vs_framework_eval"], 1.3),
            "onnx_parity_le_1e-4": parity["ok"]}


def estimate(rss: dict, cache_mb: float, n_images: int, args, tput: dict, timings: dict) -> dict:
    """Peak RSS and times of a ~1,300-image run at 256 px, scaled from this run.

    RSS = fixed part (interpreter, libraries, weights: RSS after building the model)
        + the uint8 cache (N x 3 x S x S bytes, exact)
        + working memory (framework peak minus fixed part minus cache: activations of one
          batch, gradients, optimiser state, allocator slack), scaled by pixel count (256/S)^2,
          which over-states it since weights and optimiser state do not grow with pixels.
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, default=DEFAULT_ROOT,
                   help="MVTec AD root (default: %(default)s)")
    p.add_argument("--categories", nargs="+", default=["bottle"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--epochs", type=int, default=2, help="training epochs per path (default 2)")
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
    if not (args.data_root / args.categories[0]).is_dir():
        raise SystemExit(f"error: {args.data_root / args.categories[0]} not found. Pass --data-root "
                         "/path/to/mvtec (the folder holding bottle/, cable/, ...).")
    try:
        result = run(args)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    result["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    stamp = f"{datetime.now():%Y%m%d-%H%M%S}"
    out = args.out or project_root() / "outputs" / "benchmark" / f"benchmark-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.mlflow:
        result["mlflow_run_id"] = log_to_mlflow(compose_cfg(args, out.parent), result)
    out.write_text(json.dumps(result, indent=1))
    log.info("saved %s", out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
