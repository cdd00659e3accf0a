"""Any model a user names, as a predictor: a bundle, a checkpoint, an MLflow URI or an exported file."""

from __future__ import annotations

from pathlib import Path

from defect_detection.base import UserError
from defect_detection.devices import check_device
from defect_detection.models.exported import EXPORTED, load_exported
from defect_detection.models.inference import BasePredictor, Predictor
from defect_detection.models.store import fetched_bundle, is_store_uri

RUNTIMES = ("auto", "torch", "onnx", "openvino")


def load_predictor(source: str | Path, device: str = "cpu", *, bf16: bool = False,
                   batch_size: int = 32, runtime: str = "auto") -> BasePredictor:
    """A predictor from a bundle (.pt), a checkpoint (.ckpt), an MLflow model URI (runs:/,
    models:/) or an exported model (.onnx: ONNX Runtime; .xml: OpenVINO; `defect-export`).

    runtime: auto (by what `source` is), torch, onnx or openvino. A PyTorch source asked to run
    on onnx/openvino is exported in memory (fp32, parity-checked against eager first), so it
    decides as evaluation did; int8 artefacts come from `defect-export --quantize int8`.
    """
    text = str(source)
    check_device(device)
    if runtime not in RUNTIMES:
        raise UserError(f"runtime={runtime}: use one of {', '.join(RUNTIMES)}.")
    suffix = Path(text).suffix.lower() if "://" not in text else ""
    if suffix in EXPORTED:
        kind = EXPORTED[suffix]
        runtime = kind if runtime == "auto" else runtime
        if runtime == "torch" or (kind == "openvino" and runtime == "onnx"):
            raise UserError(f"{source} is an exported {kind} model: it runs with runtime="
                            f"{'onnx or openvino' if kind == 'onnx' else 'openvino'} (or auto); "
                            "runtime=torch needs the bundle, checkpoint or MLflow model.")
        return load_exported(source, runtime, batch_size)
    if is_store_uri(text):  # the bundle alone: nothing stored with the model is run
        with fetched_bundle(text) as bundle:
            predictor = Predictor(bundle, device=device, batch_size=batch_size, bf16=bf16)
    else:
        predictor = Predictor(source, device=device, batch_size=batch_size, bf16=bf16)
    if runtime in ("auto", "torch"):
        return predictor
    from defect_detection.models.exporting import exported_predictor

    return exported_predictor(predictor, runtime)
