"""Deterministic synthetic parts with drawn defects, written in the MVTec AD layout with masks.

Used by the demo and the tests so that nothing needs a download: each category is a textured
part (a disc, a brushed plate, a woven mesh); defects are scratches, spots and cracks whose
exact pixels are saved as ground-truth masks.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CATEGORIES = ("disc", "plate", "mesh")
DEFECT_TYPES = ("scratch", "spot", "crack")
_MARKER = ".synthetic.json"


def _texture(category: str, size: int, rng: np.random.Generator, width: int | None = None,
             height: int | None = None) -> np.ndarray:
    """A `height` x `width` part (None: `size`); coordinates are in units of `size`, so an
    elongated plate or mesh keeps its pixel periods and an elongated disc part is a row (or a
    column) of discs."""
    width = size if width is None else width
    height = size if height is None else height
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) / size
    noise = rng.normal(0, 6, (height, width)).astype(np.float32)
    if category == "disc":
        r = np.hypot(xx % 1.0 - 0.5 + rng.uniform(-0.03, 0.03), yy % 1.0 - 0.5 + rng.uniform(-0.03, 0.03))
        base = np.where(r < 0.38, 150 + 25 * np.cos(r * 60), 40)
        rgb = np.stack([base * 0.9, base, base * 1.05], -1)
    elif category == "plate":
        phase = rng.uniform(0, 6.28)
        base = 120 + 18 * np.sin(yy * 90 + phase) + 8 * np.sin(xx * 7 + phase)
        rgb = np.stack([base * 1.05, base, base * 0.85], -1)
    else:
        period = rng.uniform(9.5, 10.5)
        grid = (np.sin(xx * size / period * 3.14) ** 2 + np.sin(yy * size / period * 3.14) ** 2)
        base = 70 + 55 * grid
        rgb = np.stack([base * 0.8, base * 0.95, base * 1.1], -1)
    return np.clip(rgb + noise[..., None], 0, 255)


def _defect_mask(kind: str, size: int, rng: np.random.Generator, scale: float = 1.0,
                 width: int | None = None, height: int | None = None) -> Image.Image:
    """The defect's pixels on a `height` x `width` mask (None: `size`); its extent follows
    `size`, its centre lies in the middle half across and anywhere along an elongated part."""
    mask = Image.new("L", (size if width is None else width, size if height is None else height), 0)
    draw = ImageDraw.Draw(mask)
    lo, hi = int(size * 0.25), int(size * 0.75)
    if height is not None:  # tall (and maybe wide): anywhere but the outer quarter-size margins
        w = size if width is None else width
        cx, cy = rng.integers(lo, max(lo + 1, w - lo)), rng.integers(lo, max(lo + 1, height - lo))
    elif width is None:
        cx, cy = rng.integers(lo, hi, 2)
    else:
        cx, cy = rng.integers(lo, width - lo), rng.integers(lo, hi)
    line = max(2, size // 40) if scale == 1.0 else max(1, round(size / 40 * scale))
    size = size * scale  # lengths and radii below
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        half = rng.uniform(0.12, 0.22) * size
        dx, dy = np.cos(angle) * half, np.sin(angle) * half
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=line)
    elif kind == "spot":
        r = rng.uniform(0.04, 0.08) * size
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        points = [(float(cx), float(cy))]
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(6):
            angle += rng.uniform(-0.8, 0.8)
            step = rng.uniform(0.03, 0.06) * size
            x, y = points[-1]
            points.append((x + np.cos(angle) * step, y + np.sin(angle) * step))
        draw.line(points, fill=255, width=line)
    return mask


def _apply_defect(image: np.ndarray, mask: Image.Image, kind: str, contrast: float = 1.0) -> np.ndarray:
    m = contrast * np.asarray(mask.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32)[..., None] / 255
    colour = {"scratch": (235, 235, 225), "spot": (60, 35, 20), "crack": (15, 15, 15)}[kind]
    return image * (1 - m) + np.asarray(colour, np.float32) * m


def _save(array: np.ndarray, path: Path, grey: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    (image.convert("L") if grey else image).save(path)


def generate_synthetic(
    root: str | Path,
    categories: Sequence[str] = CATEGORIES,
    n_train_good: int = 40,
    n_test_good: int = 12,
    n_per_defect: int = 8,
    image_size: int = 128,
    seed: int = 0,
    defect_scale: float = 1.0,
    defect_contrast: float = 1.0,
    width: int | None = None,
    height: int | None = None,
    height_jitter: int = 0,
    grey: bool = False,
    mask_fraction: float = 1.0,
    defect_types: Sequence[str] | None = None,
) -> Path:
    """Write the dataset under root (skipped when an identical one is already there).

    `defect_scale` shrinks the defects (length, radius, line width) and `defect_contrast` blends
    them into the part (1: drawn at full colour), for lines whose defects are small and faint.
    `width` (pixels, at least image_size; None: square) makes elongated parts, image_size high and
    `width` wide, like line scans: defects keep their image_size-relative extent and lie anywhere
    along the long side. `height` (pixels, at least image_size) makes tall parts (portrait when
    `width` is null), and `height_jitter` adds a seeded 0..height_jitter px to each photo's
    height, as on a line whose crop varies by a few pixels. `grey` saves single-channel PNGs,
    `mask_fraction` keeps the masks of that share of each category's defect images (a line
    where only some defects were outlined) and `defect_types` draws only those kinds.

    Processes that generate the same root at once (parallel sweep trials on a fresh checkout)
    each write their own temporary folder and rename it into place; one that loses the race
    keeps the winner's identical data. A shared temporary folder let one process delete the
    other's files, leaving a root with a valid marker but images missing.
    """
    root = Path(root).expanduser()
    params = dict(categories=list(categories), n_train_good=n_train_good, n_test_good=n_test_good,
                  n_per_defect=n_per_defect, image_size=image_size, seed=seed)
    if defect_scale != 1.0 or defect_contrast != 1.0:  # the defaults keep earlier markers valid
        params.update(defect_scale=float(defect_scale), defect_contrast=float(defect_contrast))
    if not (0 < defect_scale <= 1 and 0 < defect_contrast <= 1):
        raise ValueError(f"defect_scale={defect_scale}, defect_contrast={defect_contrast}: "
                         "both must be in (0, 1].")
    if width is not None:
        if (isinstance(width, bool) or not isinstance(width, (int, float))
                or not float(width).is_integer() or width < image_size):
            raise ValueError(f"width={width!r}: must be a whole number of pixels >= image_size "
                             f"({image_size}), or null for square images.")
        if int(width) != image_size:  # square data keeps its earlier marker
            params["width"] = int(width)
    params.update(_line_params(image_size, height, height_jitter, grey, mask_fraction, defect_types))
    if _generated(root, params):
        return root
    unknown = sorted(set(categories) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"Unknown synthetic categories {unknown}; choose from {list(CATEGORIES)}.")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        _write(tmp, params)
        if _generated(root, params):  # another process finished the same data meanwhile
            return root
        shutil.rmtree(root, ignore_errors=True)  # other parameters (or none): replaced
        try:
            tmp.rename(root)
        except OSError:  # lost the race for the rename
            if not _generated(root, params):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _line_params(image_size: int, height, height_jitter, grey, mask_fraction, defect_types) -> dict:
    """The marker entries of the line options, only those that differ from the defaults (so the
    markers of earlier data stay valid), checked."""
    out: dict = {}
    if height is not None:
        if (isinstance(height, bool) or not isinstance(height, (int, float))
                or not float(height).is_integer() or height < image_size):
            raise ValueError(f"height={height!r}: must be a whole number of pixels >= image_size "
                             f"({image_size}), or null for parts image_size high.")
        if int(height) != image_size:
            out["height"] = int(height)
    if isinstance(height_jitter, bool) or not isinstance(height_jitter, int) or height_jitter < 0:
        raise ValueError(f"height_jitter={height_jitter!r}: must be a whole number of pixels >= 0.")
    if height_jitter:
        out["height_jitter"] = height_jitter
    if grey:
        out["grey"] = True
    if not 0 <= mask_fraction <= 1:
        raise ValueError(f"mask_fraction={mask_fraction}: must be in [0, 1].")
    if mask_fraction != 1:
        out["mask_fraction"] = float(mask_fraction)
    kinds = list(DEFECT_TYPES if defect_types is None else defect_types)
    if not kinds or set(kinds) - set(DEFECT_TYPES):
        raise ValueError(f"defect_types={kinds}: choose one or more of {list(DEFECT_TYPES)}.")
    if kinds != list(DEFECT_TYPES):
        out["defect_types"] = kinds
    return out


def _generated(root: Path, params: dict) -> bool:
    marker = root / _MARKER
    return marker.is_file() and json.loads(marker.read_text()) == params


def _write(tmp: Path, params: dict) -> None:
    categories, seed, image_size = params["categories"], params["seed"], params["image_size"]
    width, grey = params.get("width"), params.get("grey", False)  # width None: image_size
    kinds = params.get("defect_types", DEFECT_TYPES)
    n_train_good, n_test_good, n_per_defect = (params["n_train_good"], params["n_test_good"],
                                               params["n_per_defect"])
    n_defects = len(kinds) * n_per_defect
    for c_index, category in enumerate(categories):
        rng = np.random.default_rng([seed, c_index])
        # the line options draw from their own stream: the parts of the defaults stay as they were
        line_rng = np.random.default_rng([seed, c_index, 1])
        heights = iter(_heights(n_train_good + n_test_good + n_defects, params, line_rng))
        masked = set(line_rng.permutation(n_defects)[:round(n_defects * params.get("mask_fraction", 1.0))])
        cat = tmp / category
        for folder, n in (("train", n_train_good), ("test", n_test_good)):
            for i in range(n):
                part = _texture(category, image_size, rng, width, next(heights))
                _save(part, cat / folder / "good" / f"{i:03d}.png", grey)
        for k_index, kind in enumerate(kinds):
            for i in range(n_per_defect):
                h = next(heights)
                mask = _defect_mask(kind, image_size, rng, params.get("defect_scale", 1.0), width, h)
                image = _apply_defect(_texture(category, image_size, rng, width, h), mask, kind,
                                      params.get("defect_contrast", 1.0))
                _save(image, cat / "test" / kind / f"{i:03d}.png", grey)
                if k_index * n_per_defect + i not in masked:
                    continue
                mask_path = cat / "ground_truth" / kind / f"{i:03d}_mask.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                mask.save(mask_path)
    (tmp / _MARKER).write_text(json.dumps(params))


def _heights(n: int, params: dict, rng: np.random.Generator) -> list[int | None]:
    """Each image's height (None: image_size), `height_jitter` seeded pixels added to each."""
    height, jitter = params.get("height"), params.get("height_jitter", 0)
    if not jitter:
        return [height] * n
    return [(height or params["image_size"]) + int(j) for j in rng.integers(0, jitter + 1, n)]


def synthetic_records(root: str | Path, categories: Sequence[str] = CATEGORIES, **params):
    """Generate on first use, then read like any MVTec tree."""
    from defect_detection.data.records import read_mvtec

    return read_mvtec(generate_synthetic(root, categories, **params), categories)


def synthetic_part(category: str, kind: str, rng: np.random.Generator, image_size: int = 128,
                   lighting: float = 1.0) -> np.ndarray:
    """One part as an H x W x 3 uint8 array: kind "good", a defect type of the datasets, or "dent"
    (a ring pressed into the part, which the generated datasets never hold: a new defect type for
    simulated lines, scripts/loop_simulation.py). `lighting` scales the intensities (0.7: a lamp
    dimmed by 30 %)."""
    image = _texture(category, image_size, rng)
    if kind == "dent":
        mask = Image.new("L", (image_size, image_size), 0)
        draw = ImageDraw.Draw(mask)
        cx, cy = rng.integers(image_size // 4, 3 * image_size // 4, 2)
        r = rng.uniform(0.07, 0.12) * image_size
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=max(2, image_size // 40))
        m = np.asarray(mask.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)[..., None] / 255
        image = image * (1 - 0.7 * m) + 0.7 * m * image * 0.45
    elif kind != "good":
        image = _apply_defect(image, _defect_mask(kind, image_size, rng), kind)
    return np.clip(image * float(lighting), 0, 255).astype(np.uint8)
