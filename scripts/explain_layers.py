"""Which map localises best: train once, score several Grad-CAM layer choices on val and test.

    python scripts/explain_layers.py --out docs/results/raw/demo_s0.json seed=0
    python scripts/explain_layers.py --out bottle_s1.json data=mvtec data.root=/data/mvtec \
        "data.categories=[bottle]" split.seed=1
    python scripts/explain_layers.py --candidates anomaly_map -- detector=patchcore ...

Composes the real train config with the given overrides (Hydra syntax), fits exactly as
`defect-train` does (best checkpoint by the monitored val metric), then, for every candidate, maps
the defect class of each masked val and test image and scores them at the original resolution
(the same code as a run's `test/cam_*`). A candidate is `layer[,layer...][:fusion]` or
`anomaly_map`. Choose on val, report test: the test numbers of the val-chosen candidate are the
honest ones. Prints and writes JSON; logs nothing to MLflow.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from defect_detection.config import CONFIG_DIR
from defect_detection.data.geometry import header_hw
from defect_detection.explain.gradcam import geometry_cams
from defect_detection.explain.report import original_resolution_scores
from defect_detection.models.families import family
from defect_detection.pipeline.builders import build_datamodule, build_module, detector_name

DEFAULT_CANDIDATES = {
    "efficientnet": ["net.conv_head", "net.blocks.6", "net.blocks.5", "net.blocks.4", "net.blocks.3",
                     "net.blocks.5,net.conv_head:mean", "net.blocks.4,net.blocks.5:mean",
                     "net.blocks.4,net.blocks.5:product", "net.blocks.4,net.conv_head:mean",
                     "net.blocks.3,net.blocks.5:mean"],
    "resnet": ["net.layer4", "net.layer3", "net.layer2", "net.layer3,net.layer4:mean",
               "net.layer3,net.layer4:product", "net.layer2,net.layer4:product"],
}


def parse_candidate(text: str) -> tuple[str, list[str], str]:
    """('gradcam' | 'anomaly_map', layers, fusion) of `layer[,layer...][:fusion]` or `anomaly_map`."""
    if text == "anomaly_map":
        return "anomaly_map", [], "mean"
    layers, _, fusion = text.partition(":")
    return "gradcam", layers.split(","), fusion or "mean"


def score_candidates(module, datamodule, candidates: list[str], stages=("val", "test"), *,
                     radius_px: float = 15.0, fpr_limit: float = 0.3, batch_size: int = 16) -> list[dict]:
    """One row per (candidate, stage): the localisation scores and map time per image."""
    rows = []
    geometry, sizes = datamodule.geometry, getattr(datamodule, "sizes", None) or {}
    for stage in stages:
        records, dataset = datamodule.records(stage), datamodule.datasets[stage]
        masked = [i for i, r in enumerate(records) if r.mask_path]

        def hw_of(i: int, records=records) -> tuple[int, int]:
            path = records[i].path
            return sizes[path] if path in sizes else header_hw(path)

        images = [dataset[i][0] for i in masked]
        for text in candidates:
            method, layers, fusion = parse_candidate(text)
            maps, seconds = geometry_cams(module.net, layers, images, geometry, target="defect",
                                          batch_size=batch_size, method=method, fusion=fusion)
            scores, _ = original_resolution_scores(dict(zip(masked, maps)), records, geometry, hw_of,
                                                   radius_px=radius_px, fpr_limit=fpr_limit)
            rows.append({"stage": stage, "candidate": text, "n_masked": scores.n_images,
                         "n_regions": scores.n_regions, "pointing_game": scores.pointing_game,
                         "pixel_auroc": scores.pixel_auroc, "pro": scores.pro,
                         "energy_in_mask": scores.energy_in_mask,
                         "ms_per_image": 1000.0 * seconds / max(1, len(masked))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="+", default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=[f"paths.output_dir={tmp}", "logger=none",
                                              "log_data_summary=false", *args.overrides])
        pl.seed_everything(cfg.seed, workers=True)
        datamodule = build_datamodule(cfg)
        module = build_module(cfg, datamodule.class_counts("train"))
        callbacks = [instantiate(c) for c in cfg.get("callbacks", {}).values() if c]
        trainer = instantiate(cfg.trainer, logger=False, callbacks=callbacks,
                              **family(detector_name(cfg)).trainer)
        trainer.fit(module, datamodule=datamodule, weights_only=True)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.validate(module, datamodule=datamodule, ckpt_path=best or None, verbose=False,
                         weights_only=True)
        datamodule.setup("test")
        family_name = detector_name(cfg)
        candidates = args.candidates or (
            ["anomaly_map"] if hasattr(module.net, "anomaly_map")
            else DEFAULT_CANDIDATES["resnet" if cfg.backbone.name.startswith("resnet") else "efficientnet"])
        rows = score_candidates(module, datamodule, candidates,
                                radius_px=float(cfg.explain.pointing_radius_px),
                                fpr_limit=float(cfg.explain.pro_fpr_limit))
    result = {"overrides": args.overrides, "family": family_name, "backbone": cfg.backbone.name,
              "image_size": cfg.data.image_size, "seed": cfg.seed, "split_seed": cfg.split.get("seed"),
              "epochs_run": trainer.current_epoch, "torch_threads": int(os.environ.get("OMP_NUM_THREADS", 0)),
              "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
