"""Figures for looking at the data: class balance, sample grids with masks, an augmented batch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image

from defect_detection.base import CLASS_NAMES, DEFECT, UserError
from defect_detection.data.images import load_rgb
from defect_detection.data.records import ImageRecord

LABEL_COLOURS = {"good": "#4c9a2a", "defect": "#c0392b"}
THUMBNAIL = 192  # longest side of a sample-grid tile, in pixels


def class_balance_figure(counts: pd.DataFrame) -> Figure:
    """Good/defect images per category and split (left) and defect types per category (right)."""
    per_split = counts.pivot_table(index=["category", "split"], columns="label", values="images",
                                   aggfunc="sum", fill_value=0)
    per_split = per_split.reindex(columns=list(CLASS_NAMES), fill_value=0)
    order = {name: i for i, name in enumerate(dict.fromkeys(counts["split"]))}  # counts come ordered
    per_split = per_split.sort_index(key=lambda idx: idx.map(order) if idx.name == "split" else idx)
    types = (counts[counts.label == "defect"].groupby(["category", "defect_type"])["images"].sum())
    fig = Figure(figsize=(max(6.0, 0.55 * len(per_split) + 2), 4.2 + 0.18 * max(0, len(types) - 12)))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [max(len(per_split), 3), 4]})
    x = np.arange(len(per_split))
    bottom = np.zeros(len(per_split))
    for label in CLASS_NAMES:
        values = per_split[label].to_numpy()
        bars = left.bar(x, values, bottom=bottom, color=LABEL_COLOURS[label], label=label)
        left.bar_label(bars, labels=[str(v) if v else "" for v in values], label_type="center",
                       fontsize=7, color="white")
        bottom += values
    left.set_xticks(x, [f"{c}\n{s}" for c, s in per_split.index], fontsize=7)
    left.set_ylabel("images")
    left.set_title("images per category and split")
    left.legend(fontsize=8)
    if len(types):
        y = np.arange(len(types))
        bars = right.barh(y, types.to_numpy(), color=LABEL_COLOURS["defect"])
        right.bar_label(bars, fontsize=7, padding=2)
        right.set_yticks(y, [f"{c}/{t}" for c, t in types.index], fontsize=7)
        right.invert_yaxis()
        right.set_xlim(0, types.max() * 1.15)
    right.set_xlabel("images (all splits)")
    right.set_title("defect types")
    fig.tight_layout()
    return fig


def _thumbnail(path: str) -> np.ndarray | None:
    try:
        im = load_rgb(path)
    except UserError:
        return None
    im.thumbnail((THUMBNAIL, THUMBNAIL))
    return np.asarray(im)


def _mask(path: str, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L").resize((shape[1], shape[0]), Image.Resampling.NEAREST)) > 127
    except (OSError, ValueError):
        return None
    return mask if mask.any() else None


def _spread(items: Sequence, k: int) -> list:
    """k items evenly spread over the sorted list (deterministic, not just the first k)."""
    if len(items) <= k:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, k).round().astype(int)]


class _Mosaic:
    """Tiles pasted into one array shown on one axes: far faster to draw than an axes per image."""

    def __init__(self, rows: int, cols: int, tile: int, gap: int) -> None:
        self.tile, self.step = tile, tile + gap
        self.pixels = np.full((rows * self.step, cols * self.step, 3), 255, np.uint8)
        self.mask = np.zeros(self.pixels.shape[:2], bool)

    def origin(self, row: int, col: int, shape: tuple[int, ...]) -> tuple[int, int]:
        """Top-left corner of an image of `shape` centred in tile (row, col)."""
        return (row * self.step + (self.tile - shape[0]) // 2, col * self.step + (self.tile - shape[1]) // 2)

    def paste(self, row: int, col: int, image: np.ndarray, mask: np.ndarray | None = None) -> None:
        y, x = self.origin(row, col, image.shape)
        self.pixels[y:y + image.shape[0], x:x + image.shape[1]] = image
        if mask is not None:
            self.mask[y:y + mask.shape[0], x:x + mask.shape[1]] = mask

    def figure(self, cell_inches: float = 1.9) -> tuple[Figure, object]:
        rows, cols = self.pixels.shape[0] // self.step, self.pixels.shape[1] // self.step
        fig = Figure(figsize=(cell_inches * cols + 1.2, cell_inches * rows * 1.08 + 0.5))
        ax = fig.add_axes((0.13, 0.02, 0.86, 0.92 - 0.25 / max(rows, 1)))
        ax.imshow(self.pixels, interpolation="antialiased")
        if self.mask.any():
            ax.contour(self.mask, levels=[0.5], colors="red", linewidths=0.8)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        return fig, ax

    def caption(self, ax, row: int, col: int, text: str, colour: str = "black") -> None:
        ax.text(col * self.step + self.tile / 2, row * self.step - 2, text, ha="center", va="bottom",
                fontsize=6, color=colour, clip_on=False)


def sample_grid_figure(records: Sequence[ImageRecord], category: str, per_type: int = 4,
                       split_of: dict[str, str] | None = None) -> Figure:
    """One row per type (good first), `per_type` images each; ground-truth masks outlined in red."""
    by_type: dict[str, list[ImageRecord]] = {}
    for r in sorted((r for r in records if r.category == category), key=lambda r: r.path):
        by_type.setdefault(r.defect_type, []).append(r)
    order = sorted(by_type, key=lambda t: (by_type[t][0].label == DEFECT, t))
    cols = max(1, min(per_type, max((len(v) for v in by_type.values()), default=1)))
    picks = [[(r, _thumbnail(r.path)) for r in _spread(by_type[kind], cols)] for kind in order]
    tile = max((max(im.shape[:2]) for row in picks for _, im in row if im is not None), default=1)
    mosaic = _Mosaic(max(len(order), 1), cols, tile, gap=max(4, tile // 12))
    captions = []
    for row, items in enumerate(picks):
        for col, (r, image) in enumerate(items):
            if image is None:
                captions.append((row, col, f"UNREADABLE {_short(r.path)}", "red"))
                continue
            mosaic.paste(row, col, image, _mask(r.mask_path, image.shape[:2]) if r.mask_path else None)
            where = f" [{split_of[r.path]}]" if split_of and r.path in split_of else ""
            captions.append((row, col, f"{_short(r.path)}{where}", "black"))
    fig, ax = mosaic.figure()
    for caption in captions:
        mosaic.caption(ax, *caption)
    labels = [CLASS_NAMES[by_type[kind][0].label] for kind in order]
    ax.set_yticks([row * mosaic.step + tile / 2 for row in range(len(order))],
                  [f"{kind}\n{'' if kind == label else label + ', '}n={len(by_type[kind])}"
                   for kind, label in zip(order, labels)], fontsize=8)
    ax.tick_params(length=0)
    for tick, label in zip(ax.get_yticklabels(), labels):
        tick.set_color(LABEL_COLOURS[label])
    fig.suptitle(f"{category}: samples per type (red outline: ground-truth mask)", fontsize=9)
    return fig


def _short(path: str) -> str:
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def augmented_batch_figure(dataset, indices: Sequence[int], mean: Sequence[float],
                           std: Sequence[float], records: Sequence[ImageRecord] | None = None,
                           seed: int = 0) -> Figure:
    """What the model sees: train-transformed items, de-normalised, titled with their labels.

    `dataset[i]` yields (normalised CHW tensor, label, index[, mask, has_mask]) like
    TensorImageDataset (masks, when loaded, are not drawn). The global
    torch RNG is forked, so drawing the preview leaves training's random stream untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        items = [tuple(dataset[int(i)])[:3] for i in indices]
    mean_t = torch.tensor(list(mean), dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(list(std), dtype=torch.float32).view(3, 1, 1)
    cols = min(4, max(len(items), 1))
    size = max((int(image.shape[-1]) for image, _, _ in items), default=1)
    mosaic = _Mosaic(max(1, -(-len(items) // cols)), cols, size, gap=max(2, size // 6))
    captions = []
    for i, (image, label, index) in enumerate(items):
        pixels = (image.detach().float().cpu() * std_t + mean_t).clamp(0, 1).permute(1, 2, 0).numpy()
        mosaic.paste(i // cols, i % cols, (pixels * 255).round().astype(np.uint8))
        name = CLASS_NAMES[int(label)]
        kind = ""
        if records is not None:
            r = records[int(index)]
            kind = f" {r.category}/{r.defect_type}"
        captions.append((i // cols, i % cols, f"{name}{kind}", LABEL_COLOURS[name]))
    fig, ax = mosaic.figure(cell_inches=2.0)
    for caption in captions:
        mosaic.caption(ax, *caption)
    fig.suptitle("augmented training batch (de-normalised)", fontsize=9)
    return fig
