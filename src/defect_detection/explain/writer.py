"""Grad-CAM overlays for image files scored by an inference Predictor (what explain and predict call)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from defect_detection.base import CLASS_NAMES, UserError
from defect_detection.data.validate import checked_image_paths
from defect_detection.explain.gradcam import geometry_cams, gradcam_layer_for
from defect_detection.explain.overlay import denormalise, overlay, save_png
from defect_detection.models.inference import as_pil


def expand_inputs(inputs: str | Path | Sequence[str | Path], follow_symlinks: bool = False) -> list[Path]:
    """Image files from folders (recursive), glob patterns and file paths, as given (not resolved),
    in order, without duplicates; a symlink leaving its input root, a broken link or a loop is a
    UserError naming it (data/validate.safe_image_paths)."""
    entries = input_entries(inputs, follow_symlinks)
    for _, reason in entries:
        if reason:
            raise UserError(reason)
    return [p for p, _ in entries]


def input_entries(inputs: str | Path | Sequence[str | Path],
                  follow_symlinks: bool = False) -> list[tuple[Path, str | None]]:
    """Every image the inputs name, as given, with why it cannot be used (None when it can): a
    missing input, one without images, and symlinks out of the input root, broken or looping,
    each get an entry with the reason instead of vanishing."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    found: dict[Path, str | None] = {}
    for item in items:
        for path, reason in checked_image_paths(item, follow_symlinks):
            found.setdefault(path, reason)
    return list(found.items())


def _relative_names(paths: Sequence[Path]) -> list[Path]:
    """Paths relative to their common folder, so same-named files in different folders stay apart."""
    parents = [str(p.parent) for p in paths]
    root = Path(os.path.commonpath(parents)) if parents else Path()
    return [p.relative_to(root) for p in paths]


def write_overlays(predictor, paths: Sequence[str | Path], out_dir: str | Path, *, target: str = "predicted",
                   layer: str | list[str] | None = None, batch_size: int = 16, alpha: float = 0.5,
                   colormap: str = "jet", fusion: str = "mean") -> list[Path]:
    """Write `<out_dir>/<relative path>_gradcam.png` per image (at the model's input size) plus
    `overlays.csv` (p_defect, decision, explained class); returns the overlay paths in input order.

    layer: a dotted path such as net.layer4, or a list of them (fused by `fusion`); default: the
    backbone config's gradcam_layer.
    """
    paths = [Path(p) for p in paths]
    out_dir = Path(out_dir)
    meta = predictor.meta
    layer = layer or gradcam_layer_for(meta["backbone"])
    names = _relative_names([p.resolve() for p in paths])
    written, rows = [], []
    geometry = predictor.geometry
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        pils = [as_pil(p) for p in chunk]
        prepared = [predictor._normalise(geometry.prepare(im)) for im in pils]
        p_images = predictor.p_defect(pils)  # the image decision, tiles pooled as in evaluation
        cam_args = {"threshold": predictor.threshold, "batch_size": batch_size, "fusion": fusion,
                    "temperature": float(meta.get("temperature", 1.0))}
        if target == "predicted" and geometry.name == "tiles":
            # the image's decision (pooled tiles) picks the class explained on all of its tiles
            maps, seconds = [], 0.0
            for k, x in enumerate(prepared):
                cls = "defect" if p_images[k] >= predictor.threshold else "good"
                m, secs = geometry_cams(predictor.net, layer, [x], geometry, target=cls, **cam_args)
                maps, seconds = maps + m, seconds + secs
        else:
            maps, seconds = geometry_cams(predictor.net, layer, prepared, geometry, target=target, **cam_args)
        for k, path in enumerate(chunk):
            name = names[start + k]
            top, left, h, w = geometry.content_box((pils[k].height, pils[k].width))
            image = denormalise(prepared[k][None], meta["mean"], meta["std"])[0][top:top + h, left:left + w]
            cam = maps[k][top:top + h, left:left + w].numpy()
            dest = save_png(overlay(image, cam, alpha, colormap),
                            out_dir / name.parent / f"{name.stem}_gradcam.png")
            p = float(p_images[k])
            is_defect = p >= predictor.threshold
            cls = ({"defect": 1, "good": 0}.get(target, int(is_defect)) if isinstance(target, str)
                   else int(target))
            written.append(dest)
            rows.append({"path": str(path), "overlay": str(dest), "p_defect": p,
                         "decision": CLASS_NAMES[int(is_defect)],
                         "explained_class": CLASS_NAMES[cls],
                         "threshold": predictor.threshold,
                         "cam_ms_per_image": 1000.0 * seconds / max(1, len(chunk))})
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out_dir / "overlays.csv", index=False)
    return written
