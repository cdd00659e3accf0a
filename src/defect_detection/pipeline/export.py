"""One export job: a trained model to ONNX or OpenVINO, fp32 or int8, after the parity gate.

Which images check parity (given ones, else the test split of the run behind an MLflow URI, else
noise) and calibrate int8 (the run's validation images only, never test); the graphs, int8 and the
gate are models/exporting.py's. The file is only published (atomic rename) after the check.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from defect_detection.base import UserError
from defect_detection.data.records import IMAGE_SUFFIXES
from defect_detection.destination import check_destination
from defect_detection.models.exporting import (
    FORMATS,
    PARITY_TOLERANCE,
    QUANTIZE,
    Pt2Predictor,
    export_pt2,
    gate,
    noise_images,
    parity,
    stage_and_check,
)
from defect_detection.models.inference import Predictor
from defect_detection.models.loading import load_predictor

log = logging.getLogger(__name__)
CALIBRATION_LIMIT = 300


def check_images(paths: Sequence[str | Path], limit: int = 64) -> list[str]:
    """Image files from files and folders (searched recursively), evenly thinned to `limit`."""
    found: list[str] = []
    for item in paths:
        path = Path(item).expanduser()
        if path.is_dir():
            found += sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(str(path))
        else:
            raise UserError(f"Check image path not found: {path}.")
    if paths and not found:
        raise UserError(f"No images ({', '.join(IMAGE_SUFFIXES)}) under {', '.join(map(str, paths))}.")
    if len(found) > limit:
        found = [found[i] for i in np.linspace(0, len(found) - 1, limit).round().astype(int)]
    return found


def _default_out(source: str, fmt: str = "onnx", quantize: str | None = None) -> Path:
    path = Path(source)
    name = (path.stem if path.is_file() else "model") + (f"-{quantize}" if quantize else "")
    return (path.parent if path.is_file() else Path.cwd()) / (name + FORMATS[fmt])


def run_images(source: str, split: str, tracking_uri: str | None = None) -> list[str] | None:
    """The `split` image paths of the training run behind an MLflow model URI (from the scores it
    logged), or None when `source` is a file or the run logged no scores."""
    if not str(source).startswith(("runs:/", "models:/")):
        return None
    import mlflow

    from defect_detection.evaluation.scores import download_scores
    from defect_detection.tracking.sources import source_tags

    uri = tracking_uri or mlflow.get_tracking_uri()
    run_id = source_tags(str(source), uri).get("source_run_id")
    if not run_id:
        return None
    try:
        paths = [str(p) for p in download_scores(uri, run_id, split)["path"]]
    except UserError:
        return None
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise UserError(f"{len(missing)} of the {len(paths)} {split} images of run {run_id} are not on "
                        f"this machine (first: {missing[0]}); pass the images with --calibration "
                        "(int8) or --images (the parity check).")
    return paths


def calibration_images(source: str, given: Sequence[str | Path],
                       tracking_uri: str | None) -> tuple[list[str], str]:
    """The validation images int8 is calibrated and gated on, and where they came from."""
    if given:
        return check_images(given, CALIBRATION_LIMIT), f"given ({', '.join(map(str, given))})"
    found = run_images(source, "val", tracking_uri)
    if not found:
        raise UserError("--quantize int8 calibrates on the run's validation images: export an MLflow "
                        "model URI whose run logged scores/val_scores.csv (runs:/<id>/model, "
                        "models:/<name>@<alias>), or pass those images with --calibration "
                        "FOLDER_OR_FILES (validation images only, never test).")
    return check_images(found, CALIBRATION_LIMIT), "the run's validation split"


def export(source: str, out: str | Path | None = None, images: Sequence[str | Path] = (),
           tolerance: float = PARITY_TOLERANCE, opset: int | None = None, pt2: bool = False,
           fmt: str = "onnx", quantize: str | None = None, calibration: Sequence[str | Path] = (),
           force: bool = False, tracking_uri: str | None = None) -> dict:
    """Export `source` (bundle, checkpoint or MLflow URI) to ONNX or OpenVINO, fp32 or int8, after
    a parity check; returns the report (paths, parity figures, meta). Raises UserError when parity
    fails (fp32: |delta p| over `tolerance`; int8: any flipped validation decision, unless
    `force`); nothing is written then."""
    if fmt not in FORMATS:
        raise UserError(f"format={fmt}: use one of {', '.join(FORMATS)}.")
    if quantize not in (None, *QUANTIZE):
        raise UserError(f"quantize={quantize}: use int8, or leave it out for fp32.")
    out = Path(out) if out else _default_out(str(source), fmt, quantize)
    stage = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    # before the model loads and the export's half minute
    check_destination(out, f"-o {out}", "model file (.onnx, .xml)", stage)
    if out.suffix != FORMATS[fmt]:
        raise UserError(f"-o {out}: a {fmt} model is written as {FORMATS[fmt]}; name the file "
                        f"{out.with_suffix(FORMATS[fmt]).name} (or choose --format).")
    reference = load_predictor(source)
    if not isinstance(reference, Predictor):
        raise UserError(f"{source} is not a PyTorch model: export a bundle, checkpoint or MLflow model.")
    files = check_images(images)
    held = files or run_images(str(source), "test", tracking_uri)
    items = held or noise_images(reference.geometry.tile_hw)
    val, val_from, x_cal = [], None, None
    if quantize:
        val, val_from = calibration_images(str(source), calibration, tracking_uri)
        x_cal = reference.preprocess(val)
    meta = {**reference.meta, "runtime_format": fmt, "precision": quantize or "fp32"}
    if quantize:
        meta["calibration"] = f"{len(val)} images: {val_from}"
    stage.mkdir()
    try:
        written, candidate = stage_and_check(reference, stage, out, fmt, opset, x_cal, meta)
        report = parity(reference, candidate, check_images(held, 64) if held else items)
        val_report = parity(reference, candidate, val) if quantize else None
        gate(report, val_report, tolerance, force, out, fmt, quantize, reference.threshold)
        for path in written:  # the .bin before the .xml that needs it
            os.replace(path, out.with_name(path.name))
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # a failing cleanup must not replace the real error
    result = {"source": str(source), fmt: str(out), "format": fmt, "precision": meta["precision"],
              "size_mb": round(sum(out.with_name(p.name).stat().st_size for p in written) / 1e6, 2),
              "parity": {**report, "tolerance": None if quantize else tolerance,
                         "images": "given" if files else ("the run's test split" if held else
                                                          "random noise (pass --images for real ones)")},
              "meta": meta}
    if val_report is not None:
        result["parity_val"] = {**val_report, "images": val_from, "forced": bool(force)}
    if pt2:
        result["pt2"] = str(export_pt2(reference, out.with_suffix(".pt2")))
        result["pt2_parity"] = parity(reference, Pt2Predictor(result["pt2"], reference.meta), items)
    return result
