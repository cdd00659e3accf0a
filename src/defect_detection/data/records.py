"""Image records read from MVTec AD or a plain good/defect folder layout."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from defect_detection.base import DEFECT, GOOD, UserError

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


def _unresolvable(path: Path) -> bool:
    """A broken symlink or a symlink loop (exists() is False for both, without hanging)."""
    return path.is_symlink() and not path.exists()


def _images(folder: Path) -> list[Path]:
    """Image files of one folder (never recursive, so a looping folder link cannot hang it).

    Image-named links that do not resolve are kept: the image scan (data/validate.py) then
    reports them as bad files under data.on_bad_image instead of them vanishing silently.
    """
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                  and (p.is_file() or _unresolvable(p)))


def _subdirs(folder: Path) -> list[Path]:
    out = []
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            out.append(p)
        elif _unresolvable(p) and p.suffix.lower() not in IMAGE_SUFFIXES:
            log.warning("Ignoring %s: a broken symlink or a symlink loop.", p)
    return out


def _require_dir(path: Path, what: str, fix: str) -> None:
    if _unresolvable(path):
        raise UserError(f"{what} {path} is a broken symlink or a symlink loop. {fix}")
    if not path.is_dir():
        raise UserError(f"{what} not found: {path}. {fix}")


def _examples(paths: Sequence[Path | str], n: int = 3) -> str:
    shown = ", ".join(str(p) for p in list(paths)[:n])
    return shown + (f" and {len(paths) - n} more" if len(paths) > n else "")


def _masks_for(images: Sequence[Path], mask_dir: Path) -> dict[Path, str | None]:
    """Each image's <stem>_mask.png in mask_dir (or None); warns about either side missing.

    A folder without any masks is fine (masks are optional, only localisation scores use them);
    a mask folder that covers some images but not others, or holds masks of no image, is
    usually a rename or a deletion gone wrong, so both are named.
    """
    if not mask_dir.is_dir():
        return {p: None for p in images}
    masks = {p.name: p for p in _images(mask_dir)}
    found = {p: str(masks[f"{p.stem}_mask.png"]) if f"{p.stem}_mask.png" in masks else None for p in images}
    missing = [p for p, m in found.items() if m is None]
    if missing:
        log.warning("%d image(s) have no mask in %s (expected %s): %s. Localisation is not scored "
                    "for them.", len(missing), mask_dir, f"{missing[0].stem}_mask.png", _examples(missing))
    orphans = sorted(set(masks) - {f"{p.stem}_mask.png" for p in images})
    if orphans:
        folder = images[0].parent if images else "the image folder"
        log.warning("%d mask(s) in %s have no image (expected <stem>.png in %s): %s.", len(orphans),
                    mask_dir, folder, _examples([mask_dir / m for m in orphans]))
    return found


def _warn_masks_without_folder(mask_root: Path, image_root: Path, type_dirs: Sequence[Path]) -> None:
    names = {d.name for d in type_dirs}
    for mask_dir in _subdirs(mask_root) if mask_root.is_dir() else []:
        if mask_dir.name not in names and _images(mask_dir):
            log.warning("Masks in %s have no images: expected a folder %s.", mask_dir,
                        image_root / mask_dir.name)


def read_mvtec(root: str | Path, categories: Sequence[str]) -> list[ImageRecord]:
    """Records of <root>/<category>/{train/good, test/<type>}, masks from ground_truth/<type>."""
    root = Path(root).expanduser()
    _require_dir(root, "MVTec root",
                 "Set data.root=/path/to/mvtec (the folder holding bottle/, cable/, ...).")
    if not categories:
        raise UserError("data.categories is empty: name at least one category, e.g. '[bottle]'.")
    records: list[ImageRecord] = []
    for category in categories:
        records += _read_mvtec_category(root, category)
    return records


def _read_mvtec_category(root: Path, category: str) -> list[ImageRecord]:
    cat_dir = root / category
    available = sorted(p.name for p in _subdirs(root))
    _require_dir(cat_dir, f"Category '{category}'",
                 f"Categories present under {root}: {available or 'none'}.")
    train_good = cat_dir / "train" / "good"
    _require_dir(train_good, f"Training images of '{category}'",
                 "An MVTec category needs train/good/ with images.")
    records = [ImageRecord(str(p), GOOD, category, "good", None, "train") for p in _images(train_good)]
    if not records:
        raise UserError(f"No good training images in {train_good}: an MVTec category needs good images "
                        f"there ({', '.join(IMAGE_SUFFIXES)}).")
    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        log.warning("%s has no test/ folder: only train/good images are used", cat_dir)
        return records
    type_dirs = _subdirs(test_dir)
    for type_dir in type_dirs:
        defect_type = type_dir.name
        label = GOOD if defect_type == "good" else DEFECT
        images = _images(type_dir)
        if not images:
            log.warning("%s holds no images (%s): defect type '%s' is left out.", type_dir,
                        ", ".join(IMAGE_SUFFIXES), defect_type)
        masks = (_masks_for(images, cat_dir / "ground_truth" / defect_type) if label == DEFECT
                 else dict.fromkeys(images))
        records += [ImageRecord(str(p), label, category, defect_type, masks[p], "test") for p in images]
    if not any(r.label == DEFECT for r in records):
        log.warning("Category '%s' has no defect images (expected %s/<defect_type>/*.png): it adds "
                    "only good images.", category, test_dir)
    _warn_masks_without_folder(cat_dir / "ground_truth", test_dir, type_dirs)
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
    type_dirs = _subdirs(defect_dir)
    for type_dir in type_dirs:
        images = _images(type_dir)
        if not images:
            log.warning("%s holds no images (%s): defect type '%s' is left out.", type_dir,
                        ", ".join(IMAGE_SUFFIXES), type_dir.name)
        masks = _masks_for(images, root / "masks" / type_dir.name)
        records += [ImageRecord(str(p), DEFECT, category, type_dir.name, masks[p]) for p in images]
    _warn_masks_without_folder(root / "masks", defect_dir, type_dirs)
    return records


def check_records(records: Sequence[ImageRecord], where: str) -> None:
    """Refuse a dataset that cannot train a two-class model, naming what is missing."""
    if not records:
        raise UserError(f"No images found in {where}. Supported suffixes: {', '.join(IMAGE_SUFFIXES)}.")
    labels = {r.label for r in records}
    layouts = "MVTec: <category>/train/good/ and <category>/test/<type>/; folder: good/ and defect/<type>/"
    if GOOD not in labels:
        raise UserError(f"No good images found in {where}: a good/defect classifier needs both classes "
                        f"({layouts}).")
    if DEFECT not in labels:
        raise UserError(f"No defect images found in {where}: a good/defect classifier needs both classes "
                        f"({layouts}).")


def records_from_config(records_cfg) -> list[ImageRecord]:
    """Instantiate the configured reader; its UserError surfaces as itself, not wrapped by Hydra."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(records_cfg)
    except InstantiationException as err:
        if isinstance(err.__cause__, UserError):
            raise err.__cause__ from None
        raise
