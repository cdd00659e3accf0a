"""Calibration fitted on a module's validation outputs, logged with its reliability figure.

The fitting and the numbers live in evaluation/calibration.py, the drawing in figures.py; this
module ties them to a training run (module outputs, tracker).
"""

from __future__ import annotations

import logging

from defect_detection.evaluation.calibration import Calibration, calibrate, probabilities
from defect_detection.evaluation.figures import reliability_figure
from defect_detection.schema import CalibrationSchema

log = logging.getLogger(__name__)


def calibrate_module(settings: CalibrationSchema | None, module, tracker,
                     stage: str = "val") -> Calibration | None:
    """Fit `settings.method` on module.outputs[stage], set the module's temperature, recompute the
    stage's p_defect with it (what the threshold is then chosen on) and log the before/after."""
    method = settings.method if settings is not None else "none"
    if method == "none":
        return None
    out = module.outputs[stage]
    result = calibrate(method, out["logits"], out["label"], n_bins=settings.n_bins,
                       max_iter=settings.max_iter)
    module.set_temperature(result.temperature)
    out["p_defect"] = probabilities(out["logits"], result.temperature)
    if tracker is not None and tracker.enabled:
        tracker.log_metrics({"calibration/temperature": result.temperature,
                             f"{stage}/ece_uncalibrated": result.before["ece"],
                             f"{stage}/ece": result.after["ece"],
                             f"{stage}/nll_uncalibrated": result.before["nll"],
                             f"{stage}/nll": result.after["nll"]})
        tracker.set_tags({"calibration": method, "calibration_fitted_on": stage})
        if result.warnings:
            tracker.set_tags({"calibration_warnings": " | ".join(result.warnings)})
        tracker.log_dict({"method": method, "temperature": result.temperature, "fitted_on": stage,
                          "before": result.before, "after": result.after, "warnings": result.warnings},
                         f"reports/calibration_{stage}.json")
        curves = {"uncalibrated": probabilities(out["logits"]),
                  f"T = {result.temperature:.3g}": out["p_defect"]}
        fig = reliability_figure(curves, out["label"], n_bins=settings.n_bins,
                                 title=f"Reliability on {stage} (temperature fitted here)")
        tracker.log_figure(fig, f"reports/reliability_{stage}.png")
    log.info("calibration: T=%.4f fitted on %s, ECE %.4f -> %.4f, NLL %.4f -> %.4f", result.temperature,
             stage, result.before["ece"], result.after["ece"], result.before["nll"], result.after["nll"])
    return result
