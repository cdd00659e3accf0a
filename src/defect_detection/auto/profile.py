"""What the auto recipe looks at before choosing: counts, masks, image shapes, colour."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from defect_detection.data.geometry import header_hw
from defect_detection.data.splits import SPLITS, Split

COLOUR_SAMPLE = 16  # images decoded to tell colour from grey (headers say RGB for grey scans too)


@dataclass(frozen=True)
class DataProfile:
    counts: dict[str, dict[str, int]]  # split -> {"good": n, "defect": n}
    train_masks: int  # train defect images with a mask
    height: int  # median original size
    width: int
    aspect: float  # median long side / short side
    grayscale: bool

    @property
    def train_defects(self) -> int:
        return self.counts["train"]["defect"]

    def long_side(self) -> int:
        return max(self.height, self.width)

    def to_dict(self) -> dict:
        return {**asdict(self), "train_defects": self.train_defects}

    def describe(self) -> str:
        c = self.counts
        return (
            f"train {c['train']['good']} good / {c['train']['defect']} defect "
            f"({self.train_masks} with masks), val {c['val']['good']} / {c['val']['defect']}, "
            f"test {c['test']['good']} / {c['test']['defect']}; median {self.width} x {self.height} px "
            f"(aspect {self.aspect:.1f}), {'grey' if self.grayscale else 'colour'}"
        )


def _is_grey(path: str) -> bool:
    with Image.open(path) as im:
        if im.mode in ("L", "LA", "I", "I;16", "1"):
            return True
        rgb = np.asarray(im.convert("RGB").reduce(4), dtype=np.int16)
    return bool(np.abs(rgb - rgb.mean(-1, keepdims=True)).max() <= 2)


def profile_split(split: Split) -> DataProfile:
    """Counts from the split, sizes from the image headers (no decoding), colour from a sample."""
    counts = {
        s: {"good": sum(r.label == 0 for r in split[s]), "defect": sum(r.label != 0 for r in split[s])}
        for s in SPLITS
    }
    records = [r for s in SPLITS for r in split[s]]
    sizes = [header_hw(r.path) for r in records]
    height = int(statistics.median(h for h, _ in sizes))
    width = int(statistics.median(w for _, w in sizes))
    aspect = float(statistics.median(max(h, w) / max(1, min(h, w)) for h, w in sizes))
    step = max(1, len(records) // COLOUR_SAMPLE)
    grey = all(_is_grey(r.path) for r in records[::step][:COLOUR_SAMPLE])
    masks = sum(1 for r in split.train if r.label != 0 and r.mask_path)
    return DataProfile(counts, masks, height, width, aspect, grey)
