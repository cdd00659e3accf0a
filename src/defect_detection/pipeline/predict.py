"""`defect-predict`: score a folder or glob with a checkpoint, bundle or MLflow model; write a CSV.

The decision uses the threshold that travels with the model (calibrated on validation at training
time), so predict decides exactly as evaluation and serving do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf
from rich.progress import track

from defect_detection.base import UserError
from defect_detection.data.images import DEFAULT_MAX_PIXELS, set_max_image_pixels
from defect_detection.destination import check_destination
from defect_detection.models.inference import Predictor
from defect_detection.models.loading import load_predictor
from defect_detection.naming import printable
from defect_detection.tracking.mlflow_run import fluent_tracking_uri

log = logging.getLogger(__name__)

COLUMNS = ["path", "p_defect", "decision", "threshold"]


def score(predictor: Predictor, paths: Sequence[Path], on_error: str = "skip",
          chunk: int = 128, progress: bool = True) -> pd.DataFrame:
    """One row per path; with on_error=skip an unreadable image gets decision 'error' and its message."""
    if on_error not in ("skip", "fail"):
        raise UserError(f"on_error={on_error}: use skip or fail.")
    starts = range(0, len(paths), chunk)
    frames = []
    for start in (track(starts, description="Scoring") if progress and len(paths) > chunk else starts):
        items = [str(p) for p in paths[start:start + chunk]]
        try:
            frames.append(predictor.predict(items).assign(path=items, error=None))
        except Exception:  # one bad image must not cost the chunk: score it image by image
            if on_error == "fail":
                raise
            frames.append(pd.concat([_one(predictor, item, on_error) for item in items], ignore_index=True))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[*COLUMNS, "error"])
    extra = [c for c in ("note", "error") if c in table.columns and table[c].notna().any()]
    return table[COLUMNS + extra]


def _one(predictor: Predictor, item: str, on_error: str = "skip") -> pd.DataFrame:
    try:
        return predictor.predict([item]).assign(path=[item], error=None)
    except Exception as err:
        if on_error == "fail":
            raise
        reason = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        log.warning("Skipped %s: %s", printable(item), reason)
        return pd.DataFrame({"path": [item], "p_defect": [np.nan], "decision": ["error"],
                             "threshold": [predictor.threshold], "error": [reason]})


def predict(cfg: DictConfig) -> pd.DataFrame:
    """Score cfg.images with cfg.model, write cfg.output (and Grad-CAM overlays when enabled)."""
    from defect_detection.explain.writer import input_entries

    model = str(cfg.model)
    inputs = OmegaConf.to_container(cfg.images) if OmegaConf.is_list(cfg.images) else cfg.images
    # every input as given; refused links keep a row with the reason
    entries = input_entries(inputs, bool(cfg.get("follow_symlinks", False)))
    on_error = cfg.get("on_error", "skip")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise UserError(f"batch_size={cfg.batch_size}: use a whole number of images per batch, >= 1.")
    set_max_image_pixels(cfg.get("max_image_pixels", DEFAULT_MAX_PIXELS), key="max_image_pixels")
    out = Path(cfg.output)
    check_destination(out, what="CSV file (e.g. output=predictions.csv)")  # before any image is scored
    refused = [(p, why) for p, why in entries if why]
    if refused and on_error == "fail":
        raise UserError(refused[0][1])
    with fluent_tracking_uri(cfg.tracking_uri):  # for runs:/ and models:/ URIs; restored after
        predictor = _load(model, cfg.device, str(cfg.get("runtime", "auto")))
    predictor.batch_size = int(cfg.batch_size)
    recorder = _recorder(cfg, predictor, model)
    usable = [p for p, why in entries if not why]
    began = time.perf_counter()
    scored = score(predictor, usable, on_error)
    scoring_seconds = time.perf_counter() - began
    table = _with_refused(scored, entries, predictor.threshold)
    table.to_csv(out, index=False)
    if recorder is not None:  # after the CSV: logging never delays or loses a prediction
        rows = recorder.record([str(p) for p in usable], scored)
        recorder.add_maps(predictor, [str(p) for p in usable], rows, scoring_seconds)
        recorder.log.record(rows)
        recorder.log.close()
        predictor.observer = None
    if (table["decision"] == "error").all():
        raise UserError(f"All {len(table)} input(s) failed (reasons in {out}); the first: "
                        f"{table['error'].iloc[0]}")
    n_defect = int((table["decision"] == "defect").sum())
    n_error = int((table["decision"] == "error").sum())
    log.info("Scored %d images with %s: %d defect, %d good%s at threshold %.4f -> %s", len(table), model,
             n_defect, len(table) - n_defect - n_error, f", {n_error} unreadable" if n_error else "",
             predictor.threshold, out)
    if cfg.gradcam.enabled:
        if not hasattr(predictor, "net"):
            raise UserError(f"gradcam.enabled=true needs the PyTorch model: {model} runs on "
                            f"{cfg.get('runtime', 'auto')}; predictions were written to {out}; run "
                            "again with the bundle or MLflow model and runtime=torch for the overlays.")
        from defect_detection.explain.writer import write_overlays

        ok = [Path(p) for p, d in zip(table["path"], table["decision"]) if d != "error"]
        g = cfg.gradcam
        written = write_overlays(predictor, ok, g.dir, target=str(g.target), batch_size=int(cfg.batch_size),
                                 alpha=float(g.alpha), colormap=str(g.colormap))
        log.info("Wrote %d Grad-CAM overlays to %s", len(written), g.dir)
    return table


def _recorder(cfg: DictConfig, predictor, model: str):
    """The prediction log's recorder for this run (None when prediction_log.enabled=false)."""
    from defect_detection.base import project_root
    from defect_detection.monitoring.recorder import Recorder, model_info, open_log
    from defect_detection.schema import PredictionLogSchema

    section = cfg.get("prediction_log")
    settings = PredictionLogSchema.model_validate(OmegaConf.to_container(section, resolve=True)) \
        if section is not None else None
    try:
        plog = open_log(settings, str(cfg.tracking_uri), project_root() / "mlruns")
    except Exception as err:  # a log that cannot even open never costs the predictions
        log.warning("prediction log not opened (%s: %s): predicting without it", type(err).__name__, err)
        return None
    if plog is None:
        return None
    recorder = Recorder(plog, model_info(model, str(cfg.tracking_uri), predictor.meta), "predict",
                        maps=settings.maps, map_budget=settings.map_budget)
    recorder.attach(predictor)
    return recorder


def _with_refused(table: pd.DataFrame, entries: Sequence[tuple[Path, str | None]],
                  threshold: float) -> pd.DataFrame:
    """The scored table plus an error row per refused input, in the order the inputs were given."""
    refused = [(printable(p), why) for p, why in entries if why]  # pandas' strings hold UTF-8 only
    if not refused:
        return table
    for path, why in refused:
        log.warning("Skipped %s: %s", path, why)
    rows = pd.DataFrame({"path": [p for p, _ in refused], "p_defect": np.nan, "decision": "error",
                         "threshold": threshold, "error": [why for _, why in refused]})
    order = {printable(p): i for i, (p, _) in enumerate(entries)}
    frames = [f for f in (table, rows) if len(f)]
    merged = pd.concat(frames, ignore_index=True).reindex(columns=[*COLUMNS, "error"])
    return merged.sort_values("path", key=lambda c: c.map(order), kind="stable", ignore_index=True)


def _load(model: str, device: str, runtime: str = "auto") -> Predictor:
    try:
        return load_predictor(model, device=device, runtime=runtime)
    except UserError:
        raise
    except Exception as err:  # MLflow: unknown registered model / alias, unreachable store
        raise UserError(f"Cannot load model '{model}': {type(err).__name__}: {err}. For a registry URI, "
                        "check the name and alias (defect-promote sets @champion) and tracking_uri.") from err
