"""`defect-export`: a trained model to ONNX or OpenVINO, fp32 or int8, checked against eager PyTorch.

    defect-export outputs/.../bundle.pt -o model.onnx --images data/mvtec/bottle/test
    defect-export "models:/defect-classifier@champion" -o champion.onnx --images a.png b.png
    defect-export "models:/defect-classifier@champion" format=openvino quantize=int8

The graph takes the normalised float32 N x 3 x h x w batch and returns `logits` and `p_defect`
(temperature and softmax inside); the bundle's meta (size, mean/std, threshold, class order,
geometry) rides in the ONNX metadata_props or the OpenVINO rt_info, so OnnxPredictor and
OpenVinoPredictor decide exactly as Predictor. The file is only published (atomic rename) after
the parity check: fp32 within `tolerance` of eager on the check images; int8 (calibrated on the
run's validation images only) with no validation decision flipped at the threshold.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from defect_detection import UserError
from defect_detection.data.records import IMAGE_SUFFIXES
from defect_detection.destination import check_destination
from defect_detection.models.inference import BasePredictor, Predictor, bundle_geometry, load_predictor
from defect_detection.models.onnx_predictor import (
    INPUT_NAME,
    LOGITS_NAME,
    META_KEY,
    P_DEFECT_NAME,
)
from defect_detection.tracking.mlflow_run import fluent_tracking_uri
from defect_detection.tracking.summary import default_store_uri

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


def noise_images(size, n: int = 4, seed: int = 0) -> list[np.ndarray]:
    """Deterministic random images (size: an int or (h, w)): a parity check when no real
    images are given."""
    h, w = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n)]


FORMATS = {"onnx": ".onnx", "openvino": ".xml"}
QUANTIZE = ("int8",)
CALIBRATION_LIMIT = 300


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

    from defect_detection.evaluate import source_tags
    from defect_detection.evaluation.scores import download_scores

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


def _stage_and_check(reference: Predictor, stage: Path, out: Path, fmt: str, opset: int | None,
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
        return [target], load_predictor(target)
    import openvino as ov

    model = ov.Core().read_model(str(fp32))
    if calibration is not None:
        from defect_detection.models.quantization import quantize_openvino

        model = quantize_openvino(model, calibration)
    model.set_rt_info(json.dumps(meta), [META_KEY])
    ov.save_model(model, str(target), compress_to_fp16=False)
    return [target.with_suffix(".bin"), target], load_predictor(target)


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
        written, candidate = _stage_and_check(reference, stage, out, fmt, opset, x_cal, meta)
        report = parity(reference, candidate, check_images(held, 64) if held else items)
        val_report = parity(reference, candidate, val) if quantize else None
        _gate(report, val_report, tolerance, force, out, fmt, quantize, reference.threshold)
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
        result["pt2_parity"] = parity(reference, _Pt2Predictor(result["pt2"], reference.meta), items)
    return result


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
        candidate = load_predictor(path, runtime=runtime)
        report = parity(reference, candidate, noise_images(reference.geometry.tile_hw))
    _gate(report, None, tolerance, False, Path(f"<{runtime} in memory>"), runtime, None,
          reference.threshold)
    candidate.batch_size = reference.batch_size
    return candidate


def _gate(report: dict, val_report: dict | None, tolerance: float, force: bool, out: Path, fmt: str,
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


class _Pt2Predictor(BasePredictor):
    """The torch.export program behind the parity check of --pt2."""

    def __init__(self, path: str, meta: dict) -> None:
        self.program, self.meta = torch.export.load(path).module(), meta

    def _tile_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self.program(x)[0]


def _words_as_flags(argv: Sequence[str]) -> list[str]:
    """`format=openvino quantize=int8` (the words of the other commands) as --format / --quantize."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        out += [f"--{key}", value] if sep and key in ("format", "quantize") and value else [arg]
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="defect-export", description="Export a trained defect detector to ONNX or OpenVINO (dynamic "
        "batch; fp32, or int8 calibrated on validation images), verified against eager PyTorch before "
        "the file is written.")
    parser.add_argument("source", help="bundle .pt, checkpoint .ckpt, or MLflow URI (runs:/ID/model, "
                        "models:/NAME@champion)")
    parser.add_argument("-o", "--out", help="output .onnx or .xml (default: beside the source, or "
                        "./model.onnx / ./model.xml; -int8 added when quantized)")
    parser.add_argument("--format", default="onnx", choices=list(FORMATS),
                        help="onnx (ONNX Runtime) or openvino (an IR: .xml + .bin); also format=...")
    parser.add_argument("--quantize", default=None, choices=list(QUANTIZE),
                        help="int8 post-training quantisation calibrated on validation images only; "
                        "refused when it flips a validation decision (unless --force)")
    parser.add_argument("--calibration", nargs="*", default=[],
                        help="validation images or folders for int8 (default: the val split of the run "
                        "behind an MLflow URI, from its logged scores)")
    parser.add_argument("--force", action="store_true", help="write int8 even when it flips val decisions")
    parser.add_argument("--images", nargs="*", default=[],
                        help="images or folders for the parity check (default: the test split of the run "
                        "behind an MLflow URI, else random noise images)")
    parser.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE,
                        help=f"fp32: max |delta p_defect| allowed (default {PARITY_TOLERANCE:g})")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--pt2", action="store_true", help="also write a torch.export .pt2 beside the model")
    store = os.environ.get("MLFLOW_TRACKING_URI") or default_store_uri()
    parser.add_argument("--tracking-uri", default=store,
                        help="MLflow store for runs:/ and models:/ URIs (default: MLFLOW_TRACKING_URI, "
                        "else this project's mlruns/)")
    args = parser.parse_args(_words_as_flags(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with fluent_tracking_uri(args.tracking_uri):
            result = export(args.source, args.out, args.images, args.tolerance, args.opset, args.pt2,
                            fmt=args.format, quantize=args.quantize, calibration=args.calibration,
                            force=args.force, tracking_uri=args.tracking_uri)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
