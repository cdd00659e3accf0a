"""The block that ends a training run's log: where the run is, how to open it, what it scored."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from urllib.parse import urlparse

from defect_detection.base import project_root
from defect_detection.redact import redact

log = logging.getLogger("defect_detection.summary")
UI_HOST, UI_PORT = "127.0.0.1", 5000


def default_store_uri() -> str:
    """The store `make ui` opens (the Makefile's ui target)."""
    return f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"


def ui_command(tracking_uri: str) -> tuple[str, str]:
    """(the command that serves the UI for this store, the UI's base URL)."""
    scheme = urlparse(tracking_uri).scheme
    if scheme in ("http", "https", "databricks"):
        return "", tracking_uri.rstrip("/")  # a server: already running
    base = f"http://{UI_HOST}:{UI_PORT}"
    if tracking_uri == default_store_uri():
        return "make ui", base
    return f"mlflow ui --backend-store-uri {tracking_uri} --host {UI_HOST} --port {UI_PORT}", base


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def _num(metrics: Mapping[str, float], key: str, fmt: str) -> str:
    value = metrics.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(float(value), fmt)


def summary_lines(test_metrics: Mapping[str, float], threshold: float, policy: str, chosen_on: str, *,
                  run_id: str | None = None, experiment_id: str | None = None,
                  tracking_uri: str | None = None, report_uri: str | None = None,
                  prefix: str = "test/") -> list[str]:
    m = test_metrics
    lines = [f"{prefix.rstrip('/')}: AUROC {_num(m, prefix + 'auroc', '.4f')}  "
             f"recall {_num(m, prefix + 'recall', '.4f')}  FP {_num(m, prefix + 'fp', '.0f')}  "
             f"FN {_num(m, prefix + 'fn', '.0f')}  at threshold {threshold:.4f} ({policy}, chosen on "
             f"{chosen_on})"]
    if not run_id:
        return ["run: not tracked (logger=none)", *lines]
    head = [f"run: {run_id}" + (f" (experiment {experiment_id})" if experiment_id else "")]
    if tracking_uri:
        command, base = ui_command(redact(tracking_uri))
        if command:
            head.append(f"open: {command}  then  {run_url(base, experiment_id or '0', run_id)}")
        else:
            head.append(f"open: {run_url(base, experiment_id or '0', run_id)}")
    return [*head, *lines, *([f"report: {report_uri}"] if report_uri else [])]


def threshold_lines(choice) -> list[str]:
    """What the selection split supports about the threshold (ThresholdChoice diagnostics)."""
    bound = getattr(choice, "fp_rate_upper_bound", float("nan"))
    if not isinstance(bound, float) or math.isnan(bound):
        return []
    counts = choice.counts
    n_good = counts.get("fp", 0) + counts.get("tn", 0)
    margin = choice.margin.get("to_good", float("nan"))
    lines = [f"threshold: {counts.get('fp', 0)} FP in {n_good} goods on {choice.chosen_on} support only "
             f"FP rate < {bound:.1%} at {choice.confidence:.0%} confidence; margin to the nearest good "
             f"{margin:.2f} log-odds"]
    if choice.fragile:
        lines.append(f"WARNING: {choice.fragile['images']} {choice.chosen_on} image(s) alone fix the "
                     f"threshold (without them: {choice.fragile['threshold_without']:.4g})")
    return lines


def log_run_summary(tracker, test_metrics: Mapping[str, float], choice,
                    report_uri: str | None = None) -> list[str]:
    """Log the summary block at INFO (run id, UI command and URL, test numbers, report.html)."""
    experiment_id = None
    if tracker.enabled:
        try:
            experiment_id = tracker.client.get_run(tracker.run_id).info.experiment_id
        except Exception:  # the summary must never fail a finished run
            pass
    lines = summary_lines(test_metrics, float(choice.value), str(choice.policy), str(choice.chosen_on),
                          run_id=tracker.run_id if tracker.enabled else None, experiment_id=experiment_id,
                          tracking_uri=tracker.tracking_uri, report_uri=report_uri)
    lines += threshold_lines(choice)
    width = max(len(line) for line in lines)
    rule = "─" * min(width, 100)
    log.info("run summary\n%s\n%s\n%s", rule, "\n".join(lines), rule)
    return lines
