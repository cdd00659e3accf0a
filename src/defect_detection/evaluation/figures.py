"""Report figures as matplotlib Figure objects (no pyplot state, so nothing leaks between runs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from defect_detection.base import CLASS_NAMES

GOOD_COLOR, DEFECT_COLOR, THRESHOLD_COLOR = "tab:blue", "tab:red", "black"


def _title(text: str, note: str = "") -> str:
    return f"{text}\n{note}" if note else text


def confusion_figure(counts: np.ndarray, threshold: float, note: str = "") -> Figure:
    """Counts and row-normalised (per true class) confusion matrices side by side."""
    counts = np.asarray(counts, dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    fig = Figure(figsize=(9, 4), dpi=110, layout="constrained")
    for ax, matrix, fmt, name in zip(fig.subplots(1, 2), (counts, normalised), ("{:.0f}", "{:.1%}"),
                                     ("counts", "normalised by true class")):
        ax.imshow(matrix / max(matrix.max(), 1e-12), cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, fmt.format(v), ha="center", va="center",
                    color="white" if matrix[i, j] > matrix.max() / 2 else "black", fontsize=13)
        ax.set_xticks([0, 1], [f"pred {c}" for c in CLASS_NAMES])
        ax.set_yticks([0, 1], [f"true {c}" for c in CLASS_NAMES])
        ax.set_title(name)
    fig.suptitle(_title(f"Confusion matrix at threshold {threshold:.4g}", note))
    return fig


def roc_figure(fpr: np.ndarray, tpr: np.ndarray, point: tuple[float, float], auroc: float,
               threshold: float, note: str = "") -> Figure:
    fig = Figure(figsize=(5, 5), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.plot(fpr, tpr, color=DEFECT_COLOR, label=f"ROC (AUROC {auroc:.4f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="chance")
    ax.plot(*point, "o", color=THRESHOLD_COLOR, ms=8,
            label=f"operating point t={threshold:.3g}\nFPR {point[0]:.3f}, TPR {point[1]:.3f}")
    ax.set(xlabel="false positive rate (good parts rejected)", ylabel="true positive rate (recall)",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), title=_title("ROC curve", note))
    ax.legend(loc="lower right", fontsize=8)
    return fig


def pr_figure(precision: np.ndarray, recall: np.ndarray, point: tuple[float, float], ap: float,
              base_rate: float, threshold: float, note: str = "") -> Figure:
    fig = Figure(figsize=(5, 5), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.plot(recall, precision, color=DEFECT_COLOR, drawstyle="steps-post", label=f"PR (AP {ap:.4f})")
    ax.axhline(base_rate, ls=":", color="grey", label=f"defect rate {base_rate:.2f}")
    ax.plot(*point, "o", color=THRESHOLD_COLOR, ms=8,
            label=f"operating point t={threshold:.3g}\nrecall {point[0]:.3f}, precision {point[1]:.3f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
           title=_title("Precision-recall curve", note))
    ax.legend(loc="lower left", fontsize=8)
    return fig


def sweep_figure(sweep: pd.DataFrame, threshold: float, note: str = "") -> Figure:
    """Rates and error counts against the threshold, with the operating point marked."""
    fig = Figure(figsize=(10, 4), dpi=110, layout="constrained")
    rates, counts = fig.subplots(1, 2)
    for name in ("accuracy", "precision", "recall", "f1"):
        rates.plot(sweep["threshold"], sweep[name], marker=".", label=name)
    rates.set(xlabel="threshold", ylabel="value", ylim=(-0.02, 1.02), title="rates")
    counts.plot(sweep["threshold"], sweep["fp"], marker=".", color=GOOD_COLOR, label="FP (good rejected)")
    counts.plot(sweep["threshold"], sweep["fn"], marker=".", color=DEFECT_COLOR, label="FN (defect passed)")
    counts.set(xlabel="threshold", ylabel="images", title="errors")
    for ax in (rates, counts):
        ax.axvline(threshold, color=THRESHOLD_COLOR, ls="--", label=f"chosen {threshold:.3g}")
        ax.legend(fontsize=8)
    fig.suptitle(_title("Threshold sweep", note))
    return fig


def histogram_figure(p_defect: np.ndarray, labels: np.ndarray, threshold: float, note: str = "",
                     bins: int = 40) -> Figure:
    fig = Figure(figsize=(7, 4), dpi=110, layout="constrained")
    ax = fig.subplots()
    edges = np.linspace(0, 1, bins + 1)
    for label, color in ((0, GOOD_COLOR), (1, DEFECT_COLOR)):
        values = p_defect[labels == label]
        ax.hist(values, bins=edges, alpha=0.6, color=color,
                label=f"true {CLASS_NAMES[label]} ({len(values)})")
    ax.axvline(threshold, color=THRESHOLD_COLOR, ls="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="p_defect", ylabel="images", title=_title("Scores per true class", note))
    ax.legend(fontsize=8)
    return fig


def reliability_figure(curves: Mapping[str, Sequence[float]], labels, n_bins: int = 10,
                       title: str = "Reliability", note: str = "") -> Figure:
    """Observed defect rate per bin of p_defect, one line per probability variant."""
    from defect_detection.evaluation.calibration import ece, reliability_bins

    labels = np.asarray(labels)
    fig = Figure(figsize=(5.5, 5.5), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfectly calibrated")
    for name, p in curves.items():
        p = np.asarray(p, dtype=np.float64)
        b = reliability_bins(p, labels, n_bins)
        keep = b["count"] > 0
        ax.plot(b["mean_p"][keep], b["rate"][keep], marker="o",
                label=f"{name} (ECE {ece(p, labels, n_bins):.4f})")
    ax.set(xlabel="mean p_defect in bin", ylabel="observed defect rate", xlim=(-0.02, 1.02),
           ylim=(-0.02, 1.02), title=_title(title, note))
    ax.legend(fontsize=8, loc="upper left")
    return fig


def gallery_figure(images: Sequence[np.ndarray], titles: Sequence[str], heading: str,
                   columns: int = 6) -> Figure:
    """A grid of thumbnails with one title each; a text panel when there is nothing to show."""
    if not images:
        fig = Figure(figsize=(6, 2), dpi=110, layout="constrained")
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, f"{heading}\nno errors", ha="center", va="center", fontsize=13)
        return fig
    columns = min(columns, len(images))
    rows = int(np.ceil(len(images) / columns))
    fig = Figure(figsize=(2.6 * columns, 3.0 * rows + 0.6), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, title in zip(axes, images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=7)
    fig.suptitle(heading)
    return fig
