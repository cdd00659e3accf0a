#!/usr/bin/env python
"""Throughput of each input geometry on the real configs: images/s and network inputs (tiles)/s
for training steps and evaluation, cache size and peak RSS.

    python scripts/geometry_benchmark.py --data folder --data-root ../shared/data/aitex_fabric \\
        --geometry square:input=square \\
        "tiles:input=tiles input.scale=0.5 input.tile_size=[128,512] input.overlap=64"

Each geometry builds the run's datamodule and the default classifier exactly as defect-train
does (train.build_datamodule / build_module), then times `--steps` training steps and one pass
over the test split (the batches, collation and tiling included) after one untimed warm-up batch.
"""

from __future__ import annotations

import argparse
import resource
import shlex
import time

from hydra import compose, initialize_config_dir

from defect_detection.config import CONFIG_DIR
from defect_detection.pipeline.builders import build_datamodule, build_module
from defect_detection.runtime_speed import module_scoring_rates


def measure(overrides: list[str], steps: int) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "logger=none", "data.cache=memory"])
    dm = build_datamodule(cfg)
    dm.setup()
    module = build_module(cfg, dm.class_counts("train"))
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    module.train()
    loader = iter(dm.train_dataloader())
    images = inputs = 0
    seconds = 0.0
    for i in range(steps + 1):
        try:
            batch = next(loader)
        except StopIteration:
            loader = iter(dm.train_dataloader())
            batch = next(loader)
        began = time.perf_counter()
        # the classifier's image loss on pooled tile logits (training_step minus Lightning's logging)
        loss = module.loss_fn(module.pool(module(batch.x), batch.counts), batch.y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i:  # the first step is warm-up
            seconds += time.perf_counter() - began
            images, inputs = images + len(batch.y), inputs + len(batch.x)
    train = {"train_images_per_s": images / seconds, "train_inputs_per_s": inputs / seconds}
    rates = module_scoring_rates(module, list(dm.test_dataloader()))
    return {**train, "eval_images_per_s": rates["images_per_s"], "eval_inputs_per_s": rates["inputs_per_s"],
            "inputs_per_image": rates["inputs_per_image"], "cache_mb": dm.input_plan.cache_bytes / 1e6,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["mvtec", "folder"], default="folder")
    p.add_argument("--data-root", required=True)
    p.add_argument("--categories", nargs="+", default=["bottle"])
    p.add_argument("--geometry", nargs="+", required=True, help="LABEL:OVERRIDES per geometry")
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    data = [f"data={args.data}", f"data.root={args.data_root}"]
    if args.data == "mvtec":
        data.append(f"data.categories=[{','.join(args.categories)}]")
    print("| geometry | inputs/image | train images/s | train inputs/s | eval images/s | eval inputs/s | "
          "cache MB | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in args.geometry:
        label, _, rest = spec.partition(":")
        r = measure([*data, *shlex.split(rest)], args.steps)
        print(f"| {label} | {r['inputs_per_image']:.1f} | {r['train_images_per_s']:.1f} | "
              f"{r['train_inputs_per_s']:.1f} | {r['eval_images_per_s']:.1f} | "
              f"{r['eval_inputs_per_s']:.1f} | "
              f"{r['cache_mb']:.0f} | {r['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
