"""`defect-export`: a trained model to ONNX (dynamic batch), checked against eager PyTorch.

    defect-export outputs/.../bundle.pt -o model.onnx --images data/mvtec/bottle/test
    defect-export "models:/defect-classifier@champion" -o champion.onnx --images a.png b.png

The graph takes the normalised float32 N x 3 x S x S batch and returns `logits` and
`p_defect` (temperature and softmax inside); the bundle's meta (size, mean/std, threshold,
class order) rides in metadata_props, so OnnxPredictor decides exactly as Predictor. The file
is only published (atomic rename) after |p_onnx - p_torch| <= tolerance on the check images.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from defect_detection import UserError
from defect_detection.data.records import IMAGE_SUFFIXES
from defect_detection.models.inference import Predictor, bundle_geometry, load_predictor
from defect_detection.models.onnx_predictor import (
    INPUT_NAME,
    LOGITS_NAME,
    META_KEY,
    P_DEFECT_NAME,
    OnnxPredictor,
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


def export_onnx(predictor: Predictor, out: str | Path, opset: int | None = None) -> Path:
    """Write the ONNX model (dynamic batch axis `batch`, meta in metadata_props) to `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _quiet(*CHATTY_LOGGERS):
        program = torch.onnx.export(
            _scoring_net(predictor), (_example(predictor.meta),), dynamo=True, verbose=False,
            input_names=[INPUT_NAME], output_names=[LOGITS_NAME, P_DEFECT_NAME],
            dynamic_shapes={"image": {0: batch}}, opset_version=opset, optimize=True)
    program.model.metadata_props[META_KEY] = json.dumps(predictor.meta)
    geometry = bundle_geometry(predictor.meta)
    h, w = geometry.tile_hw
    program.model.metadata_props["input"] = (
        f"{INPUT_NAME}: float32 N x 3 x {h} x {w} RGB, pixels/255 then (x - mean) / std (mean, std in "
        f"defect_meta); images prepared by the input geometry ({geometry.describe()})"
        + ("; N = tiles, image score pooled from tile logits (defect_meta.aggregate)"
           if geometry.name == "tiles" else ""))
    program.save(out, external_data=False)
    return out


def export_pt2(predictor: Predictor, out: str | Path) -> Path:
    """The same ScoringNet as a torch.export program (.pt2, dynamic batch); meta as an extra file."""
    out = Path(out)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(_scoring_net(predictor), (_example(predictor.meta),),
                                  dynamic_shapes={"image": {0: batch}})
    torch.export.save(program, out, extra_files={f"{META_KEY}.json": json.dumps(predictor.meta)})
    return out


def parity(reference: Predictor, candidate, items: Sequence, batch_sizes: Sequence[int] = (1, 3)) -> dict:
    """max |delta p_defect| and decision flips of `candidate` (anything with _scores) against
    eager fp32 PyTorch on the same preprocessed images, in batches of each size given (the
    dynamic batch axis is exercised with every size), plus the whole set as one batch."""
    x = reference.preprocess(list(items))
    bf16 = reference.bf16
    reference.bf16 = False
    try:
        p_ref = reference._scores(x)
    finally:
        reference.bf16 = bf16
    worst, flips, sizes = 0.0, 0, sorted({*batch_sizes, len(x)})
    for size in sizes:
        p = np.concatenate([candidate._scores(x[i:i + size]) for i in range(0, len(x), size)])
        worst = max(worst, float(np.abs(p - p_ref).max()))
        flips = max(flips, int(((p >= reference.threshold) != (p_ref >= reference.threshold)).sum()))
    return {"max_abs_diff_p_defect": worst, "decision_flips": flips, "n_images": len(x),
            "batch_sizes": sizes}


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


def _default_out(source: str) -> Path:
    path = Path(source)
    return path.with_suffix(".onnx") if path.is_file() else Path.cwd() / "model.onnx"


def check_destination(out: Path, probe: Path) -> None:
    """UserError unless `out` can be written: its folder is created, `probe` written and removed."""
    if out.is_dir():
        raise UserError(f"-o {out} is a folder: name the .onnx file to write.")
    blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"-o {out}: {blocker} is a file, not a folder; choose another output path.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"-o {out} cannot be written ({err.strerror or type(err).__name__}: "
                        f"{err.filename or out.parent}); choose a writable output path.") from None


def export(source: str, out: str | Path | None = None, images: Sequence[str | Path] = (),
           tolerance: float = PARITY_TOLERANCE, opset: int | None = None, pt2: bool = False) -> dict:
    """Export `source` (bundle, checkpoint or MLflow URI) to ONNX after a parity check; returns
    the report (paths, parity figures, meta). Raises UserError when parity fails."""
    out = Path(out) if out else _default_out(str(source))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    check_destination(out, tmp)  # before the model loads and the export's half minute
    reference = load_predictor(source)
    if not isinstance(reference, Predictor):
        raise UserError(f"{source} is not a PyTorch model: export a bundle, checkpoint or MLflow model.")
    files = check_images(images)
    items = files or noise_images(reference.geometry.tile_hw)
    try:
        export_onnx(reference, tmp, opset)
        report = parity(reference, OnnxPredictor(tmp), items)
        if report["max_abs_diff_p_defect"] > tolerance:
            worst = report["max_abs_diff_p_defect"]
            raise UserError(f"ONNX parity failed: max |delta p_defect| = {worst:.2e} > {tolerance:g}"
                            f" on {report['n_images']} images; nothing was written to {out}. "
                            "Try another --opset or report the backbone.")
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):  # a failing cleanup must not replace the real error
            tmp.unlink(missing_ok=True)
    result = {"source": str(source), "onnx": str(out), "onnx_mb": round(out.stat().st_size / 1e6, 2),
              "parity": {**report, "tolerance": tolerance,
                         "images": "given" if files else "random noise (pass --images for real ones)"},
              "meta": reference.meta}
    if pt2:
        result["pt2"] = str(export_pt2(reference, out.with_suffix(".pt2")))
        program = torch.export.load(result["pt2"]).module()

        class _Pt2:
            @staticmethod
            def _scores(x: torch.Tensor) -> np.ndarray:
                with torch.inference_mode():
                    return program(x)[1].numpy()

        result["pt2_parity"] = parity(reference, _Pt2, items)
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="defect-export", description="Export a trained defect classifier to ONNX (dynamic batch), "
        "verified against eager PyTorch before the file is written.")
    parser.add_argument("source", help="bundle .pt, checkpoint .ckpt, or MLflow URI (runs:/ID/model, "
                        "models:/NAME@champion)")
    parser.add_argument("-o", "--out", help="output .onnx (default: beside the source, or ./model.onnx)")
    parser.add_argument("--images", nargs="*", default=[],
                        help="images or folders for the parity check (default: random noise images)")
    parser.add_argument("--tolerance", type=float, default=PARITY_TOLERANCE,
                        help=f"max |delta p_defect| allowed (default {PARITY_TOLERANCE:g})")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--pt2", action="store_true", help="also write a torch.export .pt2 beside the .onnx")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = export(args.source, args.out, args.images, args.tolerance, args.opset, args.pt2)
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
    json.dump(result, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
