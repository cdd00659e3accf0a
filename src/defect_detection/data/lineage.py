"""Which data a run trained on, as MLflow dataset inputs: the base data and each extra folder
(a reviewed batch), each with a digest of its files (path, size, mtime) and, for a batch exported
by defect-review, the batch's own digest from its manifest."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from defect_detection.data.records import ImageRecord

log = logging.getLogger(__name__)


def _frame(records: Sequence[ImageRecord], split_of: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": [r.path for r in records],
            "label": [r.label for r in records],
            "category": [r.category for r in records],
            "defect_type": [r.defect_type for r in records],
            "split": [split_of.get(r.path, "unused") for r in records],
        }
    )


def _digest(fingerprint: dict[str, str], paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(f"{p}|{fingerprint.get(p, '')}\n".encode())
    return h.hexdigest()[:16]


def log_lineage(
    tracker,
    base: Sequence[ImageRecord],
    extra: dict[str, Sequence[ImageRecord]],
    split_of: dict[str, str],
    fingerprint: dict[str, str],
    base_source: str,
) -> None:
    """One MLflow dataset input per source: context `training` for the base data, `reviewed` for
    each extra folder (its manifest digest as a tag when it has one)."""
    if not tracker.enabled:
        return
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    inputs = []
    for name, records, source, context in [
        ("base", base, base_source, "training"),
        *((Path(root).name, recs, root, "reviewed") for root, recs in extra.items()),
    ]:
        if not records:
            continue
        digest = _digest(fingerprint, [r.path for r in records])
        dataset = mlflow.data.from_pandas(
            _frame(records, split_of), source=str(source), name=name, digest=digest
        )
        tags = [InputTag("mlflow.data.context", context)]
        manifest = Path(source).parent / "manifest.json" if context == "reviewed" else None
        if manifest is not None and manifest.is_file():
            tags.append(InputTag("review_batch_digest", str(json.loads(manifest.read_text()).get("digest"))))
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=tags))
    try:
        tracker.client.log_inputs(tracker.run_id, datasets=inputs)
    except Exception as err:  # lineage is bookkeeping: never fail the run for it
        log.warning("Could not log the dataset inputs: %s", err)
