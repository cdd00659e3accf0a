"""Grad-CAM of a trained model on one evaluated split, logged under `gradcam/` in MLflow.

Galleries (defects per category and type, misclassified images), the individual overlays, and,
where masks exist, the localisation scores `<stage>/cam_*`, computed at each photo's original
resolution (maps resized back to it, masks read at it). Localisation always explains the defect
class ("where is the evidence for a defect?"), whatever class the galleries explain.
"""

from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from defect_detection.base import CLASS_NAMES, DEFECT, UserError
from defect_detection.data.cache import prepared_mask
from defect_detection.data.geometry import header_hw
from defect_detection.explain.gradcam import (
    FUSIONS,
    TARGETS,
    geometry_cams,
    layer_names,
    map_method,
    resolve_layer,
)
from defect_detection.explain.localisation import localisation_scores
from defect_detection.explain.overlay import denormalise, gallery, overlay, save_png
from defect_detection.naming import file_safe
from defect_detection.schema import BackboneSchema, ExplainSchema

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


def check_gradcam_config(ecfg: ExplainSchema | None, backbone: BackboneSchema, net) -> None:
    """Before training: the Grad-CAM layer and target that log_gradcam will use after it exist."""
    if not ecfg or not ecfg.enabled:
        return
    if map_method(net, ecfg.method) != "gradcam" or not backbone.gradcam_layer:
        return
    for layer in layer_names(backbone.gradcam_layer):
        resolve_layer(net, layer)
    if ecfg.target not in TARGETS:
        raise UserError(f"explain.target={ecfg.target} is not one of {list(TARGETS)}.")
    if ecfg.fusion not in FUSIONS:
        raise UserError(f"explain.fusion={ecfg.fusion} is not one of {list(FUSIONS)}.")


def original_mask(path: str, hw: tuple[int, int]) -> torch.Tensor:
    """A ground-truth mask at its photo's own resolution, as bool (>= half intensity; a faint
    mask keeps every non-zero pixel), with the same read and size checks as training's."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            values = np.asarray(im.convert("L"))
    except OSError as err:
        raise UserError(f"Cannot read mask {path}: {err}. Remove or replace the file.") from err
    if values.shape != tuple(hw):
        raise UserError(f"Mask {path} is {values.shape[1]} x {values.shape[0]} px but its image is "
                        f"{hw[1]} x {hw[0]}: re-export the mask at the image's size or remove it.")
    binary = values >= 128
    return torch.from_numpy(binary if binary.any() else values > 0)


def original_resolution_scores(prepared_maps: dict[int, torch.Tensor], records, geometry, hw_of, *,
                               radius_px: float = 15.0, fpr_limit: float = 0.3):
    """Localisation scores of maps over prepared images, each resized back to its photo
    (geometry.to_original) and scored against the mask read at the photo's resolution."""
    indices = list(prepared_maps)
    maps = [geometry.to_original(prepared_maps[i], hw_of(i)) for i in indices]
    masks = [original_mask(records[i].mask_path, hw_of(i)) for i in indices]
    return localisation_scores(maps, masks, radius_px=radius_px, fpr_limit=fpr_limit)


def log_gradcam(tracker, ecfg: ExplainSchema | None, backbone: BackboneSchema, module, datamodule,
                stage: str = "test") -> dict[str, float]:
    """Compute and log the Grad-CAM outputs of `stage`; returns the metrics logged ({} when off)."""
    outputs = module.outputs.get(stage)
    if not tracker.enabled or not ecfg or not ecfg.enabled or not outputs:
        return {}
    method = map_method(module.net, ecfg.method)
    if method == "gradcam" and not backbone.gradcam_layer:
        log.warning("backbone %s names no gradcam_layer: Grad-CAM skipped (add e.g. gradcam_layer: "
                    "net.layer4 to its config)", backbone.name)
        return {}
    records, dataset = datamodule.records(stage), datamodule.datasets[stage]
    p = dict(zip(outputs["index"].tolist(), outputs["p_defect"].tolist()))
    threshold = float(module.threshold)
    temperature = float(getattr(module, "temperature", 1.0))  # "predicted" decides as the test did
    groups, wrong, masked = _select(records, p, threshold, ecfg.n_per_group, ecfg.max_images)
    shown = list(dict.fromkeys([i for g in groups.values() for i in g] + wrong))
    target, bs = ecfg.target, ecfg.batch_size
    layer = layer_names(backbone.gradcam_layer)
    fusion = ecfg.fusion
    mean, std = list(backbone.mean), list(backbone.std)

    timing = [0.0, 0]  # seconds, maps
    what = (f"Grad-CAM ({target} class)" if method == "gradcam"
            else f"{getattr(module, 'family', '') or 'the detector'}'s own map")

    geometry = datamodule.geometry
    sizes = getattr(datamodule, "sizes", None) or {}

    def hw_of(i: int) -> tuple[int, int]:
        path = records[i].path
        return sizes[path] if path in sizes else header_hw(path)

    def content(i: int, t: torch.Tensor) -> torch.Tensor:
        """The photo's part of a prepared image or map (letterbox: the padding cut off)."""
        top, left, h, w = geometry.content_box(hw_of(i))
        return t[..., top:top + h, left:left + w]

    def cams_of(indices: list[int], explained: str) -> dict[int, torch.Tensor]:
        """Maps over the prepared images (content() or to_original() takes them to the photo)."""
        if not indices:
            return {}
        maps, secs = geometry_cams(module.net, layer, [dataset[i][0] for i in indices], geometry,
                                   target=explained, threshold=threshold, batch_size=bs,
                                   temperature=temperature, method=method, fusion=fusion)
        timing[0], timing[1] = timing[0] + secs, timing[1] + len(indices)
        return dict(zip(indices, maps))

    if target == "defect":  # one pass serves the galleries and the localisation scores
        prepared = defect_prepared = cams_of(list(dict.fromkeys(shown + masked)), "defect")
    else:
        prepared, defect_prepared = cams_of(shown, target), cams_of(masked, "defect")
    cams = {i: content(i, m) for i, m in prepared.items()}
    seconds, n_maps = timing

    masks = {i: content(i, torch.from_numpy(prepared_mask(records[i].mask_path, geometry, hw_of(i))[0] > 0))
             for i in masked}
    metrics: dict[str, float] = {}
    if n_maps:
        metrics[f"{stage}/cam_ms_per_image"] = 1000.0 * seconds / n_maps
    rows = []
    if masked:
        scores, per_image = original_resolution_scores(
            {i: defect_prepared[i] for i in masked}, records, geometry, hw_of,
            radius_px=ecfg.pointing_radius_px, fpr_limit=ecfg.pro_fpr_limit)
        if scores.n_images:
            metrics.update(scores.metrics(f"{stage}/"))
        rows = [{"path": records[i].path, "category": records[i].category,
                 "defect_type": records[i].defect_type, "p_defect": p[i], **(row or {})}
                for i, row in zip(masked, per_image)]

    def tile(i: int):
        image = denormalise(content(i, dataset[i][0])[None], mean, std)[0]
        return overlay(image, cams[i].numpy(), ecfg.alpha, ecfg.colormap,
                       masks[i].numpy() if i in masks else None)

    def caption(i: int) -> str:
        r = records[i]
        return f"{r.category}/{r.defect_type} p={p[i]:.2f}"

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        max_images = ecfg.max_images
        tiles = {i: tile(i) for i in shown}
        for i in shown[:max_images] if max_images else shown:
            r = records[i]
            name = f"{Path(r.path).stem}_p{p[i]:.2f}.png"
            save_png(tiles[i], tmp / "images" / file_safe(r.category) / file_safe(r.defect_type) / name)
        if shown:
            tracker.log_artifact(tmp / "images", "gradcam")
        ncols = max(1, ecfg.n_per_group)
        if groups:
            cells = [i for g in groups.values() for i in g + [None] * (ncols - len(g))]
            fig = gallery([tiles[i] if i is not None else None for i in cells],
                          [caption(i) if i is not None else "" for i in cells], ncols=ncols,
                          title=f"{what} on {stage} defects, white: ground-truth mask")
            tracker.log_figure(fig, "gradcam/gallery_defects.png")
        if wrong:
            fig = gallery([tiles[i] for i in wrong],
                          [f"{caption(i)} -> {CLASS_NAMES[int(p[i] >= threshold)]}" for i in wrong],
                          ncols=6, title=f"Misclassified on {stage} at threshold {threshold:.3f} "
                                         f"({what})")
            tracker.log_figure(fig, "gradcam/gallery_misclassified.png")
        if rows:
            tracker.log_table_csv(pd.DataFrame(rows), "gradcam/localisation.csv")
    tracker.log_metrics(metrics)
    tracker.log_dict({"stage": stage, "method": method,
                      "layer": ", ".join(layer) if method == "gradcam" else None,
                      "fusion": fusion if method == "gradcam" and len(layer) > 1 else None, "target": target,
                      "pointing_radius_px": ecfg.pointing_radius_px, "pro_fpr_limit": ecfg.pro_fpr_limit,
                      "resolution": "original",
                      "localisation_target": "defect",
                      "threshold": threshold, "n_gallery_defects": sum(map(len, groups.values())),
                      "n_misclassified": len(wrong), "n_masked": len(masked), "metrics": metrics},
                     "gradcam/summary.json")
    log.info("%s on %s: %d maps, %s", what, stage, n_maps,
             ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()) or "no metrics")
    return metrics
