"""OpenVINO inference with the same interface and decisions as the eager Predictor.

Reads the IR `defect-export --format openvino` writes (model.xml + model.bin, the bundle's meta
in the IR's rt_info under `defect_meta`) or an exported .onnx directly (meta from its
metadata_props). Cutting images into tiles and pooling tile logits happen in BasePredictor, as in
evaluation, so the decision is the one evaluation made.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from defect_detection.base import UserError
from defect_detection.models.inference import BasePredictor
from defect_detection.models.onnx_predictor import INPUT_NAME, LOGITS_NAME, META_KEY

# LATENCY: one request uses every thread (a line camera, batch 1); THROUGHPUT: parallel streams.
HINTS = ("LATENCY", "THROUGHPUT")


def _onnx_meta(path: Path) -> str | None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == META_KEY), None)


def read_meta(model, path: Path) -> dict:
    """The bundle meta an exported model carries; one clear error when it carries none."""
    text = None
    if path.suffix == ".onnx":
        text = _onnx_meta(path)
    elif model.has_rt_info([META_KEY]):
        text = model.get_rt_info([META_KEY]).astype(str)
    if not text:
        raise UserError(f"{path} has no '{META_KEY}' metadata: it was not written by defect-export. "
                        "Export the model with `defect-export MODEL --format openvino` so "
                        "preprocessing and threshold travel with it.")
    return json.loads(text)


class OpenVinoPredictor(BasePredictor):
    """Scores images with an OpenVINO IR (.xml) or ONNX file on the CPU: p_defect / predict as
    Predictor does."""

    def __init__(self, model_path: str | Path, batch_size: int = 32, threads: int | None = None,
                 hint: str = "LATENCY", device: str = "CPU") -> None:
        try:
            import openvino as ov
        except ImportError as err:
            raise UserError("OpenVINO inference needs the openvino package: pip install openvino.") from err
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise UserError(f"OpenVINO model not found: {path}. Export one with "
                            "`defect-export MODEL --format openvino`.")
        if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
            raise UserError(f"{path.with_suffix('.bin')} is missing: an OpenVINO IR is the .xml and the "
                            ".bin beside it; copy both, or export again.")
        if hint.upper() not in HINTS:
            raise UserError(f"hint={hint}: use one of {', '.join(HINTS)}.")
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as err:  # OpenVINO raises RuntimeError subclasses for bad files
            raise UserError(f"{path} is not a loadable OpenVINO/ONNX model ({err}). Export it again "
                            "with `defect-export --format openvino`.") from err
        self.meta = read_meta(model, path)
        # OpenVINO runs float layers in bf16 by default on CPUs with AMX / AVX-512 bf16 (p_defect
        # moved by up to 0.02 on a Xeon with AMX): pin f32 so the IR decides as eager
        # PyTorch did. int8 layers of a quantised IR stay int8.
        config = {"PERFORMANCE_HINT": hint.upper(), "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(model, device, config)
        self.request = self.compiled.create_infer_request()
        self.path, self.batch_size = path, batch_size

    def _tile_logits(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        result = self.request.infer({INPUT_NAME: batch})
        logits = result[self.compiled.output(LOGITS_NAME)]
        return torch.from_numpy(np.array(logits, dtype=np.float32))
