"""What a scoring pass gives the prediction log: the parts' statistics and content hashes, taken
from the pixels the predictor decodes anyway (its observer hook), then one row per scored part, and
small maps for the flagged and borderline parts afterwards (never inside the scoring pass).

A classifier's map costs a forward and a backward pass of one image, about 20 times a part's share
of batched scoring, so maps get a time budget: at most `map_budget` of the scoring pass's own
time (flagged parts first, then the borderline ones nearest the threshold). The review page draws
the others when a card is shown.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from defect_detection.monitoring.image_stats import image_stats
from defect_detection.monitoring.prediction_log import ModelInfo, PredictionLog
from defect_detection.schema import PredictionLogSchema

log = logging.getLogger(__name__)

# a map's cost guessed in parts scored: one image's forward and backward pass against a part's
# share of a batched forward (measured 3.6 to 19.4 on a 2-core CPU, quiet to loaded:
# docs/results/prediction_log_overhead.md); the larger guess errs towards fewer maps at scoring
MAP_COST_PER_PART = 20.0


def content_hash(item) -> str | None:
    """BLAKE2b of a file's bytes (or of an array's pixels): the same part seen twice is one hash."""
    try:
        if isinstance(item, (str, Path)):
            return hashlib.blake2b(Path(item).read_bytes(), digest_size=16).hexdigest()
        if isinstance(item, (bytes, bytearray)):
            return hashlib.blake2b(item, digest_size=16).hexdigest()
        return hashlib.blake2b(np.ascontiguousarray(item).tobytes(), digest_size=16).hexdigest()
    except (OSError, TypeError, ValueError):
        return None


def _key(item) -> object:
    return str(item) if isinstance(item, (str, Path)) else id(item)


class Recorder:
    """Observes a predictor's decoding, then writes the rows of what it scored."""

    def __init__(
        self,
        log_: PredictionLog,
        model: ModelInfo,
        source: str,
        maps: bool = True,
        layer: str | list[str] | None = None,
        map_budget: float = 0.03,
    ) -> None:
        self.log, self.model, self.source, self.maps, self.layer = log_, model, source, maps, layer
        self.map_budget = float(map_budget)
        self.seen: dict[object, tuple[dict, str | None]] = {}
        self.seconds = 0.0  # what observing cost (stats and hashes)

    def observe(self, item, hw: tuple[int, int], prepared: np.ndarray) -> None:
        began = time.perf_counter()
        self.seen[_key(item)] = (image_stats(prepared, hw), content_hash(item))
        self.seconds += time.perf_counter() - began

    def attach(self, predictor) -> None:
        predictor.observer = self.observe

    def record(self, items: Sequence, table: pd.DataFrame) -> list[dict]:
        """One row per scored item of `table` (rows with decision 'error' are not parts)."""
        rows = []
        for item, (_, r) in zip(items, table.iterrows()):
            if r["decision"] == "error":
                continue
            stats, digest = self.seen.pop(_key(item), (None, None))
            rows.append(
                self.log.row(
                    source=self.source,
                    model=self.model,
                    p_defect=float(r["p_defect"]),
                    threshold=float(r["threshold"]),
                    decision=str(r["decision"]),
                    image_path=str(item) if isinstance(item, (str, Path)) else None,
                    content_hash=digest,
                    stats=stats,
                )
            )
        return rows

    def add_maps(
        self, predictor, items: Sequence, rows: list[dict], scoring_seconds: float
    ) -> tuple[int, int]:
        """Small evidence maps for the flagged and borderline rows of defect-predict (each part
        decoded again), within the time budget; returns (maps made, maps wanted)."""
        if not self.maps or not hasattr(predictor, "net"):
            return 0, 0
        by_path = {str(i): i for i in items if isinstance(i, (str, Path))}

        def draw(row: dict) -> bytes:
            return draw_map_of(predictor, by_path[row["image_path"]], row["decision"], self.layer)

        observer, predictor.observer = predictor.observer, None
        try:
            mine = [r for r in rows if r["image_path"] in by_path]
            return self.fill_maps(mine, len(rows), scoring_seconds, draw)
        finally:
            predictor.observer = observer

    def fill_maps(
        self, rows: list[dict], n_scored: int, scoring_seconds: float, draw: Callable[[dict], bytes]
    ) -> tuple[int, int]:
        """row["map_png"] = draw(row) for the rows that deserve a map (map_order), while the time
        spent stays within `map_budget` x `scoring_seconds`; returns (maps made, maps wanted)."""
        wanted = map_order(rows) if self.maps else []
        if not wanted:
            return 0, 0
        budget = self.map_budget * max(0.0, scoring_seconds)
        # before the first map its cost is guessed from what scoring one part took; after that,
        # the mean of the maps made
        guess = MAP_COST_PER_PART * max(0.0, scoring_seconds) / max(1, n_scored)
        made, spent, began = 0, 0.0, time.perf_counter()
        for row in wanted:
            if spent + (spent / made if made else guess) > budget:
                break
            try:
                row["map_png"] = draw(row)
                made += 1
            except Exception as err:  # a map is a nicety: the row is recorded without it
                log.warning("prediction log: no map for %s (%s)", row.get("image_path") or "a part", err)
            spent = time.perf_counter() - began
        if made < len(wanted):
            log.info("prediction log: maps for %d of %d flagged/borderline parts within the time budget "
                     "(prediction_log.map_budget=%g of scoring); the review page draws the others",
                     made, len(wanted), self.map_budget)
        return made, len(wanted)


def map_order(rows: Sequence[dict]) -> list[dict]:
    """The rows that deserve a map, most needed first: flagged parts (the operator must judge
    them), then borderline ones by their distance to the threshold."""
    flagged = [r for r in rows if r["decision"] == "defect"]
    border = [r for r in rows if r["decision"] != "defect" and r.get("borderline")]
    border.sort(key=lambda r: abs(float(r["p_defect"]) - float(r["threshold"])))
    return flagged + border


def draw_map(
    predictor,
    prepared: np.ndarray,
    hw: tuple[int, int],
    decided: str | None = None,
    layer: str | list[str] | None = None,
) -> bytes:
    """The small evidence map the log keeps of one part, for the class it was decided as (the
    classifier's Grad-CAM layer unless `layer` is given)."""
    from defect_detection.explain.gradcam import gradcam_layer_for
    from defect_detection.explain.maps import small_map_png

    layer = layer or gradcam_layer_for(predictor.meta["backbone"])
    return small_map_png(predictor, prepared, hw, layer, decided=decided)


def draw_map_of(predictor, item, decided: str | None = None, layer: str | list[str] | None = None) -> bytes:
    """draw_map() of an image file (or array) not decoded yet: decoded and prepared as scoring does."""
    from defect_detection.models.inference import as_pil

    image = as_pil(item)
    return draw_map(predictor, predictor.geometry.prepare(image), (image.height, image.width), decided, layer)


def open_log(
    settings: PredictionLogSchema | None, tracking_uri: str, fallback_dir: Path
) -> PredictionLog | None:
    """The prediction log the settings name (None when disabled)."""
    from defect_detection.monitoring.prediction_log import default_url

    if settings is None or not settings.enabled:
        return None
    return PredictionLog(
        settings.url or default_url(tracking_uri, fallback_dir),
        batch_size=settings.batch_size,
        audit_fraction=settings.audit_fraction,
        borderline_log_odds=settings.borderline_log_odds,
        image_dir=settings.image_dir,
    )


def model_info(source: str, tracking_uri: str, meta: dict) -> ModelInfo:
    """Which model a row names: the URI, and the registered name/version and run when known."""
    from defect_detection.tracking.sources import source_tags

    tags = source_tags(str(source), tracking_uri)
    return ModelInfo(
        uri=tags.get("source_model_uri", str(source)),
        name=tags.get("source_model_name"),
        version=tags.get("source_model_version"),
        run_id=tags.get("source_run_id") or meta.get("run_id"),
    )


def resolve_model(source: str, tracking_uri: str) -> ModelInfo:
    """model_info() of a model named by a user, its training run read from the bundle's meta
    when the URI does not say it (a models:/ alias)."""
    from defect_detection.models.store import fetched_bundle, is_store_uri
    from defect_detection.tracking.mlflow_run import fluent_tracking_uri

    meta: dict = {}
    if is_store_uri(source):
        import torch

        with fluent_tracking_uri(tracking_uri), fetched_bundle(source) as bundle:
            meta = torch.load(bundle, map_location="cpu", weights_only=True)["meta"]
    return model_info(source, tracking_uri, meta)
