"""One review job: serve the review page over the prediction log, or export the judged parts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from defect_detection.base import project_root
from defect_detection.models.loading import load_predictor
from defect_detection.monitoring.prediction_log import Prediction, PredictionLog, default_url
from defect_detection.monitoring.recorder import draw_map_of, resolve_model
from defect_detection.monitoring.review import escape_estimate, export_reviewed
from defect_detection.redact import redact
from defect_detection.tracking.mlflow_run import fluent_tracking_uri

log = logging.getLogger(__name__)


def open_review(cfg: DictConfig) -> tuple[PredictionLog, str | None]:
    """The log and the run whose parts are reviewed (None: every model's)."""
    tracking_uri = str(cfg.tracking_uri)
    run_id = resolve_model(str(cfg.model), tracking_uri).run_id if cfg.get("model") else None
    url = cfg.get("prediction_log_url") or default_url(tracking_uri, project_root() / "mlruns")
    return PredictionLog(url), run_id


def map_drawer(tracking_uri: str) -> Callable[[Prediction], bytes | None]:
    """Draws the evidence map of a logged part with the model that scored it (each model loaded
    once): for the parts scoring left without a map. None when the image is gone or the model has
    no PyTorch network (an exported one)."""
    predictors: dict[str, object] = {}

    def draw(row: Prediction) -> bytes | None:
        if not row.model_uri or not row.image_path or not Path(row.image_path).is_file():
            return None
        if row.model_uri not in predictors:
            with fluent_tracking_uri(tracking_uri):
                predictors[row.model_uri] = load_predictor(row.model_uri)
        predictor = predictors[row.model_uri]
        if not hasattr(predictor, "net"):
            return None
        return draw_map_of(predictor, row.image_path, row.decision)

    return draw


def review(cfg: DictConfig) -> dict | None:
    """Export (cfg.export set: returns the manifest) or serve the page until stopped."""
    plog, run_id = open_review(cfg)
    estimate = escape_estimate(plog, run_id)
    if cfg.get("export"):
        manifest = export_reviewed(
            plog, str(cfg.export), holdout=float(cfg.holdout), seed=int(cfg.seed), run_id=run_id
        )
        manifest["escape"] = estimate.describe()
        log.info(
            "Exported %d reviewed part(s) to %s (digest %s): %s. %s",
            len(manifest["parts"]),
            cfg.export,
            manifest["digest"],
            manifest["counts"],
            estimate.describe(),
        )
        log.info("Train with them: defect-train <your overrides> 'data.extra_roots=[%s/train]'", cfg.export)
        return manifest
    import uvicorn

    from defect_detection.monitoring.review_app import create_app

    app = create_app(
        plog,
        reviewer=str(cfg.reviewer),
        run_id=run_id,
        limit=int(cfg.limit),
        defect_types=list(OmegaConf.to_container(cfg.defect_types) or []),
        draw_map=map_drawer(str(cfg.tracking_uri)),
    )
    log.info(
        "Review page: http://%s:%s (log %s). %s", cfg.host, cfg.port, redact(plog.url), estimate.describe()
    )
    uvicorn.run(app, host=str(cfg.host), port=int(cfg.port), log_level="warning")
    return None
