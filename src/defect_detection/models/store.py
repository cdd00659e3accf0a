"""A logged model's bundle, fetched from the MLflow store without running anything stored there.

`mlflow.pyfunc.load_model` unpickles (or, for models from code, executes) a file from the artifact
store: a replaced `python_model.pkl` ran its payload on `defect-predict model=runs:/...`. The
project's own loaders read only two files of a logged model: `MLmodel` (YAML, safe_load) to find the
bundle, and the bundle itself (torch weights_only, with its weights' digest checked).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from defect_detection.base import UserError

STORE_SCHEMES = ("runs:/", "models:/")


def is_store_uri(source: str) -> bool:
    return str(source).startswith(STORE_SCHEMES) or "://" in str(source)


@contextmanager
def fetched_bundle(uri: str) -> Iterator[Path]:
    """The local path of the bundle of the logged model `uri` (runs:/, models:/ or an artifact
    URI), valid inside the block."""
    import mlflow
    import yaml

    base = str(uri).rstrip("/")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=tmp)
        except mlflow.exceptions.MlflowException as err:
            raise UserError(f"Cannot load model {uri}: {err.message}. For a registry URI check the name "
                            "and alias (defect-promote sets @champion); for runs:/ the run id; and the "
                            "tracking store (tracking_uri / MLFLOW_TRACKING_URI).") from None
        try:
            spec = yaml.safe_load(Path(mlmodel).read_text()) or {}
            path = spec["flavors"]["python_function"]["artifacts"]["bundle"]["path"]
        except Exception:
            raise UserError(f"{uri} is not a model logged by defect-train: its MLmodel file names no "
                            "bundle (flavors.python_function.artifacts.bundle).") from None
        if Path(path).is_absolute() or ".." in Path(path).parts:
            raise UserError(f"{uri}: its MLmodel names the bundle {path!r}, outside the model; refused.")
        local = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{path}", dst_path=tmp)
        yield Path(local)
