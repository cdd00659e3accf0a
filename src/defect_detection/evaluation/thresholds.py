"""Decision-threshold policies, chosen on validation scores and applied unchanged to test.

A part is rejected as defective when p_defect >= threshold. Candidate thresholds are 0, the
midpoints between consecutive distinct scores, and a point above the highest score, so a chosen
threshold sits as far as possible from the validation scores on either side of it. Ties between
equally good candidates go to fewer false positives, then to the higher threshold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from defect_detection.base import UserError
from defect_detection.data.splits import stratum_counts
from defect_detection.evaluation.fp_rate import fp_rate_threshold, fp_rate_upper_bound, logit

log = logging.getLogger(__name__)
POLICIES = ("fixed", "max_recall_at_fp", "min_fp_at_recall", "f1_max", "cost", "fp_rate_bound",
            "cross_val")
FRAGILE_LOG_ODDS = 1.0


@dataclass
class ThresholdChoice:
    value: float
    policy: str
    chosen_on: str
    counts: dict = field(default_factory=dict)  # tp/fp/fn/tn on the split it was chosen on
    warnings: list[str] = field(default_factory=list)
    # what the selection split supports: Clopper-Pearson upper bound of the good-part FP rate at
    # `value`, the log-odds room between `value` and the nearest good / defect score, and how far
    # the threshold moves without the one or two val images that fix it (see diagnose)
    fp_rate_upper_bound: float = float("nan")
    confidence: float = 0.95
    margin: dict = field(default_factory=dict)
    fragile: dict = field(default_factory=dict)

    def log_fields(self) -> dict:
        """What every run logs next to the threshold (reports/threshold.json, tags, metrics)."""
        return {"value": self.value, "policy": self.policy, "chosen_on": self.chosen_on,
                "counts": self.counts, "fp_rate_upper_bound": self.fp_rate_upper_bound,
                "confidence": self.confidence, "margin": self.margin, "fragile": self.fragile,
                "warnings": self.warnings}


def log_threshold(tracker, choice: ThresholdChoice, config: dict | None = None) -> None:
    """Next to the threshold, in every run: policy, the FP-rate bound the selection split supports,
    the margins and a `threshold_fragile` tag when one or two images alone fix it."""
    if not tracker.enabled:
        return
    tracker.set_tags({"threshold_policy": choice.policy, "threshold_chosen_on": choice.chosen_on,
                      "threshold_fp_rate_upper_bound": f"{choice.fp_rate_upper_bound:.4g}",
                      **({"threshold_fragile": f"{choice.fragile['images']} {choice.fragile['kind']} "
                                               "image(s) fix it"} if choice.fragile else {}),
                      **({"threshold_warnings": " | ".join(choice.warnings)} if choice.warnings else {})})
    metrics = {"threshold/fp_rate_upper_bound": choice.fp_rate_upper_bound,
               "threshold/margin_to_good": choice.margin.get("to_good", float("nan")),
               "threshold/margin_to_defect": choice.margin.get("to_defect", float("nan"))}
    tracker.log_metrics({k: v for k, v in metrics.items() if np.isfinite(v)})
    tracker.log_dict({**choice.log_fields(), "counts_on_val": choice.counts, "config": config or {}},
                     "reports/threshold.json")


def counts_at(scores: np.ndarray, labels: np.ndarray, thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """tp, fp, fn, tn for each threshold (decision: score >= threshold)."""
    pos = np.sort(scores[labels == 1])
    neg = np.sort(scores[labels == 0])
    tp = len(pos) - np.searchsorted(pos, thresholds, side="left")
    fp = len(neg) - np.searchsorted(neg, thresholds, side="left")
    return {"tp": tp, "fp": fp, "fn": len(pos) - tp, "tn": len(neg) - fp}


def candidates(scores: np.ndarray) -> np.ndarray:
    unique = np.unique(scores)
    top = min(1.0, unique[-1] + (1.0 - unique[-1]) / 2) if len(unique) else 1.0
    mids = (unique[:-1] + unique[1:]) / 2
    return np.unique(np.concatenate([[0.0], mids, [top]]))


def _best(thresholds: np.ndarray, objective: np.ndarray, fp: np.ndarray, feasible: np.ndarray) -> int:
    """Index of the best feasible candidate: max objective, then min FP, then max threshold."""
    idx = np.flatnonzero(feasible)
    order = np.lexsort((-thresholds[idx], fp[idx], -objective[idx]))
    return int(idx[order[0]])


def choose_threshold(policy: str, scores, labels, *, value: float = 0.5, max_fp: int = 0,
                     min_recall: float = 0.95, cost_fp: float = 1.0, cost_fn: float = 1.0,
                     max_fp_rate: float = 0.05, estimator: str = "normal", confidence: float = 0.95,
                     fragile_log_odds: float = FRAGILE_LOG_ODDS, fallback: float = 0.5,
                     chosen_on: str = "val", paths=None, folds: int = 3) -> ThresholdChoice:
    """Apply a policy to (p_defect, label) arrays of the selection split, then say what that split
    supports (FP-rate bound, margin, fragility). cross_val is fp_rate_bound on out-of-fold scores
    (`folds` is read by its caller, which makes those scores); `paths` name images in warnings."""
    if policy not in POLICIES:
        raise UserError(f"threshold.policy={policy!r} is unknown; choose one of {list(POLICIES)}.")
    for key, v in (("threshold.value", value), ("threshold.min_recall", min_recall),
                   ("threshold.fallback", fallback), ("threshold.confidence", confidence)):
        if not 0.0 <= v <= 1.0:
            raise UserError(f"{key}={v} is outside [0, 1].")
    if max_fp < 0 or cost_fp < 0 or cost_fn < 0:
        raise UserError("threshold.max_fp, cost_fp and cost_fn must be >= 0.")
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(int)
    params = {"value": value, "max_fp": max_fp, "min_recall": min_recall, "cost_fp": cost_fp,
              "cost_fn": cost_fn, "max_fp_rate": max_fp_rate, "estimator": estimator,
              "confidence": confidence, "fallback": fallback, "chosen_on": chosen_on}
    t, warnings = _pick(policy, scores, labels, **params)
    final = counts_at(scores, labels, np.array([t]))
    choice = ThresholdChoice(t, policy, chosen_on, {k: int(v[0]) for k, v in final.items()}, warnings,
                             confidence=confidence)
    diagnose(choice, scores, labels, params, fragile_log_odds, paths)
    for w in choice.warnings:
        log.warning("threshold: %s", w)
    return choice


def _pick(policy: str, scores: np.ndarray, labels: np.ndarray, *, value, max_fp, min_recall, cost_fp,
          cost_fn, max_fp_rate, estimator, confidence, fallback, chosen_on) -> tuple[float, list[str]]:
    """The threshold of `policy` on these scores, and what went wrong choosing it."""
    warnings: list[str] = []
    if policy == "fixed":
        return float(value), warnings
    if not (labels == 1).any() or not (labels == 0).any():
        missing = "defect" if not (labels == 1).any() else "good"
        warnings.append(f"{chosen_on} split has no {missing} images: policy {policy} cannot be "
                        f"applied; using threshold.fallback={fallback}")
        return float(fallback), warnings
    if len(np.unique(scores)) == 1:
        warnings.append(f"all {chosen_on} scores are equal ({scores[0]:.4g}): the threshold "
                        "carries no information")
    if policy in ("fp_rate_bound", "cross_val"):
        return fp_rate_threshold(scores[labels == 0], max_fp_rate, estimator, confidence), warnings
    ts = candidates(scores)
    c = counts_at(scores, labels, ts)
    n_pos = c["tp"] + c["fn"]
    recall = c["tp"] / n_pos
    ok = np.ones_like(ts, dtype=bool)
    if policy == "max_recall_at_fp":
        ok = c["fp"] <= max_fp
        if not ok.any():  # good images at p_defect = 1.0 (saturated): no threshold in [0, 1] avoids them
            ok = c["fp"] == c["fp"].min()
            warnings.append(f"no threshold in [0, 1] keeps <= {max_fp} false positives on {chosen_on} "
                            f"({int(c['fp'].min())} good images score p_defect = 1.0): using the "
                            "fewest false positives")
        i = _best(ts, recall, c["fp"], ok)
        if recall[i] == 0:
            warnings.append(f"no threshold reaches any recall with <= {max_fp} false positives "
                            f"on {chosen_on}: the scores do not separate the classes")
    elif policy == "min_fp_at_recall":
        ok = recall >= min_recall - 1e-12
        ok = ok if ok.any() else recall == recall.max()
        i = _best(ts, -c["fp"].astype(float), c["fp"], ok)
    elif policy == "f1_max":
        f1 = 2 * c["tp"] / np.maximum(2 * c["tp"] + c["fp"] + c["fn"], 1)
        i = _best(ts, f1, c["fp"], ok)
    else:
        i = _best(ts, -(cost_fp * c["fp"] + cost_fn * c["fn"]), c["fp"], ok)
    return float(ts[i]), warnings


def diagnose(choice: ThresholdChoice, scores: np.ndarray, labels: np.ndarray, params: dict,
             fragile_log_odds: float = FRAGILE_LOG_ODDS, paths=None) -> None:
    """Fill in what the selection split supports about `choice`.

    fp_rate_upper_bound: Clopper-Pearson bound of the good-part FP rate at the threshold.
    margin: log-odds from the threshold down to the highest good below it and up to the lowest
    defect at or above it. fragile: the threshold re-chosen without the 1 and then 2 highest-scoring
    goods (and, separately, lowest-scoring defects); when it moves by more than fragile_log_odds,
    one or two val images alone fix the operating point and a warning says which.
    """
    n_good = int((labels == 0).sum())
    choice.fp_rate_upper_bound = fp_rate_upper_bound(choice.counts.get("fp", 0), n_good, choice.confidence)
    t = logit(choice.value)
    z = logit(scores)
    below, above = z[(labels == 0) & (scores < choice.value)], z[(labels == 1) & (scores >= choice.value)]
    choice.margin = {"to_good": float(t - below.max()) if len(below) else float("nan"),
                     "to_defect": float(above.min() - t) if len(above) else float("nan")}
    if choice.policy == "fixed" or not (labels == 0).any() or not (labels == 1).any():
        return
    order_good = np.flatnonzero(labels == 0)[np.argsort(-scores[labels == 0], kind="stable")]
    order_defect = np.flatnonzero(labels == 1)[np.argsort(scores[labels == 1], kind="stable")]
    for kind, order in (("good", order_good), ("defect", order_defect)):
        for d in (1, 2):
            if len(order) <= d:
                break
            keep = np.ones(len(scores), dtype=bool)
            keep[order[:d]] = False
            t_d, _ = _pick(choice.policy, scores[keep], labels[keep], **params)
            shift = float(logit(t_d) - t)
            if abs(shift) > fragile_log_odds:
                names = [str(paths[i]) for i in order[:d]] if paths is not None else []
                choice.fragile = {"images": d, "kind": kind, "threshold_without": t_d,
                                  "log_odds_shift": shift, "paths": names}
                extreme = "highest-scoring" if kind == "good" else "lowest-scoring"
                choice.warnings.append(
                    f"{d} {choice.chosen_on} image(s) alone fix the threshold: without the {d} {extreme} "
                    f"{kind} image(s){' (' + ', '.join(names) + ')' if names else ''} it would be "
                    f"{t_d:.4g} instead of {choice.value:.4g} ({shift:+.2f} log-odds). Consider "
                    "threshold=fp_rate_bound or cross_val, or more val images.")
                return


def check_selection_split(policy: str, records, split_cfg=None, chosen_on: str = "val") -> None:
    """Before training: a policy other than `fixed` needs both classes on the split it is chosen on;
    without them it would silently fall back to threshold.fallback after the whole training."""
    if policy == "fixed":
        return
    labels = [int(r.label) for r in records]
    n_defect, n_good = sum(labels), len(labels) - sum(labels)
    if n_defect and n_good:
        return
    missing = "defect" if not n_defect else "good"
    make = (split_cfg or {}).get("make") or {}
    fraction = make.get("val_fraction")
    need = ""
    if fraction and str(make.get("_target_", "")).endswith("stratified_split"):
        n = min_stratum_for_val(float(fraction), float(make.get("test_fraction") or 0.0))
        need = (f" With split.make.val_fraction={fraction:g} the stratified split puts a {missing} image in "
                f"val from every category with at least {n} {missing} images.")
    raise UserError(
        f"The {chosen_on} split has {n_good} good and {n_defect} defect images: threshold.policy={policy} "
        f"chooses the threshold on {chosen_on} and needs at least 1 {missing} image there.{need} Add "
        f"{missing} images, raise split.make.val_fraction, or use threshold=fixed.")


def min_stratum_for_val(val_fraction: float, test_fraction: float, limit: int = 10000) -> int:
    """The fewest images of one (category, label) stratum that give val at least one of them, by the
    counting rule of data.splits.stratified_split (test is filled first)."""
    for n in range(1, limit):
        n_test, n_val = stratum_counts(n, val_fraction, test_fraction)
        if min(n_val, n - n_test) >= 1:
            return n
    return limit
