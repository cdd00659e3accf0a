"""Before training: what the input geometry will cost, checked and sized up front.

For tiles every image's size is read from its header (no decoding), each is checked to hold at
least one tile (one clear error otherwise), and the batch is sized in images so that a batch
holds about `data.batch_size` tiles. For every geometry the decoded-image cache's size is known
exactly before decoding starts; when it would not fit in the memory this machine has free, the
run uses the disk cache instead and says so.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from defect_detection.data.cache import store_nbytes
from defect_detection.data.geometry import Geometry, Tiles, header_hw
from defect_detection.data.splits import SPLITS, Split

log = logging.getLogger(__name__)

# Share of the free memory the in-memory cache may take (the rest: model, activations, loaders).
MEMORY_SHARE = 0.5


@dataclass
class InputPlan:
    batch_size: int  # images per batch
    cache: str  # the cache mode the run uses (memory may become disk)
    cache_bytes: int  # prepared images (+ masks) of every split
    load_masks: bool
    sizes: dict[str, tuple[int, int]] | None = None  # original (h, w) by path, read for tiles
    tiles_per_image: float = 1.0

    def log_params(self) -> dict:
        return {"input_plan/batch_images": self.batch_size, "input_plan/cache": self.cache,
                "input_plan/cache_mb": round(self.cache_bytes / 1e6, 1),
                "input_plan/tiles_per_image": round(self.tiles_per_image, 2)}


def available_memory() -> int | None:
    """Bytes of memory free for this process (MemAvailable, bounded by a cgroup limit)."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            free = int(text) if free is None else min(free, int(text))
    if free is None and hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    return free


def _warn_upscaled(geometry: Tiles, sizes: dict[str, tuple[int, int]]) -> None:
    """Images smaller than a tile are upscaled (size jitter is normal); say how many, and when it
    is most of them, that the tile is too large for the data."""
    notes = [n for path, hw in sizes.items() if (n := geometry.upscale_note(hw, path))]
    if not notes:
        return
    smallest = min(sizes.values(), key=lambda hw: hw[0] * hw[1])
    log.warning("%d of %d images are smaller than one tile and are upscaled to fit it (first: %s)%s",
                len(notes), len(sizes), notes[0],
                f"; most are: lower input.tile_size (the smallest image is {smallest[1]} x {smallest[0]} px)"
                f" or raise input.scale" if len(notes) > len(sizes) // 2 else "")


def plan_input(geometry: Geometry, split: Split, cache: str, batch_size: int,
               images_per_batch: int | None = None, load_masks: bool = False) -> InputPlan:
    """Sizes, batch and cache of a run; raises UserError naming the image a tile cannot fit."""
    records = list({r.path: r for name in SPLITS for r in split[name]}.values())
    sizes = None
    tiles = 1.0
    if isinstance(geometry, Tiles):
        sizes = {r.path: header_hw(r.path) for r in records}
        _warn_upscaled(geometry, sizes)
        counts = [geometry.n_tiles(geometry.prepared_hw(hw)) for hw in sizes.values()]
        tiles = sum(counts) / max(1, len(counts))
        batch = images_per_batch or max(1, round(batch_size / tiles))
    else:
        batch = images_per_batch or batch_size
    hw = [sizes[r.path] for r in records] if sizes else None
    nbytes = store_nbytes(records, geometry, hw)
    if load_masks:
        nbytes += store_nbytes(records, geometry, hw or [header_hw(r.path) for r in records], "mask")
    free = available_memory()
    if cache == "memory" and free is not None and nbytes > MEMORY_SHARE * free:
        log.warning("The decoded images (%s) need %.1f GB, more than half of the %.1f GB free: using "
                    "the disk cache (data.cache=disk, data.cache_dir) instead of memory.",
                    geometry.describe(), nbytes / 1e9, free / 1e9)
        cache = "disk"
    else:
        log.info("Input %s: %.1f tiles per image, %d images per batch, cache %s of %.1f MB",
                 geometry.describe(), tiles, batch, cache, nbytes / 1e6)
    return InputPlan(batch, cache, nbytes, load_masks, sizes, tiles)
