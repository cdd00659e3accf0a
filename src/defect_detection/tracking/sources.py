"""Where a model named by a user came from: its URI or path, and the training run behind it."""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow

log = logging.getLogger(__name__)


def source_tags(source: str, tracking_uri: str) -> dict[str, str]:
    """Where the scored model came from: its URI or path, and the training run when it is known."""
    if source.startswith(("runs:/", "models:/")):
        tags = {"source_model_uri": source}
        try:
            if source.startswith("runs:/"):
                from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

                tags["source_run_id"] = RunsArtifactRepository.parse_runs_uri(source)[0]
            else:
                from mlflow.store.artifact.utils.models import get_model_name_and_version

                client = mlflow.MlflowClient(tracking_uri)
                ref = get_model_name_and_version(client, source)
                if len(ref) == 2:
                    version = client.get_model_version(*ref)
                    tags |= {"source_model_name": ref[0], "source_model_version": str(ref[1]),
                             "source_run_id": version.run_id or ""}
                else:
                    tags["source_run_id"] = client.get_logged_model(ref[0]).source_run_id or ""
        except mlflow.exceptions.MlflowException as err:
            log.warning("could not resolve the run behind %s: %s", source, err)
        return {k: v for k, v in tags.items() if v}
    if "://" in source:
        return {"source_model_uri": source}
    return {"source_model_uri": str(Path(source).expanduser().resolve()),
            "source_kind": "checkpoint" if source.endswith(".ckpt") else "bundle"}
