"""The MLflow pyfunc flavour of the inference bundle."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

PIP_REQUIREMENTS = ["torch", "torchvision", "timm", "pillow", "pandas", "numpy", "mlflow"]


class DefectPyfunc(mlflow.pyfunc.PythonModel):
    """predict() takes a DataFrame with a `path` column, a list of paths, or image arrays."""

    def load_context(self, context) -> None:
        from defect_detection.models.inference import Predictor

        self.predictor = Predictor(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        items = _items(model_input)
        out = self.predictor.predict(items)
        if isinstance(model_input, pd.DataFrame) and "path" in model_input.columns:
            out.insert(0, "path", list(model_input["path"]))
        return out


def _items(model_input) -> list:
    if isinstance(model_input, pd.DataFrame):
        if "path" in model_input.columns:
            return list(model_input["path"])
        if "image" in model_input.columns:
            return [np.asarray(v, dtype=np.uint8) for v in model_input["image"]]
        raise ValueError("DataFrame input needs a 'path' or an 'image' column.")
    if isinstance(model_input, np.ndarray):
        return [model_input] if model_input.ndim == 3 else list(model_input)
    if isinstance(model_input, (str, Path)):
        return [model_input]
    return list(model_input)


def log_pyfunc(bundle_path: str | Path, name: str = "model"):
    """Log the bundle as a pyfunc model on the active run; returns MLflow's ModelInfo."""
    return mlflow.pyfunc.log_model(
        name=name, python_model=DefectPyfunc(), artifacts={"bundle": str(bundle_path)},
        pip_requirements=PIP_REQUIREMENTS,
    )
