"""One monitoring job: a window of the prediction log against the model's reference.

Logs a run to MLflow (experiment `defect-monitoring`: every check's value, and the window's
reject rate, scores and image statistics over `window.chunks` steps), writes monitor.html (one
self-contained page: the alarms, then the plots), and returns whether an alarm was raised.
"""

from __future__ import annotations

import base64
import io
import json
import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from defect_detection.base import UserError, project_root
from defect_detection.monitoring.checks import Check, image_checks, reject_rate_check, score_checks
from defect_detection.monitoring.prediction_log import PredictionLog, default_url
from defect_detection.monitoring.recorder import resolve_model
from defect_detection.monitoring.reference import Reference, load_reference
from defect_detection.redact import redact

log = logging.getLogger(__name__)
PLOTTED = ("brightness", "contrast", "sharpness", "alignment")


@dataclass
class MonitorResult:
    alarm: bool
    checks: list[Check]
    n_parts: int
    run_id: str | None = None
    page: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def alarms(self) -> list[Check]:
        return [c for c in self.checks if c.alarm]


def _time(value) -> datetime | None:
    if not value:
        return None
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError:
        raise UserError(f"window time {value!r}: use an ISO time such as 2026-12-01T06:00.") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def monitor(cfg: DictConfig) -> MonitorResult:
    tracking_uri = str(cfg.tracking_uri)
    model = str(cfg.model)
    info = resolve_model(model, tracking_uri)
    if not info.run_id:
        raise UserError(
            f"model={model}: no training run found behind it, so there is no reference to "
            "compare with; name a runs:/ or models:/ URI of this tracking store."
        )
    reference = load_reference(tracking_uri, info.run_id)
    url = cfg.get("prediction_log_url") or default_url(tracking_uri, project_root() / "mlruns")
    plog = PredictionLog(url)
    window = cfg.window
    rows = plog.window(
        last=window.get("last"),
        since=_time(window.get("since")),
        until=_time(window.get("until")),
        run_id=info.run_id,
    )
    if len(rows) < int(cfg.min_parts):
        note = (
            f"{len(rows)} part(s) of run {info.run_id} in the window of {redact(url)}: fewer than "
            f"min_parts={cfg.min_parts}, no verdict"
        )
        log.warning("%s", note)
        return MonitorResult(False, [], len(rows), notes=[note])
    decisions = np.array([r.decision for r in rows])
    p = np.clip(np.array([r.p_defect for r in rows]), 1e-7, 1 - 1e-7)
    log_odds = np.log(p / (1 - p))
    stats = [json.loads(r.stats) for r in rows if r.stats]
    share = float(cfg.defect_share) if cfg.get("defect_share") is not None else reference.val_defect_share
    a = cfg.alarms
    checks = [
        reject_rate_check(
            int((decisions == "defect").sum()),
            len(rows),
            share,
            reference.fp_rate_bound,
            float(a.reject_alpha),
        ),
        *score_checks(
            log_odds[decisions == "good"],
            reference.val_good_log_odds,
            None if a.get("psi") is None else float(a.psi),
            float(a.ks_alpha),
        ),
        *image_checks(stats, reference.image, float(a.shift_sd), float(a.get("min_change", 0.03))),
    ]
    notes = (
        []
        if cfg.get("defect_share") is not None
        else [f"defect_share not set: the val split's {share:.1%} is used (set the line's own share)"]
    )
    series = _series(rows, decisions, log_odds, stats, reference, int(window.get("chunks") or 10))
    out_dir = Path(str(cfg.output_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / "monitor.html"
    page.write_text(render_page(model, info.run_id, rows, checks, series, reference, notes))
    result = MonitorResult(any(c.alarm for c in checks), checks, len(rows), page=str(page), notes=notes)
    result.run_id = _log_run(cfg, model, info.run_id, result, series, page)
    for c in checks:
        (log.warning if c.alarm else log.info)(
            "%s%s", "ALARM " + c.cause + ": " if c.alarm else "", c.message
        )
    log.info("monitor.html: %s", page)
    return result


def _series(rows, decisions, log_odds, stats, reference: Reference, chunks: int) -> list[dict]:
    """Per step of the window: reject rate, median passed score and the plotted image statistics."""
    from defect_detection.monitoring.image_stats import alignment

    thumb = reference.image.get("thumb")
    out = []
    for part in np.array_split(np.arange(len(rows)), max(1, min(chunks, len(rows)))):
        if not len(part):
            continue
        passed = [log_odds[i] for i in part if decisions[i] == "good"]
        step = {
            "start": rows[part[0]].created.isoformat(),
            "n": len(part),
            "reject_rate": float((decisions[part] == "defect").mean()),
            "passed_median_log_odds": float(np.median(passed)) if passed else float("nan"),
        }
        chunk_stats = [json.loads(rows[i].stats) for i in part if rows[i].stats]
        for key in PLOTTED:
            if key == "alignment":
                vals = [alignment(s["thumb"], thumb) for s in chunk_stats if thumb and "thumb" in s]
            else:
                vals = [s[key] for s in chunk_stats if key in s]
            step[key] = float(np.mean(vals)) if vals else float("nan")
        out.append(step)
    return out


def _log_run(
    cfg: DictConfig, model: str, run_id: str, result: MonitorResult, series: list[dict], page: Path
) -> str | None:
    from mlflow import MlflowClient

    from defect_detection.tracking.mlflow_run import RunTracker, ensure_local_store, get_or_create_experiment

    uri = str(cfg.tracking_uri)
    ensure_local_store(uri)
    client = MlflowClient(uri)
    experiment = get_or_create_experiment(client, str(cfg.experiment_name), {"tracking_uri": uri})
    run = client.create_run(
        experiment,
        tags={
            "task": "monitor",
            "source_model_uri": model,
            "source_run_id": run_id,
            "alarm": str(result.alarm).lower(),
            "alarms": "; ".join(c.cause for c in result.alarms) or "none",
        },
    )
    tracker = RunTracker(client, run.info.run_id, uri)
    tracker.log_params(
        {
            "model": model,
            "window.last": cfg.window.get("last"),
            "window.since": cfg.window.get("since"),
            "window.until": cfg.window.get("until"),
            "defect_share": cfg.get("defect_share"),
            **{f"alarms.{k}": v for k, v in cfg.alarms.items()},
            "n_parts": result.n_parts,
        }
    )
    tracker.log_metrics({f"monitor/{c.name}": c.value for c in result.checks if np.isfinite(c.value)})
    for step, point in enumerate(series):
        tracker.log_metrics(
            {f"window/{k}": v for k, v in point.items() if isinstance(v, float) and np.isfinite(v)}, step=step
        )
    tracker.log_dict(
        {"checks": [c.to_dict() for c in result.checks], "series": series, "notes": result.notes},
        "monitor/checks.json",
    )
    tracker.log_artifact(page)
    tracker.finish("FINISHED")
    return run.info.run_id


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def render_page(
    model: str,
    run_id: str,
    rows,
    checks: list[Check],
    series: list[dict],
    reference: Reference,
    notes: list[str],
) -> str:
    """monitor.html: alarms first, then reject rate, scores and image statistics over the window."""
    from matplotlib.figure import Figure

    from defect_detection.reports.html import environment

    x = np.arange(len(series))
    figures = []
    fig = Figure(figsize=(6.5, 2.8), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot(x, [s["reject_rate"] for s in series], marker="o", label="reject rate")
    limit = next((c.limit for c in checks if c.name == "reject_rate"), None)
    if limit is not None:
        ax.axhline(limit, color="tab:red", ls="--", label=f"validated upper bound {limit:.1%}")
    ax.set(xlabel="step of the window (oldest left)", ylabel="rejected share", title="Reject rate")
    ax.legend(fontsize=8)
    figures.append(("Reject rate over the window", _png(fig)))
    fig = Figure(figsize=(6.5, 2.8), dpi=100, layout="constrained")
    ax = fig.subplots()
    passed = [
        np.log(r.p_defect / (1 - r.p_defect)) for r in rows if r.decision == "good" and 0 < r.p_defect < 1
    ]
    bins = (
        np.linspace(
            min([*passed, *reference.val_good_log_odds]), max([*passed, *reference.val_good_log_odds]), 30
        )
        if passed
        else 30
    )
    ax.hist(reference.val_good_log_odds, bins=bins, density=True, alpha=0.55, label="val goods (reference)")
    ax.hist(passed, bins=bins, density=True, alpha=0.55, label="passed parts (window)")
    ax.set(xlabel="log-odds of defect", ylabel="density", title="Scores of passed parts vs validated goods")
    ax.legend(fontsize=8)
    figures.append(("Score distribution", _png(fig)))
    ref = reference.image.get("stats", {})
    fig = Figure(figsize=(9, 4.5), dpi=100, layout="constrained")
    for ax, key in zip(fig.subplots(2, 2).ravel(), PLOTTED):
        ax.plot(x, [s[key] for s in series], marker="o")
        if key in ref:
            m, sd = ref[key]["mean"], ref[key]["std"]
            ax.axhspan(m - sd, m + sd, color="tab:green", alpha=0.15, label="train goods ± 1 SD")
            ax.axhline(m, color="tab:green", lw=1)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
    figures.append(("Image statistics over the window (green: the training parts)", _png(fig)))
    env = environment()
    return env.get_template("monitor.html.j2").render(
        model=model,
        run_id=run_id,
        n=len(rows),
        start=rows[0].created,
        end=rows[-1].created,
        checks=checks,
        alarms=[c for c in checks if c.alarm],
        figures=figures,
        notes=notes,
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
