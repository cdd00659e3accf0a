"""ONNX Runtime inference with the same interface and decisions as the eager Predictor.

The exported model (`defect-export`) carries the bundle's meta (image size, mean/std,
threshold, temperature, class order) in its metadata_props under `defect_meta`, so this file
needs neither the bundle nor the backbone code: only onnxruntime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from defect_detection.base import UserError
from defect_detection.models.inference import BasePredictor

META_KEY = "defect_meta"
INPUT_NAME, LOGITS_NAME, P_DEFECT_NAME = "image", "logits", "p_defect"
# The graph scores network inputs (whole images, or tiles with input=tiles); cutting images into
# tiles and pooling tile logits into the image score happen in BasePredictor, as in evaluation.


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, then the CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxPredictor(BasePredictor):
    """Scores images with an exported .onnx model: p_defect / predict as Predictor does."""

    def __init__(self, model_path: str | Path, batch_size: int = 32,
                 providers: list[str] | None = None, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise UserError("ONNX inference needs onnxruntime: pip install onnxruntime.") from err
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise UserError(f"ONNX model not found: {path}. Export one with `defect-export MODEL`.")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=providers or default_providers())
        except Exception as err:  # onnxruntime raises its own exception types for bad files
            raise UserError(f"{path} is not a loadable ONNX model ({err}). Export it again with "
                            "`defect-export`.") from err
        text = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if not text:
            raise UserError(f"{path} has no '{META_KEY}' metadata: it was not written by defect-export. "
                            "Export the model with `defect-export` so preprocessing and threshold "
                            "travel with it.")
        self.meta = json.loads(text)
        self.path, self.batch_size = path, batch_size

    def _tile_logits(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        (logits,) = self.session.run([LOGITS_NAME], {INPUT_NAME: batch})
        return torch.from_numpy(logits.astype(np.float32))
