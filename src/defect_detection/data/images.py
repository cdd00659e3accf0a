"""Decoding image files into RGB arrays at the working resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from defect_detection import UserError


def load_rgb(path: str | Path) -> Image.Image:
    """Open any PIL-readable image as 8-bit RGB (grayscale, RGBA, palette, CMYK, 16-bit)."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                hi = arr.max() or 1.0
                im = Image.fromarray((arr / (65535.0 if hi > 255 else 255.0) * 255).astype(np.uint8))
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (0, 0, 0, 255))
                im = Image.alpha_composite(background, im)
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"Cannot read image {path}: {err}. Remove or replace the file.") from err


def load_resized(path: str | Path, size: int) -> np.ndarray:
    """HxWx3 uint8 array of the image resized (antialiased) to size x size."""
    im = load_rgb(path)
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)
