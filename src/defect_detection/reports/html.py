"""report.html: one self-contained page per run, built from the run's own artifacts.

The page is rendered with Jinja2 (templates/ in this package) from what the run already logged:
`reports/` (test report), `data/` (summary and audit), `gradcam/` (maps and localisation),
`config.yaml`, and the run's tags, so `defect-train` and `defect-eval` share one builder and any
finished run can be re-rendered. Images are embedded as data URIs: the file opens offline in any
browser and in the MLflow artifact viewer. A section whose files are missing is replaced by a
short note; building the page never fails a run (`log_html_report` logs a warning instead).
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from jinja2 import Environment, PackageLoader, select_autoescape

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
FOLDERS = ("reports", "data", "gradcam")
FILES = ("config.yaml",)
MAX_PNG_BYTES = 300_000  # larger PNGs (sample grids) are embedded as JPEG to keep the page small
MAX_ROWS = 60
LEAKY_TEXT = ("LEAKY PROTOCOL: the images reported on were also used for validation (checkpoint "
              "selection and, in the seed, the threshold); every number is optimistic. Use split=stratified.")


def environment() -> Environment:
    env = Environment(loader=PackageLoader("defect_detection.reports", "templates"),
                      autoescape=select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    return env


def _num(value, digits: int = 4) -> str:
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int,)) or (isinstance(value, float) and value.is_integer() and abs(value) > 1):
        return str(int(value))
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def data_uri(path: Path) -> str | None:
    """The image as a data: URI (PNG as is, or JPEG when the PNG is large); None when unreadable."""
    try:
        raw = path.read_bytes()
        if len(raw) <= MAX_PNG_BYTES:
            return "data:image/png;base64," + base64.b64encode(raw).decode()
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as image:
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, "JPEG", quality=85)
        return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
    except (OSError, ValueError):
        return None


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _csv(path: Path) -> pd.DataFrame | None:
    try:
        return pd.read_csv(path)
    except (OSError, ValueError, pd.errors.EmptyDataError):
        return None


def table(frame: pd.DataFrame | None, columns: Sequence[str] | None = None, max_rows: int = MAX_ROWS,
          shorten_paths: bool = True) -> dict | None:
    """A frame as {columns, rows, more} for the template (paths shortened to their last 3 parts)."""
    if frame is None:
        return None
    if columns:
        frame = frame[[c for c in columns if c in frame.columns]]
    rows = []
    for record in frame.head(max_rows).to_dict("records"):
        if shorten_paths and "path" in record:
            record["path"] = "/".join(Path(str(record["path"])).parts[-3:])
        rows.append([record[c] for c in frame.columns])
    return {"columns": list(frame.columns), "rows": rows, "more": max(0, len(frame) - max_rows)}


def _figure(root: Path, name: str, caption: str = "") -> dict | None:
    path = root / name
    uri = data_uri(path) if path.is_file() else None
    return {"src": uri, "caption": caption or name, "name": name} if uri else None


def _figures(root: Path, items: Sequence[tuple[str, str]]) -> list[dict]:
    return [f for f in (_figure(root, n, c) for n, c in items) if f]


def collect(root: Path, run: Mapping[str, object]) -> dict:
    """The template context from a folder holding the run's artifacts and the run's info/tags."""
    tags: Mapping[str, str] = run.get("tags", {})
    rep, data, cam = root / "reports", root / "data", root / "gradcam"
    summary = _json(rep / "summary.json") or {}
    threshold = _json(rep / "threshold.json") or {}
    metrics = summary.get("metrics") or {}
    warnings: list[dict] = []
    leaky = bool(summary.get("leaky_protocol")) or str(tags.get("leaky_protocol")) == "True"
    if leaky:
        warnings.append({"title": "Leaky protocol", "text": summary.get("warning") or LEAKY_TEXT,
                         "detail": tags.get("warning", "")})
    for text in threshold.get("warnings") or ([tags["threshold_warnings"]] if tags.get("threshold_warnings")
                                              else []):
        warnings.append({"title": "Threshold", "text": text})
    if tags.get("calibration_warnings"):
        warnings.append({"title": "Calibration", "text": tags["calibration_warnings"]})
    predictions = _csv(rep / "predictions.csv")
    if predictions is not None and len(predictions) and predictions["pred"].nunique() == 1:
        decision = "defect" if int(predictions["pred"].iloc[0]) == 1 else "good"
        warnings.append({"title": "Degenerate threshold",
                         "text": f"the threshold decides '{decision}' for every one of the "
                                 f"{len(predictions)} scored images"})
    if summary and metrics.get("auroc") is not None and math.isnan(float(metrics["auroc"])):
        warnings.append({"title": "Single class", "text": "the scored images hold one class: no ROC/PR, "
                                                          "AUROC undefined"})
    audit = _json(data / "audit.json")
    for item in audit or []:
        warnings.append({"title": f"Data audit: {item.get('check')}", "text": item.get("message", ""),
                         "paths": [str(p) for p in item.get("paths", [])[:10]],
                         "more": max(0, len(item.get("paths", [])) - 10)})
    if tags.get("error"):
        warnings.append({"title": "Run failed", "text": tags["error"]})

    cm = _json(rep / "confusion_matrix.json")
    calibration = _json(rep / "calibration_val.json")
    cam_summary = _json(cam / "summary.json")
    splits = _csv(data / "splits.csv")
    counts = None
    if splits is not None and len(splits):
        from defect_detection.data.summary import counts_wide

        counts = table(counts_wide(splits), max_rows=500)
    cls_report = (rep / "classification_report.txt")
    config = root / "config.yaml"
    return {
        "run": run, "tags": tags, "warnings": warnings, "summary": summary, "metrics": metrics,
        "threshold": threshold or summary.get("threshold") or {},
        "scored_split": ", ".join(sorted(predictions["split"].astype(str).unique()))
        if predictions is not None and "split" in predictions else "",
        "confusion": cm,
        "classification_report": cls_report.read_text() if cls_report.is_file() else None,
        "confusion_figures": _figures(rep, [("confusion_matrix.png", "Confusion matrix")]),
        "curve_figures": _figures(rep, [("roc_curve.png", "ROC, operating point marked"),
                                        ("pr_curve.png", "Precision-recall, operating point marked"),
                                        ("score_histogram.png", "Score histogram with the threshold")]),
        "sweep_figures": _figures(rep, [("threshold_sweep.png", "Threshold sweep")]),
        "sweep": table(_csv(rep / "threshold_sweep.csv"),
                       ["threshold", "accuracy", "precision", "recall", "f1", "tp", "fp", "fn", "tn"]),
        "calibration_figures": _figures(rep, [("reliability_diagram.png", "Reliability on the scored split"),
                                              ("reliability_val.png", "Reliability on val (T fitted)")]),
        "calibration": calibration,
        "by_category": table(_csv(rep / "recall_by_category.csv")),
        "by_type": table(_csv(rep / "recall_by_defect_type.csv")),
        "counts": counts,
        "data_figures": _figures(data, [("class_balance.png", "Images per split and class"),
                                        *[(str(p.relative_to(data)), f"Samples: {p.stem}")
                                          for p in sorted((data / "samples").glob("*.png"))],
                                        ("augmented_batch.png", "Augmented training batch")]),
        "audit": audit, "has_data": data.is_dir(),
        "cam_summary": cam_summary,
        "cam_figures": _figures(cam, [("gallery_defects.png", "Maps on test defects (mask outlined)"),
                                      ("gallery_misclassified.png", "Maps on misclassified images")]),
        "localisation": table(_csv(cam / "localisation.csv")),
        "error_figures": _figures(rep, [("errors/gallery.png", "Misclassified images")]),
        "misclassified": table(_csv(rep / "errors" / "misclassified.csv"),
                               ["path", "category", "defect_type", "label", "p_defect", "decision",
                                "outcome"]),
        "config": config.read_text() if config.is_file() else None,
    }


def run_info(client, run_id: str) -> dict:
    run = client.get_run(run_id)
    info = run.info
    experiment = client.get_experiment(info.experiment_id)
    import datetime as dt

    start = "" if not info.start_time else \
        dt.datetime.fromtimestamp(info.start_time / 1000, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return {"run_id": info.run_id, "run_name": info.run_name, "status": info.status,
            "experiment": experiment.name if experiment else info.experiment_id,
            "experiment_id": info.experiment_id, "start": start, "artifact_uri": info.artifact_uri,
            "tags": dict(run.data.tags), "metrics": dict(run.data.metrics)}


def download_run_artifacts(client, run_id: str, dst: Path, folders: Sequence[str] = FOLDERS,
                           files: Sequence[str] = FILES) -> Path:
    """Copy the artifact folders the page needs (not the model or checkpoints) into dst."""
    import os

    present = {a.path for a in client.list_artifacts(run_id)}
    saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # no progress bars in the run's log
    try:
        for name in [*folders, *files]:
            if name in present:
                client.download_artifacts(run_id, name, str(dst))
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = saved
    return dst


def render_run_report(client, run_id: str, status: str | None = None) -> str:
    info = run_info(client, run_id)
    if status:
        info["status"] = status  # the page is written just before the run is marked FINISHED
    with tempfile.TemporaryDirectory() as tmp:
        context = collect(download_run_artifacts(client, run_id, Path(tmp)), info)
    return environment().get_template("run_report.html.j2").render(**context)


def log_html_report(tracker, status: str = "FINISHED") -> str | None:
    """Render the tracker's run into report.html and log it at the artifact root; returns its URI.

    Never raises: a report that cannot be built is a warning, not a failed run."""
    if not tracker.enabled:
        return None
    try:
        html = render_run_report(tracker.client, tracker.run_id, status)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / REPORT_FILE
            path.write_text(html, encoding="utf-8")
            tracker.log_artifact(path)
        uri = tracker.client.get_run(tracker.run_id).info.artifact_uri.rstrip("/") + "/" + REPORT_FILE
        log.info("report.html: %.1f MB, %s", len(html.encode()) / 1e6, uri)
        return uri
    except Exception as err:  # noqa: BLE001 - the run's results are logged already
        log.warning("report.html not written: %s: %s", type(err).__name__, err)
        return None


def render_comparison(table_frame: pd.DataFrame, metric: str, title: str, figure: Path | None,
                      cards: Sequence[dict]) -> str:
    """The comparison page: ranked table, the bar chart, and a card per run (warnings, key figures)."""
    fig = {"src": data_uri(figure), "caption": f"runs ranked by {metric}"} if figure and figure.is_file() \
        else None
    return environment().get_template("compare.html.j2").render(
        title=title, metric=metric, table=table(table_frame, max_rows=500, shorten_paths=False), figure=fig,
        cards=cards)


def comparison_cards(client, runs_table: pd.DataFrame, max_runs: int = 8) -> list[dict]:
    """Per run (best first, up to max_runs): id, name, warnings, test numbers and its key figures."""
    cards = []
    for row in runs_table.head(max_runs).itertuples():
        with tempfile.TemporaryDirectory() as tmp:
            try:
                root = download_run_artifacts(client, row.run_id, Path(tmp), folders=("reports",), files=())
                info = run_info(client, row.run_id)
            except Exception as err:  # noqa: BLE001 - one unreadable run must not lose the page
                cards.append({"run_id": row.run_id, "run_name": row.run_name, "note": str(err)})
                continue
            context = collect(root, info)
            cards.append({"run_id": row.run_id, "run_name": row.run_name, "status": info["status"],
                          "warnings": context["warnings"], "metrics": context["metrics"],
                          "threshold": context["threshold"],
                          "figures": _figures(root / "reports", [("confusion_matrix.png", "Confusion matrix"),
                                                                 ("roc_curve.png", "ROC")])})
    return cards
