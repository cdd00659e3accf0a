"""The MLflow pyfunc flavour of the inference bundle, safe to put behind `mlflow models serve`.

A served model must not read whatever server path a client names (a file-existence oracle), so
when served it reads paths only under the allowed roots (env DEFECT_SERVE_ROOTS, os.pathsep-
separated, or model_config={"allowed_roots": [...]}; none by default) and takes the image itself
as base64 (`image_b64`). model_config={"runtime": "openvino"} (or "onnx") scores with that
runtime. Each row gets a decision or an `error`, so one bad row does not fail
the request. Loaded in-process (mlflow.pyfunc.load_model) paths are read as the caller could
read them anyway, unless allowed roots are configured.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from defect_detection import UserError

PIP_REQUIREMENTS = ["torch", "torchvision", "timm", "pillow", "pandas", "numpy", "mlflow"]
ROOTS_ENV = "DEFECT_SERVE_ROOTS"
# What a load may override (MLflow lets model_config, or the MLFLOW_PYFUNC_INFERENCE_CONFIG JSON
# when served, change only keys logged with the model). runtime: torch, onnx or openvino; the
# bundle is then exported in memory (fp32) and parity-checked before it scores.
MODEL_CONFIG = {"runtime": "torch"}
# Set by MLflow's scoring server (mlflow/pyfunc/scoring_server) before it serves requests.
_SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
REFUSED = ("path refused: this server reads paths only under its allowed roots ({}); "
           "send the image itself as image_b64")


class DefectPyfunc(mlflow.pyfunc.PythonModel):
    """predict() takes a DataFrame with an `image_b64`, `path` or `image` column, a list of paths,
    or image arrays; returns p_defect, is_defect, decision, threshold and error per row."""

    def load_context(self, context) -> None:
        from defect_detection.models.inference import load_predictor

        config = getattr(context, "model_config", None) or {}
        runtime = config.get("runtime") or "torch"
        self.predictor = load_predictor(context.artifacts["bundle"], runtime=runtime)
        self.allowed_roots = config.get("allowed_roots")

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        items = _items(model_input)
        images, errors = [], []
        roots = allowed_roots(getattr(self, "allowed_roots", None))
        for item in items:
            try:
                images.append(_image(item, roots))
                errors.append(None)
            except UserError as err:
                images.append(None)
                errors.append(str(err))
        ok = [i for i, im in enumerate(images) if im is not None]
        scored = self.predictor.predict([images[i] for i in ok])
        out = pd.DataFrame({"p_defect": np.nan, "is_defect": False, "decision": "error",
                            "threshold": self.predictor.threshold, "error": errors}, index=range(len(items)))
        for column in ("p_defect", "is_defect", "decision"):
            out.loc[ok, column] = scored[column].to_numpy()
        out["is_defect"] = out["is_defect"].astype(bool)
        if isinstance(model_input, pd.DataFrame) and "path" in model_input.columns:
            out.insert(0, "path", list(model_input["path"]))
        return out


class _B64(str):
    """A base64-encoded image file (a row of the image_b64 column)."""


def allowed_roots(configured=None) -> list[Path] | None:
    """The folders paths may be read from; None: any path (in-process use without a root set)."""
    if configured is None and os.environ.get(ROOTS_ENV):
        configured = [r for r in os.environ[ROOTS_ENV].split(os.pathsep) if r]
    if configured is not None:
        return [Path(r).expanduser().resolve() for r in configured]
    serving = os.environ.get(_SERVING_ENV, "").lower() == "true"
    return [] if serving else None


def _image(item, roots: list[Path] | None):
    from defect_detection.data.images import load_rgb_bytes
    from defect_detection.models.inference import as_pil

    if isinstance(item, _B64):
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise UserError("image_b64: not valid base64 (send the image file's bytes, "
                            "base64-encoded)") from None
        return load_rgb_bytes(data, "image_b64")
    if isinstance(item, (str, Path)) and roots is not None:
        resolved = Path(os.path.realpath(Path(item).expanduser()))
        if not any(resolved == r or r in resolved.parents for r in roots):
            # the same line whether or not the path exists: no existence oracle
            raise UserError(REFUSED.format(", ".join(map(str, roots)) or f"none set; {ROOTS_ENV}"))
    return as_pil(item)


def _items(model_input) -> list:
    if isinstance(model_input, pd.DataFrame):
        if "image_b64" in model_input.columns:
            b64 = list(model_input["image_b64"])
            paths = list(model_input["path"]) if "path" in model_input.columns else [None] * len(b64)
            return [_B64(b) if isinstance(b, str) and b else p for b, p in zip(b64, paths)]
        if "path" in model_input.columns:
            return list(model_input["path"])
        if "image" in model_input.columns:
            return [np.asarray(v, dtype=np.uint8) for v in model_input["image"]]
        raise UserError("DataFrame input needs an 'image_b64', 'path' or 'image' column.")
    if isinstance(model_input, np.ndarray):
        return [model_input] if model_input.ndim == 3 else list(model_input)
    if isinstance(model_input, (str, Path)):
        return [model_input]
    return list(model_input)


def log_pyfunc(bundle_path: str | Path, name: str = "model"):
    """Log the bundle as a pyfunc model on the active run; returns MLflow's ModelInfo."""
    return mlflow.pyfunc.log_model(
        name=name, python_model=DefectPyfunc(), artifacts={"bundle": str(bundle_path)},
        pip_requirements=PIP_REQUIREMENTS, model_config=MODEL_CONFIG,
    )
