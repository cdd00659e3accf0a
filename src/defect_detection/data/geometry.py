"""Input geometry: how a photo of any size becomes what the network sees, and how maps go back.

Three geometries behind one interface, chosen with `input=square|letterbox|tiles`:

- square: resize to the working size (h x w, `data.image_size`), ignoring the aspect ratio. Fine
  for a 900 px part seen from above; it squeezes a 4096 x 256 scan 16x along one axis.
- letterbox: keep the aspect ratio, resize so the image fits the working size, pad the rest with
  mid-grey (zero after normalisation); maps are cropped to the content before going back.
- tiles: native resolution (or `input.scale` of it) cut into overlapping tiles; the last row and
  column are aligned to the image edge, so every pixel is seen and none is dropped. The image
  score is an aggregate of its tiles' scores (models/aggregation.py), maps are stitched back. An
  image smaller than one tile at that scale (size jitter, a cropped photo) is upscaled, aspect
  kept, until a tile fits: in training, evaluation, predict and serve alike.

`prepare` is the one place pixels are resized: the decoded-image cache, the predictors and the
data previews all call it, so training, evaluation, predict, serve and export see identical input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from defect_detection.base import UserError
from defect_detection.data.images import BadImageError, load_rgb

# Mid-grey: (128/255 - 0.498) / 0.502 ~ 0 after the backbones' normalisation, so padding adds no
# edge a detector could mistake for a defect.
PAD_VALUE = 128
MAX_SIDE = 16384


def size_hw(value, key: str = "data.image_size") -> tuple[int, int]:
    """(h, w) from an int (square) or a [h, w] pair; one clear error for anything else."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, (int, np.integer)):
        h = w = int(value)
    elif isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2 \
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
        h, w = (int(v) for v in value)
    else:
        raise UserError(f"{key}={value!r}: give one positive integer (square) or [height, width].")
    if not (8 <= h <= MAX_SIDE and 8 <= w <= MAX_SIDE):
        raise UserError(f"{key}={value!r}: each side must be in [8, {MAX_SIDE}] pixels.")
    return h, w


def axis_starts(length: int, tile: int, overlap: int) -> np.ndarray:
    """Tile starts along one axis: stride tile - overlap, the last tile flush with the edge."""
    if length <= tile:
        return np.zeros(1, dtype=np.int64)
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    starts = np.arange(n, dtype=np.int64) * stride
    starts[-1] = length - tile
    return np.unique(starts)


@dataclass(frozen=True)
class Geometry:
    """Base: the prepared image is the whole network input (one tile)."""

    name: ClassVar[str] = ""
    size: tuple[int, int] = (224, 224)

    # -- pixels ---------------------------------------------------------------------------
    def prepared_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of what `prepare` makes of an image of size hw (what the cache stores)."""
        return self.size

    def prepare(self, im: Image.Image) -> np.ndarray:
        """H x W x 3 uint8 network-side pixels of an RGB image."""
        raise NotImplementedError

    def prepare_mask(self, mask: Image.Image) -> np.ndarray:
        """H x W bool mask resized exactly like its image (bilinear, then >= half; a thin defect
        that would vanish at that cut keeps every touched pixel)."""
        values = self._resample(mask.convert("L"), Image.Resampling.BILINEAR, fill=0)
        binary = values >= 128
        return binary if binary.any() else values > 0

    def _resample(self, im: Image.Image, resample, fill) -> np.ndarray:
        raise NotImplementedError

    # -- tiles ----------------------------------------------------------------------------
    @property
    def tile_hw(self) -> tuple[int, int]:
        return self.size

    def tile_starts(self, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)

    def n_tiles(self, hw: tuple[int, int]) -> int:
        ys, xs = self.tile_starts(hw)
        return len(ys) * len(xs)

    def cut(self, x: torch.Tensor) -> torch.Tensor:
        """T x C x th x tw tiles of one C x H x W prepared image (row-major order)."""
        return x[None]

    def stitch(self, tile_maps: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """One H x W map of the prepared image from its T tile maps (overlaps averaged)."""
        return _resize_map(tile_maps[0], hw)

    # -- back to the photo ----------------------------------------------------------------
    def content_box(self, hw: tuple[int, int]) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the photo inside its prepared image."""
        h, w = self.prepared_hw(hw)
        return 0, 0, h, w

    def to_original(self, prepared_map: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """A map over the prepared image (H x W, any resolution) as a map over the photo (hw)."""
        top, left, h, w = self.content_box(hw)
        ph, pw = self.prepared_hw(hw)
        m = _resize_map(prepared_map, (ph, pw))[top:top + h, left:left + w]
        return _resize_map(m, hw)

    # -- description ----------------------------------------------------------------------
    def key(self) -> str:
        """What the cache keys on: two geometries with the same key make identical pixels."""
        return f"{self.name}|" + "|".join(f"{k}={v}" for k, v in sorted(self._pixel_params().items()))

    def _pixel_params(self) -> dict:
        return {"size": list(self.size)}

    def meta(self) -> dict:
        """What the inference bundle stores to rebuild this geometry (JSON-able)."""
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v
                                      for k, v in asdict(self).items()}}

    def describe(self) -> str:
        return f"{self.name} {self.size[0]}x{self.size[1]}"


def _resize_map(m: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    if tuple(m.shape[-2:]) == tuple(hw):
        return m
    return F.interpolate(m[None, None].float(), size=tuple(hw), mode="bilinear",
                         align_corners=False)[0, 0]


@dataclass(frozen=True)
class Square(Geometry):
    """Resize to h x w, ignoring the aspect ratio (the original behaviour)."""

    name: ClassVar[str] = "square"

    def prepare(self, im: Image.Image) -> np.ndarray:
        return self._resample(im, Image.Resampling.BILINEAR, fill=None)

    def _resample(self, im: Image.Image, resample, fill) -> np.ndarray:
        h, w = self.size
        if im.size != (w, h):
            im = im.resize((w, h), resample)
        return np.asarray(im, dtype=np.uint8)


@dataclass(frozen=True)
class Letterbox(Geometry):
    """Aspect kept: resized to fit h x w, centred, the rest mid-grey."""

    name: ClassVar[str] = "letterbox"

    def _fit(self, hw: tuple[int, int]) -> tuple[int, int]:
        h, w = self.size
        scale = min(h / hw[0], w / hw[1])
        return max(1, min(h, round(hw[0] * scale))), max(1, min(w, round(hw[1] * scale)))

    def content_box(self, hw: tuple[int, int]) -> tuple[int, int, int, int]:
        nh, nw = self._fit(hw)
        return (self.size[0] - nh) // 2, (self.size[1] - nw) // 2, nh, nw

    def prepare(self, im: Image.Image) -> np.ndarray:
        return self._resample(im, Image.Resampling.BILINEAR, fill=PAD_VALUE)

    def _resample(self, im: Image.Image, resample, fill) -> np.ndarray:
        top, left, nh, nw = self.content_box((im.height, im.width))
        if im.size != (nw, nh):
            im = im.resize((nw, nh), resample)
        pixels = np.asarray(im, dtype=np.uint8)
        out = np.full((*self.size, *pixels.shape[2:]), fill, dtype=np.uint8)
        out[top:top + nh, left:left + nw] = pixels
        return out


@dataclass(frozen=True)
class Tiles(Geometry):
    """Native resolution times `scale`, cut into overlapping tile_size tiles."""

    name: ClassVar[str] = "tiles"
    overlap: int = 32
    scale: float = 1.0

    @property
    def tile_hw(self) -> tuple[int, int]:
        return self.size

    def _scaled_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        if self.scale == 1.0:
            return int(hw[0]), int(hw[1])
        return max(1, round(hw[0] * self.scale)), max(1, round(hw[1] * self.scale))

    def prepared_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
        """The scaled image, upscaled (aspect kept) when a tile would not fit in it."""
        sh, sw = self._scaled_hw(hw)
        th, tw = self.size
        if sh >= th and sw >= tw:
            return sh, sw
        grow = max(th / sh, tw / sw)
        return max(th, math.ceil(sh * grow)), max(tw, math.ceil(sw * grow))

    def upscale_note(self, hw: tuple[int, int], path: str = "") -> str | None:
        """Why an image is upscaled before tiling (None: it is not): what predict puts in the row."""
        sh, sw = self._scaled_hw(hw)
        th, tw = self.size
        if sh >= th and sw >= tw:
            return None
        ph, pw = self.prepared_hw(hw)
        return (f"{path + ': ' if path else ''}{hw[1]} x {hw[0]} px at input.scale={self.scale:g} is smaller "
                f"than one {tw} x {th} tile: upscaled to {pw} x {ph}")

    def prepare(self, im: Image.Image) -> np.ndarray:
        return self._resample(im, Image.Resampling.BILINEAR, fill=None)

    def _resample(self, im: Image.Image, resample, fill) -> np.ndarray:
        ph, pw = self.prepared_hw((im.height, im.width))
        if im.size != (pw, ph):
            im = im.resize((pw, ph), resample)
        return np.asarray(im, dtype=np.uint8)

    def tile_starts(self, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        th, tw = self.size
        return axis_starts(hw[0], th, self.overlap), axis_starts(hw[1], tw, self.overlap)

    def cut(self, x: torch.Tensor) -> torch.Tensor:
        """All tiles by two gathers (rows, then columns): no Python loop over tiles."""
        th, tw = self.size
        ys, xs = self.tile_starts(tuple(x.shape[-2:]))
        rows = torch.from_numpy(ys[:, None] + np.arange(th)).reshape(-1)
        cols = torch.from_numpy(xs[:, None] + np.arange(tw)).reshape(-1)
        c = x.shape[0]
        t = x.index_select(1, rows).index_select(2, cols)  # C x (ny*th) x (nx*tw)
        t = t.view(c, len(ys), th, len(xs), tw).permute(1, 3, 0, 2, 4)
        return t.reshape(len(ys) * len(xs), c, th, tw)

    def stitch(self, tile_maps: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        th, tw = self.size
        ys, xs = self.tile_starts(hw)
        maps = tile_maps.float()
        if tuple(maps.shape[-2:]) != (th, tw):
            maps = F.interpolate(maps[:, None], size=(th, tw), mode="bilinear", align_corners=False)[:, 0]
        total = torch.zeros(hw, dtype=torch.float32)
        count = torch.zeros(hw, dtype=torch.float32)
        k = 0
        for y in ys.tolist():  # stitching runs once per explained image, not in the scoring path
            for x in xs.tolist():
                total[y:y + th, x:x + tw] += maps[k]
                count[y:y + th, x:x + tw] += 1
                k += 1
        return total / count.clamp_min(1)

    def _pixel_params(self) -> dict:
        # the cache stores the scaled image (tiling happens later); a tile's size sets the upscaling
        # of images smaller than it
        return {"scale": self.scale, "min_hw": list(self.size)}

    def describe(self) -> str:
        return (f"tiles {self.size[0]}x{self.size[1]} px, overlap {self.overlap} px, "
                f"scale {self.scale:g}")


GEOMETRIES: dict[str, type[Geometry]] = {g.name: g for g in (Square, Letterbox, Tiles)}


def build_geometry(cfg: Mapping | None, image_size=224) -> Geometry:
    """The geometry of an `input` config (or bundle meta); data.image_size is the working size."""
    cfg = dict(cfg or {"name": "square"})
    name = cfg.get("name", "square")
    if name not in GEOMETRIES:
        raise UserError(f"input={name!r} is not an input geometry: use one of {sorted(GEOMETRIES)}.")
    if name != "tiles":
        return GEOMETRIES[name](size=size_hw(cfg.get("size") or image_size))
    tile = size_hw(cfg.get("tile_size") if cfg.get("tile_size") is not None else cfg.get("size")
                   or image_size, "input.tile_size")
    overlap, scale = cfg.get("overlap", 0), cfg.get("scale", 1.0)
    integer = isinstance(overlap, (int, np.integer)) and not isinstance(overlap, bool)
    if not integer or not 0 <= overlap < min(tile):
        raise UserError(f"input.overlap={overlap!r}: tile overlap in pixels, an integer in "
                        f"[0, {min(tile) - 1}] (smaller than input.tile_size={list(tile)}).")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1:
        raise UserError(f"input.scale={scale!r}: the fraction of native resolution the tiles are cut "
                        "from, in (0, 1] (1 = native).")
    return Tiles(size=tile, overlap=int(overlap), scale=float(scale))


_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def header_hw(path: str) -> tuple[int, int]:
    """(h, w) of the image as load_rgb returns it, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(0x0112)
            except Exception:  # a malformed EXIF block: load_rgb ignores it the same way
                orientation = None
    except (OSError, ValueError) as err:
        raise BadImageError(path, f"cannot read the image header ({err})") from None
    return (w, h) if orientation in _TRANSPOSED else (h, w)


def load_resized(path: str | Path, size: int | tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 array of the image resized to size x size (the square geometry)."""
    return Square(size=size_hw(size)).prepare(load_rgb(path))
