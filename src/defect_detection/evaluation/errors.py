"""Error analysis on a prediction table: per-group recall and error counts, the misclassified images."""

from __future__ import annotations

import numpy as np
import pandas as pd

from defect_detection.base import CLASS_NAMES, UserError
from defect_detection.data.geometry import load_resized


def outcomes(label: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """TP / FP / FN / TN per image (defect is the positive class)."""
    label, pred = np.asarray(label).astype(bool), np.asarray(pred).astype(bool)
    return np.select([label & pred, ~label & pred, label & ~pred], ["TP", "FP", "FN"], "TN")


def group_table(table: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Counts, recall (defects found) and FP rate (good parts rejected) per group of `by`."""
    t = table.assign(tp=table.outcome.eq("TP"), fp=table.outcome.eq("FP"), fn=table.outcome.eq("FN"),
                     tn=table.outcome.eq("TN"), n_defect=table.label.eq(1), n_good=table.label.eq(0))
    cols = ["n_good", "n_defect", "tp", "fn", "fp", "tn"]
    out = t.groupby(by, sort=True)[cols].sum().astype(int).reset_index()
    out.insert(len(by), "n", out.n_good + out.n_defect)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["recall"] = np.where(out.n_defect > 0, out.tp / out.n_defect.replace(0, 1), np.nan)
        out["fp_rate"] = np.where(out.n_good > 0, out.fp / out.n_good.replace(0, 1), np.nan)
    out["errors"] = out.fp + out.fn
    out["error_rate"] = out.errors / out.n
    return out


def error_counts(table: pd.DataFrame) -> dict:
    """FP/FN totals and per category and per (category, defect type), for the JSON report."""
    def rows(by):
        g = group_table(table, by)
        return {"/".join(str(r[k]) for k in by): {"n": int(r.n), "fp": int(r.fp), "fn": int(r.fn),
                                                   "errors": int(r.errors)} for _, r in g.iterrows()}

    return {"total": {"n": len(table), "fp": int(table.outcome.eq("FP").sum()),
                      "fn": int(table.outcome.eq("FN").sum()),
                      "errors": int(table.outcome.isin(["FP", "FN"]).sum())},
            "by_category": rows(["category"]), "by_defect_type": rows(["category", "defect_type"])}


def misclassified(table: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Wrong decisions, the most confidently wrong (farthest from the threshold) first."""
    wrong = table[table.outcome.isin(["FP", "FN"])]
    return wrong.iloc[np.argsort(-np.abs(wrong.p_defect.to_numpy() - threshold), kind="stable")]


def gallery_items(wrong: pd.DataFrame, max_images: int = 36, size: int = 160) -> tuple[list, list[str]]:
    """Thumbnails and titles (true/pred, p_defect, category, defect type) of misclassified images."""
    images, titles = [], []
    for row in wrong.head(max_images).itertuples():
        try:
            image = load_resized(row.path, size)
        except UserError:
            image = np.full((size, size, 3), 128, dtype=np.uint8)  # the title still names the file
        images.append(image)
        titles.append(f"true {CLASS_NAMES[int(row.label)]} | pred {CLASS_NAMES[int(row.pred)]}\n"
                      f"p_defect {row.p_defect:.3f}\n{row.category} / {row.defect_type}")
    return images, titles
