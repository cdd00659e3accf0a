"""Check every image before training: one list of bad files, then stop (error) or drop them (skip).

The scan is cheap (header, pixel count and the format's own integrity check, see
images.verify_image), so it runs on every train before the split: a bad file never surfaces
mid-epoch, and under `skip` the split, the loss weights and the logged list all see the same data.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
from rich.progress import Progress

from defect_detection.base import UserError
from defect_detection.data.images import DEFAULT_MAX_PIXELS, BadImageError, set_max_image_pixels, verify_image
from defect_detection.data.records import IMAGE_SUFFIXES, ImageRecord, check_records, records_from_config
from defect_detection.naming import printable, utf8_problem
from defect_detection.schema import DataSchema

log = logging.getLogger(__name__)

OnBadImage = Literal["error", "skip"]


@dataclass(frozen=True)
class BadImage:
    """One unusable file; `role` is image or mask (a bad mask drops only the mask under skip)."""

    path: str
    reason: str
    role: str = "image"
    category: str = ""
    defect_type: str = ""


def check_image(path: str | Path) -> str | None:
    """Why `path` cannot be used as an image, or None when it can."""
    if problem := utf8_problem(path):  # the CSVs, logs and MLflow artifacts would all fail on it
        return problem
    try:
        verify_image(path)
    except BadImageError as err:
        return err.reason
    return None


def scan_records(records: Sequence[ImageRecord], progress: bool = True) -> list[BadImage]:
    """Every bad image and mask among `records`, in record order."""
    bad: list[BadImage] = []
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(f"checking {len(records)} images", total=len(records))
        for r in records:
            for role, path in (("image", r.path), ("mask", r.mask_path)):
                reason = check_image(path) if path else None
                if reason:
                    bad.append(BadImage(path, reason, role, r.category, r.defect_type))
            bar.advance(task)
    return bad


def describe_bad_images(bad: Sequence[BadImage], where: str) -> str:
    lines = [f"  {printable(b.path)}: {b.reason}" + (" (mask)" if b.role == "mask" else "") for b in bad]
    return (f"{len(bad)} bad image file(s) under {where}:\n" + "\n".join(lines) +
            "\nFix or remove them, or set data.on_bad_image=skip to train without them "
            "(the list is then logged to the run as data/bad_images.csv).")


def screen_records(records: Sequence[ImageRecord], on_bad_image: OnBadImage = "error",
                   max_image_pixels: int | None = DEFAULT_MAX_PIXELS, where: str = "the dataset",
                   progress: bool = True) -> tuple[list[ImageRecord], list[BadImage]]:
    """(usable records, bad files). `error` raises one UserError listing every bad file; `skip`
    drops bad images (and bad masks from otherwise good records) with a warning.

    `max_image_pixels` (None or 0: no limit) is applied process-wide (PIL's guard), so the
    decode that follows agrees with the scan.
    """
    if on_bad_image not in ("error", "skip"):
        raise UserError(f"data.on_bad_image={on_bad_image!r}: use 'error' or 'skip'.")
    set_max_image_pixels(max_image_pixels)
    bad = scan_records(records, progress)
    if not bad:
        return list(records), []
    if on_bad_image == "error":
        raise UserError(describe_bad_images(bad, where))
    bad_images = {b.path for b in bad if b.role == "image"}
    bad_masks = {b.path for b in bad if b.role == "mask"}
    kept = [dataclasses.replace(r, mask_path=None) if r.mask_path in bad_masks else r
            for r in records if r.path not in bad_images]
    log.warning("data.on_bad_image=skip: %s", describe_bad_images(bad, where).split("\nFix")[0])
    log.warning("Skipped %d bad image(s) and %d bad mask(s); training on %d of %d images.",
                len(bad_images), len(bad_masks), len(kept), len(records))
    check_records(kept, f"{where} (after skipping {len(bad_images)} bad images)")
    return kept, bad


def screened_records(data: DataSchema) -> tuple[list[ImageRecord], list[BadImage]]:
    """The records exactly as training sees them: read, checked, bad files handled per
    data.on_bad_image. Every command that re-creates train's split (evaluate, the data summary)
    must start here: a file skipped in one place but not the other shifts the whole split."""
    records = records_from_config(data.records)
    check_records(records, str(data.root))
    return screen_records(records, data.on_bad_image, data.max_image_pixels, f"data.root={data.root}")


def screened_extra(data: DataSchema) -> dict[str, list[ImageRecord]]:
    """The parts of each data.extra_roots folder (good/, defect/<type>/), checked like the main data.

    Their category is the data's own when it has one (a reviewed batch of a one-category line),
    else `reviewed`."""
    from defect_detection.data.records import read_folder

    category = data.categories[0] if len(data.categories) == 1 else "reviewed"
    out = {}
    for root in data.extra_roots:
        records = read_folder(root, category)
        if not records:
            raise UserError(f"data.extra_roots: {root} holds no images (expected good/ and defect/<type>/).")
        out[str(root)] = screen_records(
            records, data.on_bad_image, data.max_image_pixels, f"data.extra_roots {root}"
        )[0]
    return out


def bad_images_frame(bad: Sequence[BadImage]) -> pd.DataFrame:
    """The run artifact data/bad_images.csv."""
    columns = [f.name for f in dataclasses.fields(BadImage)]
    return pd.DataFrame([{**dataclasses.asdict(b), "path": printable(b.path)} for b in bad], columns=columns)


def _walk(root: Path) -> list[Path]:
    """Image files under root, links followed but each real folder entered once (no loops)."""
    out, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        out += [Path(folder) / f for f in sorted(files) if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return out


def safe_image_paths(source: str | Path, follow_symlinks: bool = False) -> list[Path]:
    """Image paths of a file, a folder (recursive) or a glob, confined to their input root.

    The root is the folder itself, the file's folder, or the glob's part before its first
    wildcard. Unless `follow_symlinks`, every path must resolve inside the root: a symlink to a
    file or folder outside it, or `..` after a wildcard, raises UserError naming the path, and so
    do broken links and symlink loops. Folder walks never loop, even through linked folders.
    """
    checked = checked_image_paths(source, follow_symlinks)
    for _, reason in checked:
        if reason:
            raise UserError(reason)
    return [p for p, _ in checked]


def checked_image_paths(source: str | Path, follow_symlinks: bool = False) -> list[tuple[Path, str | None]]:
    """Like safe_image_paths, but every path with why it is refused (None: usable) instead of
    stopping at the first: what commands that report one row per input use. A missing source,
    or one without images, is one (source, reason) entry."""
    text = os.path.expanduser(str(source))
    if glob.has_magic(text):
        root = _glob_root(text)
        paths = [Path(p) for p in sorted(glob.glob(text, recursive=True))
                 if Path(p).suffix.lower() in IMAGE_SUFFIXES]
    else:
        path = Path(text)
        if not path.exists() and not path.is_symlink():
            return [(path, f"Input not found: {path}.")]
        root, paths = (path, _walk(path)) if path.is_dir() else (path.parent, [path])
    if not paths:
        return [(Path(text), f"No images ({', '.join(IMAGE_SUFFIXES)}) found at {source}.")]
    if follow_symlinks:
        return [(p, utf8_problem(p)) for p in paths]
    real_root = Path(os.path.realpath(root))
    return [(p, utf8_problem(p) or _outside_reason(p, root, real_root)) for p in paths]


def _outside_reason(p: Path, root: Path, real_root: Path) -> str | None:
    if p.is_symlink() and not p.exists():
        return f"{p} is a broken symlink or a symlink loop; remove it from {root}."
    real = Path(os.path.realpath(p))
    if real_root not in real.parents:
        return (f"{p} resolves to {real}, outside the input root {real_root}; copy the "
                "file into the input folder, or pass follow_symlinks=true to read links out of it.")
    return None


def _glob_root(pattern: str) -> Path:
    """The folder a glob cannot leave by itself: its components before the first wildcard."""
    fixed = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")
