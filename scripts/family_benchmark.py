#!/usr/bin/env python
"""Speed and memory of each detector family (any geometry) on the real configs: images/s of
training (PatchCore: its one pass and the memory bank build), images/s scoring the test split,
and for families with their own map (PatchCore, segmenter) images/s with the map; the memory
bank's size, the decoded cache and peak RSS. Each recipe runs in a fresh process, so its peak RSS
is its own.

    python scripts/family_benchmark.py --data mvtec --data-root ../shared/data/mvtec --categories bottle \\
        --recipe classifier:detector=classifier patchcore:detector=patchcore

Each recipe builds the datamodule and module exactly as defect-train does (train.build_datamodule
/ build_module) and fits with the run's own trainer settings, without validation, checkpoints or
logging, for `--epochs` epochs (PatchCore: one, its only epoch). Train images/s = train images x
epochs / fit wall time (first batches included: what a user waits for). Scoring: one untimed
warm-up batch, then every test batch (collation, tiling and pooling included).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import shlex
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

COLUMNS = ["recipe", "train images", "inputs/image", "train images/s", "bank build s", "bank MB",
           "score images/s", "score+map images/s", "cache MB", "peak RSS MB"]


def measure(overrides: list[str], epochs: int) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from defect_detection.config import CONFIG_DIR
    from defect_detection.models.families import family
    from defect_detection.pipeline.builders import build_datamodule, build_module, detector_name
    from defect_detection.runtime_speed import module_scoring_rates

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "logger=none", "data.cache=memory",
                                          f"paths.output_dir={tempfile.mkdtemp(prefix='family-bench-')}"])
    fam = family(detector_name(cfg))
    dm = build_datamodule(cfg)
    dm.setup()
    module = build_module(cfg, dm.class_counts("train"))
    settings = {"max_epochs": epochs, **fam.trainer, "logger": False, "callbacks": [],
                "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                "limit_val_batches": 0, "num_sanity_val_steps": 0}
    trainer = instantiate(cfg.trainer, **settings)
    n_train = len(dm.records("train"))
    began = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    fit_s = time.perf_counter() - began
    out = {"train_images": n_train, "epochs": trainer.current_epoch,
           "train_images_per_s": n_train * trainer.current_epoch / fit_s, "fit_s": fit_s}
    stats = getattr(module, "bank_stats", {}) or {}
    out.update({"bank_build_s": stats.get("bank_build_s"), "bank_mb": stats.get("bank_mb"),
                "bank_size": stats.get("bank_size")})
    has_map = hasattr(module.net, "anomaly_map")  # the classifier's map is Grad-CAM (gradcam_timing.py)
    rates = module_scoring_rates(module, list(dm.test_dataloader()), with_map=has_map)
    out.update({"score_images_per_s": rates["images_per_s"], "map_images_per_s": rates["map_images_per_s"],
                "inputs_per_image": rates["inputs_per_image"], "cache_mb": dm.input_plan.cache_bytes / 1e6,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    return out


def row(label: str, r: dict) -> str:
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    return (f"| {label} | {r['train_images']} | {f(r['inputs_per_image'])} | {f(r['train_images_per_s'])} | "
            f"{f(r['bank_build_s'])} | {f(r['bank_mb'])} | {f(r['score_images_per_s'])} | "
            f"{f(r['map_images_per_s'])} | {f(r['cache_mb'], 0)} | {f(r['peak_rss_mb'], 0)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["mvtec", "folder", "synthetic"], default="mvtec")
    p.add_argument("--data-root", default=None)
    p.add_argument("--categories", nargs="+", default=["bottle"])
    p.add_argument("--recipe", nargs="+", required=True, help="LABEL:OVERRIDES per recipe")
    p.add_argument("--epochs", type=int, default=2, help="training epochs timed (PatchCore: always 1)")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("override", nargs="*", help="Hydra overrides for every recipe")
    args = p.parse_args()
    data = [f"data={args.data}"] + ([f"data.root={args.data_root}"] if args.data_root else [])
    if args.data == "mvtec":
        data.append(f"data.categories=[{','.join(args.categories)}]")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|---" * len(COLUMNS) + "|")
    results = {}
    spawn = multiprocessing.get_context("spawn")
    for spec in args.recipe:
        label, _, rest = spec.partition(":")
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:  # a fresh process: its own RSS
            r = pool.submit(measure, [*data, *shlex.split(rest), *args.override], args.epochs).result()
        results[label] = {"overrides": rest, **r}
        print(row(label, r), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"argv": shlex.join(["python", "scripts/family_benchmark.py",
                                                            *__import__("sys").argv[1:]]),
                                        "results": results}, indent=2))


if __name__ == "__main__":
    main()
