"""What a validation split can honestly say about the false-positive rate of good parts.

`fp_rate_threshold` puts the threshold where the estimated good-part FP rate is `max_fp_rate`,
from the val-good score distribution in log-odds (a normal fit, a robust median/MAD normal fit, an
exponential fit to the upper quarter (peaks over threshold), or a bootstrap upper bound of the
empirical quantile) instead of from the single highest-scoring good image.
`fp_rate_upper_bound` is the one-sided Clopper-Pearson bound on the FP rate that the val count
supports: 0 false positives in 80 val goods support only "below 3.7 % at
95 % confidence", however far the threshold is from the goods.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from defect_detection.base import UserError

ESTIMATORS = ("normal", "robust_normal", "bootstrap", "exp_tail")
TAIL_FRACTION = 0.25  # exp_tail: the share of the highest val-good scores the tail is fitted to
EPS = 1e-7  # p_defect is float32: clip before the logit so saturated scores stay finite


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def sigmoid(x) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def fp_rate_upper_bound(n_fp: int, n_good: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper confidence bound of the FP rate after n_fp of n_good."""
    if n_good <= 0:
        return 1.0
    if n_fp >= n_good:
        return 1.0
    return float(stats.beta.ppf(confidence, n_fp + 1, n_good - n_fp))


def fp_rate_threshold(good_scores, max_fp_rate: float, estimator: str = "normal",
                      confidence: float = 0.95, n_boot: int = 2000, seed: int = 0) -> float:
    """p_defect threshold whose estimated good-part FP rate is max_fp_rate (see module doc)."""
    if estimator not in ESTIMATORS:
        raise UserError(f"threshold.estimator={estimator!r} is unknown; choose one of {list(ESTIMATORS)}.")
    if not 0.0 < max_fp_rate < 1.0:
        raise UserError(f"threshold.max_fp_rate={max_fp_rate} must be in (0, 1), e.g. 0.05.")
    z = logit(good_scores)
    if len(z) == 0:
        raise UserError("No good images to estimate the false-positive rate from.")
    q = 1.0 - max_fp_rate
    if estimator == "bootstrap":
        rng = np.random.default_rng(seed)
        draws = rng.choice(z, size=(n_boot, len(z)), replace=True)
        return float(sigmoid(np.quantile(np.quantile(draws, q, axis=1), confidence)))
    if estimator == "exp_tail":  # P(z > u + x) = TAIL_FRACTION * exp(-x / beta) above u
        u = float(np.quantile(z, 1.0 - TAIL_FRACTION))
        excess = z[z > u] - u
        beta = float(excess.mean()) if len(excess) else 0.0
        if max_fp_rate >= TAIL_FRACTION:
            return float(sigmoid(np.quantile(z, q)))
        return float(sigmoid(u + beta * np.log(TAIL_FRACTION / max_fp_rate)))
    if estimator == "robust_normal":
        centre = float(np.median(z))
        spread = float(stats.median_abs_deviation(z, scale="normal"))
    else:
        centre, spread = float(z.mean()), float(z.std(ddof=1)) if len(z) > 1 else 0.0
    return float(sigmoid(centre + stats.norm.ppf(q) * spread))
