"""The test report: every table and figure that shows what the chosen threshold does on test.

One function, `write_report`, turns a prediction table (one row per scored image) into files
under a local folder and, when a RunTracker is given, logs the same files under `reports/` in
the run plus the metrics. Training calls it through `log_test_report`; `defect-eval` calls it
on the scores of a saved model. Every number in the report comes from the same table, so the
files agree with each other by construction.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_precision_recall_curve,
    binary_roc,
)

from defect_detection.base import CLASS_NAMES, UserError
from defect_detection.data.records import ImageRecord
from defect_detection.evaluation import errors, figures
from defect_detection.evaluation.calibration import ece, probabilities
from defect_detection.evaluation.thresholds import ThresholdChoice, counts_at

if TYPE_CHECKING:  # a tracker is handed in; evaluation does not depend on tracking
    from defect_detection.tracking.mlflow_run import RunTracker

log = logging.getLogger(__name__)

REPORT_DIR = "reports"
SWEEP = np.round(np.arange(0.05, 0.951, 0.05), 2)
# What the LightningModule already logs on test: the report logs these only when asked to
# (defect-eval), so a training run never holds two values under one name.
CORE_METRICS = ("auroc", "ap", "accuracy", "precision", "recall", "f1", "tp", "fp", "fn", "tn", "threshold")
LEAKY_NOTE = ("LEAKY PROTOCOL: these images were also the validation set (checkpoint selection and, in "
              "the seed, the threshold): every number here is optimistic. Use split=stratified.")
PREDICTION_COLUMNS = ["path", "category", "defect_type", "label", "p_defect", "pred", "decision",
                      "outcome", "split"]


def prediction_table(records: Sequence[ImageRecord], p_defect, threshold: float, split: str = "test",
                     labels=None) -> pd.DataFrame:
    """One row per image: what it is, its score and the decision at `threshold`."""
    p = np.asarray(p_defect, dtype=np.float64).ravel()
    if len(p) != len(records):
        raise ValueError(f"{len(p)} scores for {len(records)} records")
    label = np.array([r.label for r in records], dtype=int)
    if labels is not None and not np.array_equal(np.asarray(labels, dtype=int), label):
        raise ValueError("the scored labels do not match the records' labels: index mapping is broken")
    pred = (p >= threshold).astype(int)
    return pd.DataFrame({
        "path": [r.path for r in records], "category": [r.category for r in records],
        "defect_type": [r.defect_type for r in records], "label": label, "p_defect": p, "pred": pred,
        "decision": np.asarray(CLASS_NAMES)[pred], "outcome": errors.outcomes(label, pred), "split": split,
    }, columns=PREDICTION_COLUMNS)


def table_from_outputs(outputs: Mapping[str, torch.Tensor], records: Sequence[ImageRecord],
                       threshold: float, split: str = "test") -> pd.DataFrame:
    """The prediction table of a module stage: outputs['index'] points into the stage's records."""
    index = outputs["index"].tolist()
    return prediction_table([records[i] for i in index], outputs["p_defect"].numpy(), threshold, split,
                            labels=outputs["label"].numpy())


def _rates(tp, fp, fn, tn) -> dict[str, np.ndarray]:
    tp, fp, fn, tn = (np.asarray(v, dtype=float) for v in (tp, fp, fn, tn))
    with np.errstate(invalid="ignore", divide="ignore"):  # zero_division=0, as the module's metrics
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    accuracy = (tp + tn) / np.maximum(tp + fp + fn + tn, 1)
    return {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1}


def threshold_sweep(table: pd.DataFrame, grid: Sequence[float] = SWEEP) -> pd.DataFrame:
    """Accuracy, precision, recall, F1, FP, FN of the table's scores at each threshold of `grid`."""
    grid = np.asarray(grid, dtype=float)
    c = counts_at(table.p_defect.to_numpy(), table.label.to_numpy(), grid)
    rates = _rates(c["tp"], c["fp"], c["fn"], c["tn"])
    return pd.DataFrame({"threshold": grid, **rates, "tp": c["tp"], "fp": c["fp"], "fn": c["fn"],
                         "tn": c["tn"]})


def summary_metrics(table: pd.DataFrame, threshold: float, n_bins: int = 10) -> dict[str, float]:
    """The headline metrics of the table at `threshold` (ranking metrics NaN with a single class)."""
    y = torch.tensor(table.label.to_numpy(copy=True))  # copies: pandas 3 arrays are read-only
    p = torch.tensor(table.p_defect.to_numpy(copy=True), dtype=torch.float32)
    counts = {k: int(v) for k, v in zip(("tp", "fp", "fn", "tn"), [
        ((table.label == 1) & (table.pred == 1)).sum(), ((table.label == 0) & (table.pred == 1)).sum(),
        ((table.label == 1) & (table.pred == 0)).sum(), ((table.label == 0) & (table.pred == 0)).sum()])}
    both = len(np.unique(table.label)) == 2
    out = {"auroc": float(binary_auroc(p, y)) if both else float("nan"),
           "ap": float(binary_average_precision(p, y)) if both else float("nan"),
           **{k: float(v) for k, v in _rates(**counts).items()}, **counts,
           "threshold": float(threshold), "n": len(table), "ece": ece(p, y, n_bins)}
    return out


def classification_report(counts: Mapping[str, int]) -> dict:
    """Per-class precision/recall/F1/support plus accuracy and macro/weighted averages."""
    tp, fp, fn, tn = (counts[k] for k in ("tp", "fp", "fn", "tn"))
    per = {CLASS_NAMES[1]: _rates(tp, fp, fn, tn), CLASS_NAMES[0]: _rates(tn, fn, fp, tp)}
    support = {CLASS_NAMES[1]: tp + fn, CLASS_NAMES[0]: tn + fp}
    report = {c: {"precision": float(per[c]["precision"]), "recall": float(per[c]["recall"]),
                  "f1-score": float(per[c]["f1"]), "support": int(support[c])} for c in CLASS_NAMES}
    total = max(sum(support.values()), 1)
    for name, weight in (("macro avg", {c: 0.5 for c in CLASS_NAMES}),
                         ("weighted avg", {c: support[c] / total for c in CLASS_NAMES})):
        report[name] = {k: float(sum(weight[c] * report[c][k] for c in CLASS_NAMES))
                        for k in ("precision", "recall", "f1-score")} | {"support": int(total)}
    report["accuracy"] = float((tp + tn) / total)
    return report


def _report_text(report: dict, header: Sequence[str]) -> str:
    lines = [*header, "", f"{'':>14}{'precision':>11}{'recall':>9}{'f1-score':>10}{'support':>9}"]
    total = sum(report[c]["support"] for c in CLASS_NAMES)
    for name in (*CLASS_NAMES, "macro avg", "weighted avg"):
        r = report[name]
        lines.append(f"{name:>14}{r['precision']:>11.4f}{r['recall']:>9.4f}{r['f1-score']:>10.4f}"
                     f"{r['support']:>9d}")
        if name == CLASS_NAMES[-1]:
            lines.append(f"{'accuracy':>14}{'':>20}{report['accuracy']:>10.4f}{total:>9d}")
    return "\n".join(lines) + "\n"


def metric_name(text: str) -> str:
    """A group name made safe for an MLflow metric key."""
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", str(text))


class _Sink:
    """Writes each report file under a local folder and logs it to the tracker under reports/."""

    def __init__(self, folder: Path, tracker: RunTracker | None) -> None:
        self.folder, self.tracker, self.files = folder, tracker, []

    def _logged(self, path: Path) -> None:
        rel = path.relative_to(self.folder)
        self.files.append(str(rel))
        if self.tracker is not None and self.tracker.enabled:
            self.tracker.log_artifact(path, str(Path(REPORT_DIR) / rel.parent))

    def _path(self, name: str) -> Path:
        path = self.folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def json(self, data, name: str) -> None:
        path = self._path(name)
        path.write_text(json.dumps(data, indent=2, default=_jsonable, allow_nan=True))
        self._logged(path)

    def text(self, text: str, name: str) -> None:
        path = self._path(name)
        path.write_text(text)
        self._logged(path)

    def csv(self, frame: pd.DataFrame, name: str) -> None:
        path = self._path(name)
        frame.to_csv(path, index=False)
        self._logged(path)

    def figure(self, fig, name: str) -> None:
        path = self._path(name)
        fig.savefig(path)
        self._logged(path)


def _jsonable(value):
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_report(table: pd.DataFrame, choice: ThresholdChoice, *, out_dir: str | Path | None = None,
                 tracker: RunTracker | None = None, prefix: str = "test/", leaky: bool = False,
                 logits: torch.Tensor | None = None, temperature: float = 1.0,
                 context: Mapping[str, object] | None = None, log_core_metrics: bool = True,
                 n_bins: int = 10, gallery_max: int = 36) -> dict:
    """Write the full report for `table` (decisions at choice.value) and return its summary.

    out_dir: local folder for the files (a temporary one when None). tracker: when enabled, the
    files go to `reports/` in its run and the metrics are logged with `prefix`. logits: the
    uncalibrated two-class logits of the table's rows, to show calibration before/after.
    """
    if table.empty:
        raise UserError("Nothing to report: the scored split has no images.")
    t = float(choice.value)
    if not np.array_equal(table.pred.to_numpy(), (table.p_defect.to_numpy() >= t).astype(int)):
        raise ValueError("the table's decisions were not made at the chosen threshold")
    note = "LEAKY: test = val" if leaky else ""
    header = [f"threshold {t:.6g} ({choice.policy}, chosen on {choice.chosen_on}); "
              f"scored split: {', '.join(sorted(table.split.unique()))}; {len(table)} images"]
    if leaky:
        header.insert(0, LEAKY_NOTE)
    metrics = summary_metrics(table, t, n_bins)
    labels, p = table.label.to_numpy(copy=True), table.p_defect.to_numpy(copy=True)
    if logits is not None and temperature != 1.0:
        metrics["ece_uncalibrated"] = ece(probabilities(logits), labels, n_bins)
    by_category = errors.group_table(table, ["category"])
    by_type = errors.group_table(table, ["category", "defect_type"])
    group_recall = {f"recall_{metric_name(r.category)}": r.recall for r in by_category.itertuples()}
    group_recall |= {f"recall_{metric_name(r.category)}_{metric_name(r.defect_type)}": r.recall
                     for r in by_type.itertuples() if r.defect_type != "good"}
    group_recall = {k: float(v) for k, v in group_recall.items() if np.isfinite(v)}

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        sink = _Sink(folder, tracker)
        sink.csv(table, "predictions.csv")
        counts = np.array([[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]])
        rows = counts.sum(1, keepdims=True)
        sink.json({"threshold": t, "labels": list(CLASS_NAMES), "rows": "true class", "columns": "predicted",
                   "counts": counts.tolist(),
                   "normalised": np.divide(counts, rows, out=np.zeros((2, 2)), where=rows > 0).tolist(),
                   "leaky_protocol": leaky}, "confusion_matrix.json")
        sink.figure(figures.confusion_figure(counts, t, note), "confusion_matrix.png")
        report = classification_report(metrics)
        sink.json({"leaky_protocol": leaky, "threshold": t, **report}, "classification_report.json")
        sink.text(_report_text(report, header), "classification_report.txt")
        sweep = threshold_sweep(table).assign(leaky_protocol=leaky)
        sink.csv(sweep, "threshold_sweep.csv")
        sink.figure(figures.sweep_figure(sweep, t, note), "threshold_sweep.png")
        sink.figure(figures.histogram_figure(p, labels, t, note), "score_histogram.png")
        if np.isfinite(metrics["auroc"]):
            pt, yt = torch.tensor(p, dtype=torch.float32), torch.tensor(labels)
            fpr, tpr, _ = binary_roc(pt, yt)
            fp_rate = metrics["fp"] / max(metrics["fp"] + metrics["tn"], 1)
            sink.figure(figures.roc_figure(fpr.numpy(), tpr.numpy(), (fp_rate, metrics["recall"]),
                                           metrics["auroc"], t, note), "roc_curve.png")
            precision, recall, _ = binary_precision_recall_curve(pt, yt)
            sink.figure(figures.pr_figure(precision.numpy(), recall.numpy(),
                                          (metrics["recall"], metrics["precision"]), metrics["ap"],
                                          float(labels.mean()), t, note), "pr_curve.png")
        else:
            log.warning("report: the scored images hold a single class; no ROC/PR curves")
        curves = {"as decided" + (f" (T = {temperature:.3g})" if temperature != 1.0 else ""): p}
        if "ece_uncalibrated" in metrics:
            curves = {"uncalibrated": probabilities(logits).numpy(), **curves}
        sink.figure(figures.reliability_figure(curves, labels, n_bins, "Reliability", note),
                    "reliability_diagram.png")
        sink.csv(by_category, "recall_by_category.csv")
        sink.csv(by_type, "recall_by_defect_type.csv")
        wrong = errors.misclassified(table, t)
        sink.json(errors.error_counts(table), "errors/error_counts.json")
        sink.csv(wrong, "errors/misclassified.csv")
        images, titles = errors.gallery_items(wrong, gallery_max)
        heading = f"Misclassified at threshold {t:.4g}: {len(wrong)} of {len(table)}" + (
            f" (showing {len(images)})" if len(images) < len(wrong) else "") + (f" [{note}]" if note else "")
        sink.figure(figures.gallery_figure(images, titles, heading), "errors/gallery.png")
        summary = {
            "leaky_protocol": leaky, **({"warning": LEAKY_NOTE} if leaky else {}),
            "threshold": {"value": t, "policy": choice.policy, "chosen_on": choice.chosen_on},
            "temperature": float(temperature), "metrics": metrics, "group_recall": group_recall,
            "n_images": {"total": len(table), "good": int((labels == 0).sum()),
                         "defect": int((labels == 1).sum())},
            **({"context": dict(context)} if context else {}),
        }
        summary["files"] = [*sink.files, "summary.json"]
        sink.json(summary, "summary.json")

    if tracker is not None and tracker.enabled:
        logged = {k: v for k, v in metrics.items() if log_core_metrics or k not in CORE_METRICS}
        logged |= group_recall
        tracker.log_metrics({f"{prefix}{k}": v for k, v in logged.items() if np.isfinite(v)})
        if leaky:
            tracker.set_tags({"report_warning": LEAKY_NOTE})
    return summary


def log_test_report(tracker: RunTracker, outputs: Mapping[str, torch.Tensor],
                    records: Sequence[ImageRecord], choice: ThresholdChoice, *, leaky: bool = False,
                    temperature: float = 1.0, out_dir: str | Path | None = None) -> dict:
    """The training run's test report from module.outputs['test'] and the test records."""
    table = table_from_outputs(outputs, records, choice.value, "test")
    return write_report(table, choice, out_dir=out_dir, tracker=tracker, leaky=leaky,
                        logits=outputs.get("logits"), temperature=temperature, log_core_metrics=False)
