"""`defect-data`: look at a dataset before a long job: counts, split, audit warnings, figures.

Composes the same data/split/backbone/augmentation groups as train, so what it shows is what a
training run with the same overrides would use; nothing is trained.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from defect_detection.base import UserError
from defect_detection.data.audit import AuditWarning
from defect_detection.data.records import records_from_config
from defect_detection.data.summary import DataSummary, DecodeOnDemand, write_data_summary
from defect_detection.data.transforms import build_train_transform
from defect_detection.schema import validate_data_config

log = logging.getLogger(__name__)
SHOWN_PATHS = 5


def data_summary(cfg: DictConfig, console: Console | None = None) -> DataSummary:
    """Read the records, split them as train would, write the summary to cfg.out_dir and print it."""
    console = console or Console()
    start = time.perf_counter()
    validate_data_config(cfg.data)
    records = records_from_config(cfg.data.records)
    split, split_error = None, None
    try:
        split = instantiate(cfg.split.make)(records)
    except UserError as err:  # still show the counts and the audit: they explain why it failed
        split_error = AuditWarning("split", f"split={cfg.split.name} failed: {err}")
    bb, size = cfg.backbone, int(cfg.data.image_size)
    preview = None
    if split is not None:
        preview = DecodeOnDemand(split.train, size, build_train_transform(cfg.augmentation, size,
                                                                          bb.mean, bb.std))
    summary = write_data_summary(cfg.out_dir, split, records, mean=bb.mean, std=bb.std,
                                 train_dataset=preview, samples_per_type=cfg.samples_per_type,
                                 preview_images=cfg.preview_images, seed=cfg.seed,
                                 extra_warnings=[split_error] if split_error else [])
    print_summary(summary, console, title=f"{cfg.data.name} at {cfg.data.root} (split={cfg.split.name})")
    console.print(f"wrote {len(summary.files)} files to {Path(cfg.out_dir).resolve()} "
                  f"in {time.perf_counter() - start:.1f} s")
    return summary


def print_summary(summary: DataSummary, console: Console, title: str = "images per split") -> None:
    wide = summary.wide
    table = Table(title=title, title_justify="left")
    for column in wide.columns:
        numeric = column not in ("category", "defect_type", "label")
        table.add_column(str(column).replace("_", " "), justify="right" if numeric else "left")
    for i, row in enumerate(wide.itertuples(index=False)):
        style = "bold" if i == len(wide) - 1 else ("red" if row.label == "defect" else None)
        table.add_row(*(str(v) for v in row), style=style, end_section=i == len(wide) - 2)
    console.print(table)
    if not summary.warnings:
        console.print("[green]audit: no problems found[/green]")
        return
    audit = Table(title=f"audit: {len(summary.warnings)} warning(s)", title_justify="left",
                  show_lines=True)
    audit.add_column("check", style="yellow")
    audit.add_column("warning")
    audit.add_column("paths", overflow="fold")
    for w in summary.warnings:
        paths = "\n".join(w.paths[:SHOWN_PATHS])
        if len(w.paths) > SHOWN_PATHS:
            paths += f"\n... {len(w.paths) - SHOWN_PATHS} more in audit.json"
        audit.add_row(w.check, w.message, paths)
    console.print(audit)
