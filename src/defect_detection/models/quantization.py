"""Post-training int8 quantisation of an exported model, calibrated on validation images only.

NNCF quantises both formats (the OpenVINO IR, and QDQ ONNX for ONNX Runtime). ONNX Runtime's own
static quantiser was tried first on a trained bottle model (docs/results/runtimes.md): in the 8
settings tried (MinMax, Percentile, Entropy calibration; per-tensor and per-channel weights; QDQ
and QOperator) it moved p_defect by up to 0.9 and flipped 40-46 of 59 validation decisions, where
NNCF moved it by 0.26 and flipped none; the gate in defect-export would refuse the former.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from defect_detection.models.onnx_predictor import INPUT_NAME


def _samples(x: torch.Tensor) -> list:
    return [x[i:i + 1].numpy() for i in range(len(x))]


def quantize_onnx(model, calibration: torch.Tensor):
    """int8 QDQ ONNX (onnx.ModelProto) from the fp32 `model`, calibrated by NNCF on the
    `calibration` network inputs."""
    with _quiet_nncf():
        import nncf

        dataset = nncf.Dataset([{INPUT_NAME: s} for s in _samples(calibration)])
        return nncf.quantize(model, dataset, subset_size=len(calibration))


def quantize_openvino(model, calibration: torch.Tensor):
    """int8 OpenVINO model (ov.Model) from the fp32 `model`, calibrated by NNCF on `calibration`."""
    with _quiet_nncf():
        import nncf

        return nncf.quantize(model, nncf.Dataset(_samples(calibration)), subset_size=len(calibration))


@contextlib.contextmanager
def _quiet_nncf():
    """NNCF logs INFO lines and draws progress bars; keep warnings only."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
