"""Image statistics that make "lighting changed / focus lost / camera moved" visible.

Computed on the network-side pixels (what the input geometry prepared: the same resize for the
training images and for every scored part), plus the photo's own size:

- brightness, contrast: mean and standard deviation of the grey image (lighting, exposure);
- sharpness: variance of the grey image's Laplacian over its variance (focus, motion blur; divided
  by the contrast so that a dimmer lamp does not read as lost focus);
- red_share, blue_share: the red and blue channels' shares of the pixel sum (a colour cast, another
  lamp; a dimmer lamp leaves them alone);
- height, width: the photo's size in pixels (another camera, crop or resolution);
- alignment: correlation of an 8 x 8 grey thumbnail with the training parts' mean thumbnail
  (a part shifted or rotated in the frame, a bumped camera).

A training run logs the summary of its train goods (data/image_stats.json); the prediction log
stores each part's statistics and thumbnail; defect-monitor compares the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

STATS = ("brightness", "contrast", "sharpness", "red_share", "blue_share", "height", "width")
THUMB = 8
ARTIFACT = "data/image_stats.json"


def thumbnail(grey: np.ndarray, size: int = THUMB) -> np.ndarray:
    """size x size block means of a grey image (area resampling, no interpolation artefacts)."""
    h, w = grey.shape
    ys = np.linspace(0, h, size + 1).astype(int)
    xs = np.linspace(0, w, size + 1).astype(int)
    rows = np.add.reduceat(grey, ys[:-1], axis=0) / np.diff(ys)[:, None]
    return np.add.reduceat(rows, xs[:-1], axis=1) / np.diff(xs)[None, :]


def image_stats(prepared: np.ndarray, hw: tuple[int, int]) -> dict:
    """The statistics of one part: `prepared` the H x W x 3 uint8 network-side pixels, `hw` the
    photo's own (height, width). Returns the STATS values and the thumbnail (a list)."""
    rgb = np.asarray(prepared, dtype=np.float32)
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    lap = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1]
    flat = rgb.reshape(-1, 3)
    means = (np.ones(len(flat), dtype=np.float32) @ flat) / len(flat)  # BLAS: 25x a strided mean(0)
    total = max(float(means.sum()), 1e-6)
    var = float(grey.var())
    return {
        "brightness": float(grey.mean()),
        "contrast": var**0.5,
        "sharpness": float(lap.var()) / max(var, 1e-6),
        "red_share": float(means[0] / total),
        "blue_share": float(means[2] / total),
        "height": int(hw[0]),
        "width": int(hw[1]),
        "thumb": np.round(thumbnail(grey), 1).ravel().tolist(),
    }


def alignment(thumb: Sequence[float], reference: Sequence[float]) -> float:
    """Pearson correlation of a thumbnail with the reference mean thumbnail (1: same layout)."""
    a, b = np.asarray(thumb, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 1.0


def summarize(stats: Sequence[dict]) -> dict:
    """The reference a training run logs: per statistic mean, std, 1st/50th/99th percentiles, the
    mean thumbnail, and the parts' own alignment with it (its spread is what a shift is measured
    against)."""
    if not stats:
        return {"n": 0}
    mean_thumb = np.mean([s["thumb"] for s in stats], axis=0)
    out: dict = {"n": len(stats), "thumb": np.round(mean_thumb, 2).tolist(), "stats": {}}
    values = {k: np.array([s[k] for s in stats], dtype=np.float64) for k in STATS}
    values["alignment"] = np.array([alignment(s["thumb"], mean_thumb) for s in stats])
    for key, v in values.items():
        out["stats"][key] = {
            "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "p01": float(np.percentile(v, 1)),
            "p50": float(np.percentile(v, 50)),
            "p99": float(np.percentile(v, 99)),
        }
    return out
