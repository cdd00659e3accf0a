"""A model written by `defect-export` (.onnx: ONNX Runtime; .xml: OpenVINO), loaded for scoring."""

from __future__ import annotations

from pathlib import Path

from defect_detection.models.inference import BasePredictor

EXPORTED = {".onnx": "onnx", ".xml": "openvino"}


def load_exported(path: str | Path, runtime: str, batch_size: int = 32) -> BasePredictor:
    """`path` in `runtime` (onnx or openvino; an .onnx file runs in either)."""
    if runtime == "openvino":
        from defect_detection.models.openvino_predictor import OpenVinoPredictor

        return OpenVinoPredictor(path, batch_size=batch_size)
    from defect_detection.models.onnx_predictor import OnnxPredictor

    return OnnxPredictor(path, batch_size=batch_size)
