"""Temperature scaling fitted on validation logits, and the numbers that show whether it helped.

A single scalar T divides the logits before the softmax: it changes how confident the
probabilities are, never their order (AUROC is unchanged), so the threshold must be chosen
*after* calibration, on the calibrated validation probabilities.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F
from torchmetrics.functional.classification import binary_calibration_error

log = logging.getLogger(__name__)
METHODS = ("none", "temperature")


@dataclass
class Calibration:
    method: str
    temperature: float = 1.0
    before: dict[str, float] = field(default_factory=dict)  # ece / nll at T = 1
    after: dict[str, float] = field(default_factory=dict)  # ece / nll at the fitted T
    warnings: list[str] = field(default_factory=list)


def probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """p_defect exactly as the module and the Predictor compute it (float32 softmax of logits / T)."""
    return (logits.float() / temperature).softmax(dim=1)[:, 1]


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels (unweighted: calibration is about frequencies)."""
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def _tensor(values) -> torch.Tensor:
    """A CPU tensor copy of a tensor, array or sequence (pandas 3 hands out read-only arrays)."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().contiguous()
    return torch.tensor(np.array(values))


def ece(p_defect: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error of p_defect as a probability of `defect` (torchmetrics, L1)."""
    p, y = _tensor(p_defect).float(), _tensor(labels).long()
    if len(p) == 0:
        return float("nan")
    # The binary variant bins p_defect itself against the observed defect rate: the reliability
    # of the number a threshold is put on.
    return float(binary_calibration_error(p, y, n_bins=n_bins, norm="l1"))


def reliability_bins(p_defect, labels, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Per equal-width bin of p_defect: mean predicted probability, observed defect rate, count."""
    p = np.asarray(p_defect, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, n_bins - 1)  # edges[i] <= p < edges[i+1]
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(which, weights=p, minlength=n_bins) / count
        rate = np.bincount(which, weights=y, minlength=n_bins) / count
    return {"edges": edges, "mean_p": mean_p, "rate": rate, "count": count}


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, *, max_iter: int = 100,
                    bounds: tuple[float, float] = (0.05, 100.0)) -> tuple[float, list[str]]:
    """T minimising the NLL of `labels` under softmax(logits / T) (LBFGS on log T).

    The minimum only exists when the classes overlap: on perfectly separated scores the NLL
    keeps falling as T -> 0, so T stays 1 there (with a warning) instead of collapsing every
    probability to 0 or 1.
    """
    # clones: the module gathers its outputs under inference_mode, which autograd refuses to track
    logits, labels = logits.detach().double().clone(), labels.detach().long().clone()
    warnings: list[str] = []
    if len(torch.unique(labels)) < 2:
        warnings.append("the calibration split has a single class: temperature left at 1")
        return 1.0, warnings
    margin = logits[:, 1] - logits[:, 0]
    if margin[labels == 0].max() < margin[labels == 1].min():
        warnings.append("the calibration split is perfectly separated, so the NLL has no minimum "
                        "(T -> 0): temperature left at 1")
        return 1.0, warnings
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.clamp(lo, hi).exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().clamp(lo, hi).exp())
    if not np.isfinite(t):
        warnings.append("temperature fit diverged: temperature left at 1")
        return 1.0, warnings
    if np.isclose(np.log(t), lo) or np.isclose(np.log(t), hi):
        warnings.append(f"temperature hit its bound ({t:.3g})")
    return t, warnings


def calibrate(method: str, logits: torch.Tensor, labels: torch.Tensor, *, n_bins: int = 10,
              max_iter: int = 100) -> Calibration:
    """Fit the chosen calibration on (validation) logits and measure ECE/NLL before and after."""
    if method not in METHODS:
        from defect_detection.base import UserError

        raise UserError(f"calibration.method={method!r} is unknown; choose one of {list(METHODS)}.")
    before = {"ece": ece(probabilities(logits), labels, n_bins), "nll": nll(logits, labels)}
    if method == "none":
        return Calibration(method, 1.0, before, dict(before))
    t, warnings = fit_temperature(logits, labels, max_iter=max_iter)
    after = {"ece": ece(probabilities(logits, t), labels, n_bins), "nll": nll(logits, labels, t)}
    for w in warnings:
        log.warning("calibration: %s", w)
    return Calibration(method, t, before, after, warnings)
