"""Heatmap overlays on the de-normalised image, and galleries of them (matplotlib, Agg only)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageFilter

from defect_detection.base import UserError


def denormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """N x 3 x H x W normalised tensors back to N x H x W x 3 uint8 (what the model saw)."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    x = (images.detach().float().cpu() * std_t + mean_t).clamp(0, 1)
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def colormap(name: str):
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise UserError(f"explain.colormap={name} is not a matplotlib colormap (e.g. jet, inferno, turbo).") \
            from None


def overlay(image: np.ndarray, cam: torch.Tensor | np.ndarray, alpha: float = 0.45,
            cmap: str = "jet", mask: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """HxWx3 uint8: the coloured map blended over the image, weighted by the map (cold parts stay clear),
    with the ground-truth mask's outline in white when given."""
    heat = np.asarray(cam, dtype=np.float32)
    colour = colormap(cmap)(heat)[..., :3]
    weight = alpha * (0.25 + 0.75 * heat)[..., None]
    out = image.astype(np.float32) / 255 * (1 - weight) + colour * weight
    out = (out.clip(0, 1) * 255 + 0.5).astype(np.uint8)
    if mask is not None:
        out[mask_outline(np.asarray(mask, dtype=bool))] = 255
    return out


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """Boolean 1-pixel border of a mask (the mask minus its 3x3 erosion)."""
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    eroded = np.asarray(im.filter(ImageFilter.MinFilter(3))) > 0
    return mask & ~eroded


def save_png(array: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def gallery(tiles: Sequence[np.ndarray | None], titles: Sequence[str], ncols: int = 6, title: str = "",
            tile_inches: float = 2.2) -> Figure:
    """A grid of overlays with one caption each; None leaves a cell empty (to start a row per group).
    A Figure without pyplot: no global state, safe in threads and on headless machines."""
    n = max(1, len(tiles))
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    width = max(ncols * tile_inches, 5.0)
    fig = Figure(figsize=(width, nrows * (tile_inches + 0.35) + (0.7 if title else 0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, tile, caption in zip(axes.flat, tiles, titles):
        if tile is None:
            continue
        ax.imshow(tile)
        ax.set_title(caption, fontsize=7)
    if title:
        fig.suptitle(textwrap.fill(title, int(width * 11)), fontsize=10)
    return fig
