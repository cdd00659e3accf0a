"""Decoding image files into RGB arrays at the working resolution, and saying why one cannot be.

Every failure becomes a BadImageError whose `reason` is short and human (empty file, truncated,
not an image, too many pixels, symlink loop), so a scan can list them all and the decode names
the file instead of surfacing a PIL traceback.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from defect_detection.base import UserError

# PIL's own default: about 89.5 million pixels (a 9459 x 9459 image, ~268 MB as RGB).
DEFAULT_MAX_PIXELS = 89_478_485
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class BadImageError(UserError):
    """A file that cannot be used as an image; `reason` says why in a few words."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"Cannot read image {path}: {reason}. Remove or replace the file.")


# The override that raises the limit, named by the "too many pixels" reason: the command's own key.
_limit_key = "data.max_image_pixels"


def set_max_image_pixels(limit: int | None, key: str = "data.max_image_pixels") -> None:
    """Refuse images with more pixels than `limit` (None: no limit); `key` is the override that
    raises it in the running command (data.max_image_pixels for training, max_image_pixels for
    defect-predict/defect-explain), named by the error.

    This sets PIL's process-wide decompression-bomb guard (Image.MAX_IMAGE_PIXELS), so the scan,
    the decode threads and any other PIL use agree; PIL only warns between 1x and 2x the limit,
    the loaders here refuse everything above 1x.
    """
    global _limit_key
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise UserError(f"{key}={limit!r}: use a whole number of pixels (0 or null: no limit).")
    Image.MAX_IMAGE_PIXELS = int(limit) if limit else None
    _limit_key = key


def _check_file(path: Path) -> None:
    """Reasons visible without decoding: missing, broken link, symlink loop, not a file, empty."""
    try:
        st = path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise BadImageError(path, "symlink loop (the link resolves to itself)") from None
        if path.is_symlink():
            raise BadImageError(path, f"broken symlink (points to {os.readlink(path)})") from None
        if isinstance(err, FileNotFoundError):
            raise BadImageError(path, "file not found (moved or deleted since it was listed)") from None
        raise BadImageError(path, f"cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BadImageError(path, "not a regular file")
    if st.st_size == 0:
        raise BadImageError(path, "empty file (0 bytes)")


def _too_many(pixels: str, limit: int | None) -> str:
    return (f"too many pixels ({pixels}, limit {limit or 0:,}): a decompression bomb, or raise "
            f"{_limit_key} if the image is genuine")


def _reason(err: Exception) -> str:
    text = str(err)
    if isinstance(err, UnidentifiedImageError):
        return "not an image PIL can identify (wrong content for its suffix, or a corrupt header)"
    if isinstance(err, Image.DecompressionBombError):  # PIL's own check, at 2x the limit
        found = re.search(r"\((\d+) pixels\)", text)
        pixels = f"{int(found.group(1)):,}" if found else "?"
        return _too_many(pixels, Image.MAX_IMAGE_PIXELS)
    if "truncated" in text.lower() or isinstance(err, EOFError):
        return f"truncated: the image data ends early ({text})"
    return f"corrupt image data ({type(err).__name__}: {text})"


@contextmanager
def _guarded(opener, name: str | Path) -> Iterator[Image.Image]:
    """The opened image, its pixel count checked before any pixel is decoded; every PIL error
    while it is used becomes a BadImageError naming `name`."""
    try:
        im = opener()  # reads the header only; PIL itself raises at 2x the limit
    except Exception as err:  # PIL raises many types for hostile files; all mean "bad file"
        raise BadImageError(name, _reason(err)) from err
    with im:
        limit = Image.MAX_IMAGE_PIXELS
        width, height = im.size
        if limit and width * height > limit:
            raise BadImageError(name, _too_many(f"{width} x {height} = {width * height:,}", limit))
        try:
            yield im
        except BadImageError:
            raise
        except Exception as err:
            raise BadImageError(name, _reason(err)) from err


@contextmanager
def _open(path: str | Path) -> Iterator[Image.Image]:
    """Image.open that checks the file first and the pixel count before any pixel is decoded."""
    path = Path(path)
    _check_file(path)
    with _guarded(lambda: Image.open(path), path) as im:
        yield im


def _to_rgb(im: Image.Image) -> Image.Image:
    im.load()
    im = ImageOps.exif_transpose(im)
    if im.mode in _HIGH_BIT_MODES:  # 16-bit: the full 0..65535 range maps to 0..255
        im = Image.fromarray((np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8))
    elif im.mode in ("I", "F"):  # 32-bit int/float: 0..1 floats, 0..255 or 0..65535 ints
        arr = np.asarray(im, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 if hi <= 1.0 else 1.0 if hi <= 255 else 255.0 / 65535.0
        im = Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")  # transparent pixels become black, like an unlit background
        background = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Open any PIL-readable image as 8-bit RGB (grayscale, RGBA, palette, CMYK, 16-bit)."""
    with _open(path) as im:
        return _to_rgb(im)


def load_rgb_bytes(data: bytes, name: str = "image bytes") -> Image.Image:
    """Decode an image sent as bytes (e.g. base64 in a serving request) like `load_rgb`, with the
    same pixel guard; a BadImageError names `name`."""
    import io

    if not data:
        raise BadImageError(name, "empty (0 bytes)")
    with _guarded(lambda: Image.open(io.BytesIO(data)), name) as im:
        return _to_rgb(im)


def verify_image(path: str | Path) -> None:
    """Raise BadImageError unless `path` will decode; much cheaper than decoding it.

    PNG: every chunk's CRC up to IEND (catches truncation anywhere, ~2 ms for 900x900).
    JPEG: a full decode at 1/8 scale (draft mode). Other formats: a full decode to RGB.
    """
    with _open(path) as im:
        if im.format == "PNG":
            im.verify()
        elif im.format in ("JPEG", "MPO"):
            im.draft("RGB", (1, 1))
            im.load()
        else:
            _to_rgb(im)
