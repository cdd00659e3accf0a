"""Evidence maps at each photo's own resolution: what Inspector.predict(maps=True) returns.

The map is the model's own (Grad-CAM for the classifier, the anomaly map of PatchCore and the
segmenter), computed on the prepared image for the class the model decided, and taken back to the
photo through the input geometry (crop of the letterbox padding, stitching of tiles)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from defect_detection.base import UserError
from defect_detection.explain.gradcam import geometry_cams
from defect_detection.models.inference import as_pil


def original_maps(predictor, items: Sequence, layer: str | list[str]) -> list[np.ndarray]:
    """One H x W float map per item (path, PIL image or array), H x W its own size."""
    if not hasattr(predictor, "net"):
        raise UserError("maps need the PyTorch model: load the bundle, checkpoint or MLflow model with "
                        "runtime=torch (an exported .onnx/.xml carries no map).")
    geometry, threshold = predictor.geometry, predictor.threshold
    temperature = float(predictor.meta.get("temperature", 1.0))
    out = []
    for item in items:
        image = as_pil(item)
        x = predictor._normalise(geometry.prepare(image))
        decided = "defect" if predictor.p_defect([image])[0] >= threshold else "good"
        [prepared], _ = geometry_cams(predictor.net, layer, [x], geometry, target=decided,
                                      threshold=threshold, temperature=temperature)
        out.append(geometry.to_original(prepared, (image.height, image.width)).numpy())
    return out


def small_map_png(predictor, prepared: np.ndarray, hw: tuple[int, int], layer: str | list[str],
                  size: int = 64, decided: str | None = None) -> bytes:
    """A small grey PNG (long side `size`) of the evidence map of one prepared image, for the
    decided class: what the prediction log keeps of flagged and borderline parts. `decided`
    ("good"/"defect"), when the caller already scored the part, saves scoring it again."""
    import io

    from PIL import Image

    geometry, threshold = predictor.geometry, predictor.threshold
    x = predictor._normalise(prepared)
    if decided is None:
        decided = "defect" if predictor.p_defect_prepared([prepared])[0] >= threshold else "good"
    [m], _ = geometry_cams(predictor.net, layer, [x], geometry, target=decided, threshold=threshold,
                           temperature=float(predictor.meta.get("temperature", 1.0)))
    top, left, h, w = geometry.content_box(hw)
    m = m[top:top + h, left:left + w].numpy()
    m = (255 * (m - m.min()) / max(float(m.max() - m.min()), 1e-8)).astype(np.uint8)
    scale = size / max(m.shape)
    image = Image.fromarray(m).resize((max(1, round(m.shape[1] * scale)), max(1, round(m.shape[0] * scale))),
                                      Image.Resampling.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()
