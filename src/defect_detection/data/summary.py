"""The dataset summary written with every run and by `defect-data`: tables, audit, figures.

One folder holds it all (splits.csv, counts.csv/.md, audit.json/.md, class_balance.png,
samples/<category>.png, augmented_batch.png); train logs that folder under `data/` in MLflow.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from torch.utils.data import Dataset

from defect_detection.base import CLASS_NAMES
from defect_detection.data.audit import AuditWarning, audit_records
from defect_detection.data.geometry import load_resized
from defect_detection.data.previews import (
    augmented_batch_figure,
    class_balance_figure,
    sample_grid_figure,
)
from defect_detection.data.records import ImageRecord
from defect_detection.data.splits import SPLITS, Split
from defect_detection.naming import file_safe

log = logging.getLogger(__name__)
UNUSED = "unused"  # read from disk but in no split (e.g. test/good under split=seed)
KEYS = ["category", "defect_type", "label"]
MAX_MD_PATHS = 50


@dataclass
class DataSummary:
    assignment: pd.DataFrame  # one row per (image, split): path, category, defect_type, label, split
    counts: pd.DataFrame  # long: split, category, defect_type, label, images
    warnings: list[AuditWarning]
    files: list[Path] = field(default_factory=list)

    @property
    def wide(self) -> pd.DataFrame:
        return counts_wide(self.assignment)


def assignment_table(split: Split | None, records: Sequence[ImageRecord] = ()) -> pd.DataFrame:
    """Split.assignment() rows plus the records no split uses; labels as class names."""
    rows = split.assignment() if split else []
    used = {row["path"] for row in rows}
    rows += [{**r.to_dict(), "split": UNUSED} for r in records if r.path not in used]
    frame = pd.DataFrame(rows, columns=["path", *KEYS, "split"])
    frame["label"] = frame["label"].map(lambda v: CLASS_NAMES[int(v)])
    return frame


def _split_order(names) -> list[str]:
    return [s for s in (*SPLITS, UNUSED) if s in set(names)]


def _row_order(frame: pd.DataFrame) -> pd.DataFrame:
    """Category, then good before defect, then type name: how a person reads the table."""
    key = frame["label"].map({name: i for i, name in enumerate(CLASS_NAMES)})
    return (frame.assign(_k=key).sort_values(["category", "_k", "defect_type"])
            .drop(columns="_k").reset_index(drop=True))


def counts_table(assignment: pd.DataFrame) -> pd.DataFrame:
    """Images per split x category x defect type x label (long format, for CSV and plots)."""
    counts = assignment.groupby(["split", *KEYS]).size().rename("images").reset_index()
    order = {s: i for i, s in enumerate(_split_order(counts["split"]))}
    counts = _row_order(counts)
    return counts.sort_values("split", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)


def counts_wide(assignment: pd.DataFrame) -> pd.DataFrame:
    """One row per category/type/label, one column per split, `images` = distinct files, and a total row."""
    wide = assignment.pivot_table(index=KEYS, columns="split", values="path", aggfunc="count",
                                  fill_value=0)
    wide = wide.reindex(columns=_split_order(assignment["split"]), fill_value=0)
    wide["images"] = assignment.drop_duplicates("path").groupby(KEYS).size()
    wide = _row_order(wide.reset_index())
    total = {**dict.fromkeys(KEYS, ""), "category": "all",
             **{c: int(wide[c].sum()) for c in wide.columns if c not in KEYS}}
    wide = pd.concat([wide, pd.DataFrame([total])], ignore_index=True)
    wide.columns.name = None
    return wide


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub markdown table (pandas' to_markdown needs tabulate, which this project doesn't ship)."""
    header = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def audit_markdown(warnings: Sequence[AuditWarning]) -> str:
    if not warnings:
        return "# Data audit\n\nNo problems found.\n"
    out = [f"# Data audit\n\n{len(warnings)} warning(s).\n"]
    for w in warnings:
        out.append(f"\n## {w.check}\n\n{w.message}\n")
        out += [f"- `{p}`" for p in w.paths[:MAX_MD_PATHS]]
        if len(w.paths) > MAX_MD_PATHS:
            out.append(f"- ... and {len(w.paths) - MAX_MD_PATHS} more (audit.json lists them all)")
    return "\n".join(out) + "\n"


class DecodeOnDemand(Dataset):
    """(transformed image, label, index) decoded from disk per item, for previews without a full cache."""

    def __init__(self, records: Sequence[ImageRecord], image_size: int, transform) -> None:
        self.records, self.image_size, self.transform = records, image_size, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        pixels = torch.from_numpy(np.array(load_resized(self.records[index].path, self.image_size)))
        return self.transform(pixels.permute(2, 0, 1).contiguous()), self.records[index].label, index


def _save(fig: Figure, path: Path, files: list[Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    files.append(path)


def write_data_summary(out_dir: str | Path, split: Split | None, records: Sequence[ImageRecord] = (), *,
                       mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                       train_dataset: Dataset | None = None, samples_per_type: int = 4,
                       preview_images: int = 16, seed: int = 0,
                       extra_warnings: Sequence[AuditWarning] = ()) -> DataSummary:
    """Write every table and figure into out_dir and return them.

    `records` adds images no split uses; `train_dataset[i]` must yield the augmented
    split.train[i] (TensorImageDataset or DecodeOnDemand) for the batch preview;
    `extra_warnings` (e.g. why the split failed) lead the audit.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    assignment = assignment_table(split, records)
    counts = counts_table(assignment)
    every = list({r.path: r for r in [*(split.train + split.val + split.test if split else []),
                                      *records]}.values())
    split_of = (assignment.groupby("path")["split"].agg(lambda s: "+".join(sorted(set(s)))).to_dict())
    warnings = [*extra_warnings, *audit_records(every, split_of)]
    if split is not None and split.leaky:
        shared = sorted({r.path for r in split.val} & {r.path for r in split.test})
        warnings.insert(0, AuditWarning("leaky_split", "; ".join(split.notes) or "leaky split",
                                        tuple(shared)))
    for w in warnings:
        log.warning("data audit [%s]: %s (%d paths)", w.check, w.message, len(w.paths))

    for name, frame in (("splits.csv", assignment), ("counts.csv", counts)):
        frame.to_csv(out / name, index=False)
        files.append(out / name)
    (out / "counts.md").write_text("# Images per split\n\n" + markdown_table(counts_wide(assignment)))
    (out / "audit.json").write_text(json.dumps([w.to_dict() for w in warnings], indent=1))
    (out / "audit.md").write_text(audit_markdown(warnings))
    files += [out / "counts.md", out / "audit.json", out / "audit.md"]

    _save(class_balance_figure(counts), out / "class_balance.png", files)
    for category in sorted({r.category for r in every}):
        _save(sample_grid_figure(every, category, samples_per_type, split_of),
              out / "samples" / f"{file_safe(category)}.png", files)
    if split is not None and train_dataset is not None and len(train_dataset):
        rng = np.random.default_rng(seed)
        indices = sorted(rng.choice(len(train_dataset), min(preview_images, len(train_dataset)),
                                    replace=False).tolist())
        _save(augmented_batch_figure(train_dataset, indices, mean, std, split.train, seed),
              out / "augmented_batch.png", files)
    return DataSummary(assignment, counts, warnings, files)


def log_data_summary(tracker, cfg, datamodule) -> DataSummary | None:
    """Before fit: write the summary of this run's split and log it under `data/` in the run.

    Sets the datamodule up first (idempotent; fit reuses the cached tensors) so the preview shows
    the real train transform on the real cached images. Off with `log_data_summary=false`.
    """
    if not tracker.enabled or not cfg.get("log_data_summary", True):
        return None
    datamodule.setup("fit")
    with tempfile.TemporaryDirectory() as tmp:
        summary = write_data_summary(tmp, datamodule.split, mean=cfg.backbone.mean, std=cfg.backbone.std,
                                     train_dataset=datamodule.datasets["train"], seed=int(cfg.seed))
        for path in summary.files:
            parent = path.parent.relative_to(tmp)
            tracker.log_artifact(path, str(Path("data") / parent))
    tracker.set_tags({"data_warnings": len(summary.warnings)})
    return summary
