"""`defect-export`: a trained model to ONNX or OpenVINO, fp32 or int8, checked against eager PyTorch.

    defect-export outputs/.../bundle.pt -o model.onnx --images data/mvtec/bottle/test
    defect-export "models:/defect-classifier@champion" -o champion.onnx --images a.png b.png
    defect-export "models:/defect-classifier@champion" format=openvino quantize=int8

What it writes and how it is checked: pipeline/export.py and models/exporting.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from defect_detection.base import UserError
from defect_detection.config import version_line
from defect_detection.models.exporting import FORMATS, PARITY_TOLERANCE, QUANTIZE
from defect_detection.tracking.mlflow_run import fluent_tracking_uri
from defect_detection.tracking.summary import default_store_uri


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
    parser.add_argument("--version", action="version", version=version_line())
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
            from defect_detection.api import export

            result = export(args.source, args.out, args.images, args.tolerance, args.opset, args.pt2,
                            fmt=args.format, quantize=args.quantize, calibration=args.calibration,
                            force=args.force, tracking_uri=args.tracking_uri)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
