"""Grad-CAM of a trained model on one evaluated split, logged under `gradcam/` in MLflow.

Galleries (defects per category and type, misclassified images), the individual overlays, and,
where masks exist, the localisation scores `<stage>/cam_*`. Localisation always explains the
defect class ("where is the evidence for a defect?"), whatever class the galleries explain.
"""

from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from defect_detection import CLASS_NAMES, DEFECT, UserError
from defect_detection.explain.gradcam import TARGETS, compute_cams, load_mask, resolve_layer
from defect_detection.explain.localisation import localisation_scores
from defect_detection.explain.overlay import denormalise, gallery, overlay, save_png

log = logging.getLogger(__name__)


def _select(records, p: dict[int, float], threshold: float, n_per_group: int, max_images: int | None):
    """(defect gallery indices grouped by (category, type), misclassified indices, masked indices)."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        if r.label == DEFECT and i in p and len(groups[(r.category, r.defect_type)]) < n_per_group:
            groups[(r.category, r.defect_type)].append(i)
    wrong = [i for i, r in enumerate(records) if i in p and (p[i] >= threshold) != (r.label == DEFECT)]
    wrong.sort(key=lambda i: -abs(p[i] - threshold))  # the most confident mistakes first
    masked = [i for i, r in enumerate(records) if r.mask_path and i in p]
    return dict(sorted(groups.items())), wrong[:max_images] if max_images else wrong, masked


def check_gradcam_config(cfg: DictConfig, net) -> None:
    """Before training: the Grad-CAM layer and target that log_gradcam will use after it exist."""
    ecfg = cfg.get("explain")
    if not ecfg or not ecfg.get("enabled", True) or not cfg.backbone.get("gradcam_layer"):
        return
    resolve_layer(net, str(cfg.backbone.gradcam_layer))
    if str(ecfg.target) not in TARGETS:
        raise UserError(f"explain.target={ecfg.target} is not one of {list(TARGETS)}.")


def log_gradcam(tracker, cfg: DictConfig, module, datamodule, stage: str = "test") -> dict[str, float]:
    """Compute and log the Grad-CAM outputs of `stage`; returns the metrics logged ({} when off)."""
    ecfg = cfg.get("explain")
    outputs = module.outputs.get(stage)
    if not tracker.enabled or not ecfg or not ecfg.get("enabled", True) or not outputs:
        return {}
    if not cfg.backbone.get("gradcam_layer"):
        log.warning("backbone %s names no gradcam_layer: Grad-CAM skipped (add e.g. gradcam_layer: "
                    "net.layer4 to its config)", cfg.backbone.get("name"))
        return {}
    records, dataset = datamodule.records(stage), datamodule.datasets[stage]
    p = dict(zip(outputs["index"].tolist(), outputs["p_defect"].tolist()))
    threshold = float(module.threshold)
    temperature = float(getattr(module, "temperature", 1.0))  # "predicted" decides as the test did
    groups, wrong, masked = _select(records, p, threshold, int(ecfg.n_per_group), ecfg.get("max_images"))
    shown = list(dict.fromkeys([i for g in groups.values() for i in g] + wrong))
    target, layer, bs = str(ecfg.target), str(cfg.backbone.gradcam_layer), int(ecfg.batch_size)
    mean, std = list(cfg.backbone.mean), list(cfg.backbone.std)

    timing = [0.0, 0]  # seconds, maps

    def cams_of(indices: list[int], explained: str) -> dict[int, torch.Tensor]:
        if not indices:
            return {}
        x = torch.stack([dataset[i][0] for i in indices])
        result = compute_cams(module.net, layer, x, target=explained, threshold=threshold, batch_size=bs,
                              temperature=temperature)
        timing[0], timing[1] = timing[0] + result.seconds, timing[1] + len(indices)
        return dict(zip(indices, result.maps))

    if target == "defect":  # one pass serves the galleries and the localisation scores
        cams = defect_cams = cams_of(list(dict.fromkeys(shown + masked)), "defect")
    else:
        cams, defect_cams = cams_of(shown, target), cams_of(masked, "defect")
    seconds, n_maps = timing

    size = int(datamodule.image_size)
    masks = {i: load_mask(records[i].mask_path, size) for i in masked}
    metrics: dict[str, float] = {}
    if n_maps:
        metrics[f"{stage}/cam_ms_per_image"] = 1000.0 * seconds / n_maps
    rows = []
    if masked:
        scores, per_image = localisation_scores(torch.stack([defect_cams[i] for i in masked]),
                                                torch.stack([masks[i] for i in masked]))
        if scores.n_images:
            metrics.update(scores.metrics(f"{stage}/"))
        rows = [{"path": records[i].path, "category": records[i].category,
                 "defect_type": records[i].defect_type, "p_defect": p[i], **(row or {})}
                for i, row in zip(masked, per_image)]

    def tile(i: int):
        image = denormalise(dataset[i][0][None], mean, std)[0]
        return overlay(image, cams[i].numpy(), float(ecfg.alpha), str(ecfg.colormap),
                       masks[i].numpy() if i in masks else None)

    def caption(i: int) -> str:
        r = records[i]
        return f"{r.category}/{r.defect_type} p={p[i]:.2f}"

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        max_images = ecfg.get("max_images")
        tiles = {i: tile(i) for i in shown}
        for i in shown[:max_images] if max_images else shown:
            r = records[i]
            name = f"{Path(r.path).stem}_p{p[i]:.2f}.png"
            save_png(tiles[i], tmp / "images" / r.category / r.defect_type / name)
        if shown:
            tracker.log_artifact(tmp / "images", "gradcam")
        ncols = max(1, int(ecfg.n_per_group))
        if groups:
            cells = [i for g in groups.values() for i in g + [None] * (ncols - len(g))]
            fig = gallery([tiles[i] if i is not None else None for i in cells],
                          [caption(i) if i is not None else "" for i in cells], ncols=ncols,
                          title=f"Grad-CAM ({target} class) on {stage} defects, white: ground-truth mask")
            tracker.log_figure(fig, "gradcam/gallery_defects.png")
        if wrong:
            fig = gallery([tiles[i] for i in wrong],
                          [f"{caption(i)} -> {CLASS_NAMES[int(p[i] >= threshold)]}" for i in wrong],
                          ncols=6, title=f"Misclassified on {stage} at threshold {threshold:.3f} "
                                         f"(Grad-CAM, {target} class)")
            tracker.log_figure(fig, "gradcam/gallery_misclassified.png")
        if rows:
            tracker.log_table_csv(pd.DataFrame(rows), "gradcam/localisation.csv")
    tracker.log_metrics(metrics)
    tracker.log_dict({"stage": stage, "layer": layer, "target": target, "localisation_target": "defect",
                      "threshold": threshold, "n_gallery_defects": sum(map(len, groups.values())),
                      "n_misclassified": len(wrong), "n_masked": len(masked), "metrics": metrics},
                     "gradcam/summary.json")
    log.info("Grad-CAM on %s: %d maps, %s", stage, n_maps,
             ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) or "no metrics")
    return metrics
