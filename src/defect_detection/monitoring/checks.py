"""The checks of a window of parts against the model's reference, each one named for its likely
cause so an alarm says what to look at.

- reject rate: more parts rejected than the model's validation supports, at the line's expected
  defect share (one-sided binomial test against the upper bound of the expected rate);
- score drift: the passed parts' scores against the val goods' (population stability index on
  the reference's quantile bins, and the two-sample Kolmogorov-Smirnov test);
- image drift: each image statistic's window mean, in reference standard deviations from the
  train goods' mean (brightness/contrast: lighting; sharpness: focus; red/green/blue: colour;
  height/width: camera or resolution; alignment: camera moved).

The alarm limits are settings (conf/monitor.yaml) whose defaults come from a measurement
(scripts/monitor_thresholds.py: false alarms on unchanged parts, detections of drifts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as scipy_stats

from defect_detection.monitoring.image_stats import alignment

CAUSES = {
    "brightness": "lighting changed",
    "contrast": "lighting changed",
    "sharpness": "focus lost",
    "red_share": "colour changed",
    "blue_share": "colour changed",
    "height": "camera or resolution changed",
    "width": "camera or resolution changed",
    "alignment": "camera moved",
}
LOG_SCALE = ("sharpness",)  # heavy-tailed: compared on a log scale


@dataclass
class Check:
    name: str
    value: float
    limit: float
    alarm: bool
    message: str
    cause: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def reject_rate_check(
    n_rejected: int, n: int, defect_share: float, fp_rate_bound: float, alpha: float
) -> Check:
    """Alarm when n_rejected of n is improbable (p < alpha) under the highest reject rate the model's
    validation supports at this defect share: every defect rejected plus goods at the FP-rate bound."""
    bound = 0.0 if not math.isfinite(fp_rate_bound) else fp_rate_bound
    expected = min(1.0, defect_share + (1 - defect_share) * bound)
    p_value = float(scipy_stats.binom.sf(n_rejected - 1, n, expected)) if n else 1.0
    rate = n_rejected / n if n else float("nan")
    alarm = p_value < alpha
    return Check(
        "reject_rate",
        rate,
        expected,
        alarm,
        f"{n_rejected} of {n} parts rejected ({rate:.1%}); the model's validation supports at most "
        f"{expected:.1%} at a {defect_share:.1%} defect share (p = {p_value:.2g})",
        "more rejects than validated: the line or the parts changed" if alarm else "",
    )


def psi(reference: np.ndarray, window: np.ndarray) -> float:
    """Population stability index of `window` against `reference`, on the reference's quantile bins
    (deciles, or quintiles for fewer than 50 reference values), with a 0.5-count floor per bin."""
    reference, window = np.asarray(reference, float), np.asarray(window, float)
    if len(reference) < 2 or len(window) == 0:
        return float("nan")
    k = 10 if len(reference) >= 50 else 5
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, k + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(edges, reference), minlength=len(edges) + 1) + 0.5
    win = np.bincount(np.searchsorted(edges, window), minlength=len(edges) + 1) + 0.5
    ref, win = ref / ref.sum(), win / win.sum()
    return float(np.sum((win - ref) * np.log(win / ref)))


MIN_PSI_REFERENCE = 20  # fewer val goods: their quantile bins are too coarse for a PSI to mean much


def score_checks(
    passed_log_odds: np.ndarray, ref_log_odds: np.ndarray, psi_limit: float | None, ks_alpha: float
) -> list[Check]:
    """The passed parts' scores against the val goods' (the PSI only with >= MIN_PSI_REFERENCE of them;
    psi_limit None: the PSI is reported, never an alarm)."""
    value = psi(ref_log_odds, passed_log_odds) if len(ref_log_odds) >= MIN_PSI_REFERENCE else float("nan")
    enough = len(passed_log_odds) and len(ref_log_odds)
    p_value = float(scipy_stats.ks_2samp(passed_log_odds, ref_log_odds).pvalue) if enough else float("nan")
    shift = float(np.median(passed_log_odds) - np.median(ref_log_odds)) if enough else float("nan")
    psi_alarm = psi_limit is not None and math.isfinite(value) and value > psi_limit
    ks_alarm = math.isfinite(p_value) and p_value < ks_alpha
    cause = "the passed parts score unlike the validated goods: drift, or a new kind of part"
    psi_text = (
        f"PSI {value:.3f} of the passed parts' scores against the val goods' (median shift {shift:+.2f} "
        "log-odds)"
        if math.isfinite(value)
        else f"PSI not computed: {len(ref_log_odds)} val goods (< {MIN_PSI_REFERENCE})"
    )
    return [
        Check("score_psi", value, float("nan") if psi_limit is None else psi_limit, psi_alarm, psi_text,
              cause if psi_alarm else ""),
        Check(
            "score_ks_p",
            p_value,
            ks_alpha,
            ks_alarm,
            f"Kolmogorov-Smirnov p = {p_value:.2g} (passed parts vs val goods)",
            cause if ks_alarm else "",
        ),
    ]


def stat_values(window_stats: Sequence[dict], reference: dict) -> dict[str, np.ndarray]:
    """Per statistic the window's values (alignment: each part's correlation with the reference
    thumbnail), for the statistics the reference has."""
    ref_stats = reference.get("stats") or {}
    values = {
        k: np.array([s[k] for s in window_stats], dtype=float)
        for k in ref_stats
        if k != "alignment" and window_stats and all(k in s for s in window_stats)
    }
    if (
        reference.get("thumb")
        and "alignment" in ref_stats
        and window_stats
        and all("thumb" in s for s in window_stats)
    ):
        values["alignment"] = np.array([alignment(s["thumb"], reference["thumb"]) for s in window_stats])
    return values


def deviation(key: str, window_mean: float, ref: dict, min_change: float) -> float:
    """A window mean's distance from the train goods' mean, in their standard deviations floored at
    `min_change` of the mean (on a log scale for sharpness; an absolute floor for alignment)."""
    here, mean, sd = float(window_mean), float(ref["mean"]), float(ref["std"])
    if key in LOG_SCALE:  # log means; the reference std on a log scale from its percentiles
        here, mean = math.log(max(here, 1e-6)), math.log(max(mean, 1e-6))
        sd = (math.log(max(ref["p99"], 1e-6)) - math.log(max(ref["p01"], 1e-6))) / 4.65
        floor = math.log(1 + min_change)
    else:
        floor = min_change * max(abs(mean), 1e-6) if key != "alignment" else min_change
    return (here - mean) / max(sd, floor)


def image_checks(
    window_stats: Sequence[dict], reference: dict, shift_limit_sd: float, min_change: float = 0.03
) -> list[Check]:
    """Each statistic's window mean against the train goods', in reference standard deviations.

    The deviation is measured against the train goods' spread, floored at `min_change` of the
    reference mean: parts as uniform as synthetic ones have a tiny spread, and a 1 % change of
    brightness is no drift anyone needs to act on."""
    out = []
    for key, v in stat_values(window_stats, reference).items():
        ref = reference["stats"][key]
        d = deviation(key, float(v.mean()), ref, min_change)
        alarm = abs(d) > shift_limit_sd and (key != "alignment" or d < 0)
        direction = "above" if d > 0 else "below"
        out.append(
            Check(
                key,
                d,
                shift_limit_sd,
                alarm,
                f"{key}: window mean {float(v.mean()):.4g}, {abs(d):.2f} SD {direction} the training "
                f"goods' {float(ref['mean']):.4g}",
                CAUSES.get(key, "") if alarm else "",
            )
        )
    return out
