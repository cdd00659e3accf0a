"""Exporting a PyTorch predictor: the ONNX / OpenVINO / torch.export graphs, int8, and the parity
check against eager PyTorch that every exported model passes before it is used or written.

The graph takes the normalised float32 N x 3 x h x w batch and returns `logits` and `p_defect`
(temperature and softmax inside); the bundle's meta (size, mean/std, threshold, class order,
geometry) rides in the ONNX metadata_props or the OpenVINO rt_info, so OnnxPredictor and
OpenVinoPredictor decide exactly as Predictor. Which images a parity check or int8 calibration
uses is the export job's concern (pipeline/export.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from defect_detection.base import UserError
from defect_detection.models.exported import load_exported
from defect_detection.models.inference import BasePredictor, Predictor, bundle_geometry
from defect_detection.models.onnx_predictor import (
    INPUT_NAME,
    LOGITS_NAME,
    META_KEY,
    P_DEFECT_NAME,
)

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
# The graph optimiser logs one INFO line per rewrite (hundreds); Hydra apps log INFO to the console.
CHATTY_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")


@contextlib.contextmanager
def _quiet(*names: str):
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class ScoringNet(nn.Module):
    """net -> (logits, p_defect): the decision-relevant output computed inside the graph."""

    def __init__(self, net: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.net, self.temperature = net, float(temperature)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(image)
        return logits, (logits / self.temperature).softmax(dim=1)[:, 1]


def _scoring_net(predictor: Predictor) -> ScoringNet:
    net = copy.deepcopy(predictor.net).cpu().float().eval()
    net = net.to(memory_format=torch.contiguous_format)
    return ScoringNet(net, predictor.meta.get("temperature", 1.0)).eval()


def _example(meta: dict, batch: int = 2) -> torch.Tensor:
    # batch 2, not 1: torch.export specialises sizes 0 and 1, which would pin the batch axis
    return torch.zeros(batch, 3, *bundle_geometry(meta).tile_hw)


def export_onnx(predictor: Predictor, out: str | Path, opset: int | None = None,
                meta: dict | None = None) -> Path:
    """Write the ONNX model (dynamic batch axis `batch`, `meta` (default: the predictor's) in
    metadata_props) to `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _quiet(*CHATTY_LOGGERS):
        program = torch.onnx.export(
            _scoring_net(predictor), (_example(predictor.meta),), dynamo=True, verbose=False,
            input_names=[INPUT_NAME], output_names=[LOGITS_NAME, P_DEFECT_NAME],
            dynamic_shapes={"image": {0: batch}}, opset_version=opset, optimize=True)
    meta = meta or predictor.meta
    program.model.metadata_props[META_KEY] = json.dumps(meta)
    program.model.metadata_props["input"] = _input_note(meta)
    program.save(out, external_data=False)
    return out


def _input_note(meta: dict) -> str:
    """What the graph's input is, for someone opening the file in Netron or a runtime of their own."""
    geometry = bundle_geometry(meta)
    h, w = geometry.tile_hw
    return (f"{INPUT_NAME}: float32 N x 3 x {h} x {w} RGB, pixels/255 then (x - mean) / std (mean, std in "
            f"defect_meta); images prepared by the input geometry ({geometry.describe()})"
            + ("; N = tiles, image score pooled from tile logits (defect_meta.aggregate)"
               if geometry.name == "tiles" else ""))


def export_pt2(predictor: Predictor, out: str | Path) -> Path:
    """The same ScoringNet as a torch.export program (.pt2, dynamic batch); meta as an extra file."""
    out = Path(out)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(_scoring_net(predictor), (_example(predictor.meta),),
                                  dynamic_shapes={"image": {0: batch}})
    torch.export.save(program, out, extra_files={f"{META_KEY}.json": json.dumps(predictor.meta)})
    return out


def parity(reference: Predictor, candidate, items: Sequence, batch_sizes: Sequence[int] = (1, 3)) -> dict:
    """max |delta p_defect| and decision flips of `candidate` (any BasePredictor) against eager
    fp32 PyTorch on the same prepared network inputs, in batches of each size given (the dynamic
    batch axis is exercised with every size) and as one batch. Figures are per image: with
    input=tiles the tile logits are pooled as the model pools them before p and the decision."""
    x, counts = reference.prepare(list(items))
    bf16 = reference.bf16
    reference.bf16 = False
    try:
        p_ref = reference._p_of(reference._tile_logits(x), counts)
    finally:
        reference.bf16 = bf16
    worst, flips, sizes = 0.0, 0, sorted({*batch_sizes, len(x)})
    for size in sizes:
        logits = torch.cat([candidate._tile_logits(x[i:i + size]) for i in range(0, len(x), size)])
        p = candidate._p_of(logits, counts)
        worst = max(worst, float(np.abs(p - p_ref).max()))
        flips = max(flips, int(((p >= reference.threshold) != (p_ref >= reference.threshold)).sum()))
    return {"max_abs_diff_p_defect": worst, "decision_flips": flips, "n_images": len(p_ref),
            "n_inputs": len(x), "batch_sizes": sizes}


def noise_images(size, n: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Deterministic random images (size: an int or (h, w)): a parity check when no real
    images are given."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


FORMATS = {"onnx": ".onnx", "openvino": ".xml"}
QUANTIZE = ("int8",)


def stage_and_check(reference: Predictor, stage: Path, out: Path, fmt: str, opset: int | None,
                     calibration: torch.Tensor | None, meta: dict) -> tuple[list[Path], object]:
    """Write the artefact (and, for OpenVINO, its .bin) into `stage`; return its files and a
    predictor reading them."""
    fp32 = export_onnx(reference, stage / "fp32.onnx", opset, meta)
    target = stage / out.name
    if fmt == "onnx":
        if calibration is None:
            os.replace(fp32, target)
        else:
            import onnx

            from defect_detection.models.quantization import quantize_onnx

            model = quantize_onnx(onnx.load(str(fp32)), calibration)
            del model.metadata_props[:]
            for key, value in {META_KEY: json.dumps(meta), "input": _input_note(meta)}.items():
                model.metadata_props.add(key=key, value=value)
            onnx.save(model, str(target))
        return [target], load_exported(target, "onnx")
    import openvino as ov

    model = ov.Core().read_model(str(fp32))
    if calibration is not None:
        from defect_detection.models.quantization import quantize_openvino

        model = quantize_openvino(model, calibration)
    model.set_rt_info(json.dumps(meta), [META_KEY])
    ov.save_model(model, str(target), compress_to_fp16=False)
    return [target.with_suffix(".bin"), target], load_exported(target, "openvino")


def exported_predictor(reference: Predictor, runtime: str,
                       tolerance: float = PARITY_TOLERANCE) -> BasePredictor:
    """`reference` exported in memory (fp32) and loaded in `runtime` (onnx or openvino), after
    the parity check on noise images; the files are gone once the runtime has read them."""
    import tempfile

    if runtime not in FORMATS:
        raise UserError(f"runtime={runtime}: an exported runtime is onnx or openvino.")
    meta = {**reference.meta, "runtime_format": runtime, "precision": "fp32"}
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(reference, Path(tmp) / "model.onnx", meta=meta)
        candidate = load_exported(path, runtime)
        report = parity(reference, candidate, noise_images(reference.geometry.tile_hw))
    gate(report, None, tolerance, False, Path(f"<{runtime} in memory>"), runtime, None,
          reference.threshold)
    candidate.batch_size = reference.batch_size
    return candidate


def gate(report: dict, val_report: dict | None, tolerance: float, force: bool, out: Path, fmt: str,
          quantize: str | None, threshold: float) -> None:
    if val_report is None:
        worst = report["max_abs_diff_p_defect"]
        if worst > tolerance:
            raise UserError(f"{fmt.upper()} parity failed: max |delta p_defect| = {worst:.2e} > "
                            f"{tolerance:g} on {report['n_images']} images; nothing was written to "
                            f"{out}. Try another --opset or report the backbone.")
        return
    flips = val_report["decision_flips"]
    if report["decision_flips"]:
        log.warning("%s flips %d of %d held-image decisions (max |delta p_defect| %.3f); validation: %d "
                    "flips. Check the held images before deploying it.", quantize,
                    report["decision_flips"], report["n_images"], report["max_abs_diff_p_defect"], flips)
    if flips and not force:
        raise UserError(
            f"{quantize} changes {flips} of {val_report['n_images']} validation decisions at the threshold "
            f"{threshold:.4f} (max |delta p_defect| {val_report['max_abs_diff_p_defect']:.3f} "
            f"on val, {report['max_abs_diff_p_defect']:.3f} with {report['decision_flips']} flips on "
            f"{report['n_images']} held images); nothing was written to {out}. Use fp32, or --force "
            "to write it anyway.")


class Pt2Predictor(BasePredictor):
    """The torch.export program behind the parity check of --pt2."""

    def __init__(self, path: str, meta: dict) -> None:
        self.program, self.meta = torch.export.load(path).module(), meta

    def _tile_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.program(x)[0]
