"""Image records read from MVTec AD or a plain good/defect folder layout."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from defect_detection import DEFECT, GOOD, UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)


@dataclass(frozen=True)
class ImageRecord:
    """One image and everything the reports need to trace a decision back to it."""

    path: str
    label: int
    category: str
    defect_type: str
    mask_path: str | None = None
    source_split: str = ""  # the split the dataset itself put the file in (MVTec train/test)

    def to_dict(self) -> dict:
        return asdict(self)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _require_dir(path: Path, what: str, fix: str) -> None:
    if not path.is_dir():
        raise UserError(f"{what} not found: {path}. {fix}")


def read_mvtec(root: str | Path, categories: Sequence[str]) -> list[ImageRecord]:
    """Records of <root>/<category>/{train/good, test/<type>}, masks from ground_truth/<type>."""
    root = Path(root).expanduser()
    _require_dir(root, "MVTec root",
                 "Set data.root=/path/to/mvtec (the folder holding bottle/, cable/, ...).")
    if not categories:
        raise UserError("data.categories is empty: name at least one category, e.g. '[bottle]'.")
    records: list[ImageRecord] = []
    for category in categories:
        cat_dir = root / category
        available = sorted(p.name for p in root.iterdir() if p.is_dir())
        _require_dir(cat_dir, f"Category '{category}'",
                     f"Categories present under {root}: {available or 'none'}.")
        _require_dir(cat_dir / "train" / "good", f"Training images of '{category}'",
                     "An MVTec category needs train/good/ with images.")
        for path in _images(cat_dir / "train" / "good"):
            records.append(ImageRecord(str(path), GOOD, category, "good", None, "train"))
        test_dir = cat_dir / "test"
        if not test_dir.is_dir():
            log.warning("%s has no test/ folder: only train/good images are used", cat_dir)
            continue
        for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            defect_type = type_dir.name
            label = GOOD if defect_type == "good" else DEFECT
            mask_dir = cat_dir / "ground_truth" / defect_type
            for path in _images(type_dir):
                mask = mask_dir / f"{path.stem}_mask.png"
                mask_path = str(mask) if label == DEFECT and mask.is_file() else None
                records.append(ImageRecord(str(path), label, category, defect_type, mask_path, "test"))
    return records


def read_folder(root: str | Path, category: str = "folder") -> list[ImageRecord]:
    """Records of <root>/good/* and <root>/defect/<type>/* (or loose files in defect/)."""
    root = Path(root).expanduser()
    _require_dir(root, "Folder dataset root", "Set data.root to a folder with good/ and defect/<type>/.")
    _require_dir(root / "good", "good/ folder", f"Put the good images in {root / 'good'}.")
    _require_dir(root / "defect", "defect/ folder", f"Put defect images in {root / 'defect'}/<type>/.")
    records = [ImageRecord(str(p), GOOD, category, "good") for p in _images(root / "good")]
    defect_dir = root / "defect"
    records += [ImageRecord(str(p), DEFECT, category, "defect") for p in _images(defect_dir)]
    for type_dir in sorted(p for p in defect_dir.iterdir() if p.is_dir()):
        masks = root / "masks" / type_dir.name
        for path in _images(type_dir):
            mask = masks / f"{path.stem}_mask.png"
            records.append(ImageRecord(str(path), DEFECT, category, type_dir.name,
                                       str(mask) if mask.is_file() else None))
    return records


def check_records(records: Sequence[ImageRecord], where: str) -> None:
    """Refuse a dataset that cannot train a two-class model, naming what is missing."""
    if not records:
        raise UserError(f"No images found in {where}. Supported suffixes: {', '.join(IMAGE_SUFFIXES)}.")
    labels = {r.label for r in records}
    if GOOD not in labels:
        raise UserError(f"No good images found in {where}: a good/defect classifier needs both classes.")
    if DEFECT not in labels:
        raise UserError(f"No defect images found in {where}: a good/defect classifier needs both classes.")
