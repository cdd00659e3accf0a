"""`defect-explain`: Grad-CAM overlays for a folder, glob or list of images with a trained model."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def explain(cfg: DictConfig) -> list[Path]:
    """Load the model, write one overlay per image and overlays.csv; returns the overlay paths."""
    from defect_detection.data.images import DEFAULT_MAX_PIXELS, set_max_image_pixels
    from defect_detection.explain.writer import expand_inputs, write_overlays
    from defect_detection.models.loading import load_predictor

    model = str(cfg.model)
    if "://" in model or model.startswith(("runs:/", "models:/")):
        import mlflow

        mlflow.set_tracking_uri(cfg.tracking_uri)
    inputs = OmegaConf.to_container(cfg.inputs) if OmegaConf.is_list(cfg.inputs) else cfg.inputs
    paths = expand_inputs(inputs, bool(cfg.get("follow_symlinks", False)))
    set_max_image_pixels(cfg.get("max_image_pixels", DEFAULT_MAX_PIXELS), key="max_image_pixels")
    predictor = load_predictor(model, device=cfg.device)
    e = cfg.explain
    layer = cfg.get("layer")
    layer = OmegaConf.to_container(layer) if OmegaConf.is_list(layer) else layer
    written = write_overlays(predictor, paths, cfg.output_dir, target=str(e.target), layer=layer,
                             batch_size=int(e.batch_size), alpha=float(e.alpha), colormap=str(e.colormap),
                             fusion=str(e.get("fusion", "mean")))
    log.info("Wrote %d Grad-CAM overlays (%s class) and overlays.csv to %s", len(written), e.target,
             cfg.output_dir)
    return written
