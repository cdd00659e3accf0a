"""Near-duplicate photos (the same part shot again), found by a difference hash and its Hamming
distance: identical bytes are caught by sha256, a re-shot photo is not.

The hash is the sign of the horizontal and vertical grey-level steps of a thumbnail whose long
side is 128 px, shaped like the median image (2 x w x h bits). A 16 x 16 hash was measured first
and does not work: every MVTec bottle is within 8 of its 256 bits of every other, and on BSData
photos of one part position are no closer than photos of different ones. The threshold and its
measurement: docs/results/near_duplicates.md (scripts/near_duplicate_threshold.py).
"""

from __future__ import annotations

import functools
import os
import statistics
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

LONG_SIDE = 128
MIN_SIDE = 8
# At most this share of the hash's bits differ for a near-duplicate: above MVTec bottle's one
# re-shot bottle (train/good 069 and 070, 0.064) and below the closest BSData photos of two
# different part positions (0.088) and any other bottle pair (0.094); see the module docstring.
MAX_DIFFERENT_BITS = 0.075


def hash_shape(paths: Sequence[str]) -> tuple[int, int]:
    """(width, height) of the thumbnail: the median image's aspect, long side LONG_SIDE (or the
    median long side when the images are smaller), read from the headers only."""
    sizes = []
    for path in paths:
        try:
            with Image.open(path) as im:
                sizes.append(im.size)
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    if not sizes:
        return LONG_SIDE, LONG_SIDE
    w, h = statistics.median(s[0] for s in sizes), statistics.median(s[1] for s in sizes)
    long_side = int(min(LONG_SIDE, max(w, h)))
    short = max(MIN_SIDE, round(long_side * min(w, h) / max(w, h)))
    return (long_side, short) if w >= h else (short, long_side)


def difference_hash(path: str, shape: tuple[int, int]) -> np.ndarray | None:
    """Packed bits of the image's difference hash at `shape`, or None when it cannot be read.

    Cached per (path, size, mtime, shape): the auto recipe's candidates audit the same files."""
    try:
        stat = os.stat(path)
        return _difference_hash(str(path), stat.st_size, stat.st_mtime_ns, tuple(shape))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def difference_hashes(paths: Sequence[str], shape: tuple[int, int]) -> list[np.ndarray | None]:
    """difference_hash of every path, decoded on threads (PIL releases the GIL while decoding:
    on 2 cores about half the time for MVTec bottle's full-size PNGs)."""
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda p: difference_hash(p, shape), paths))


@functools.lru_cache(maxsize=65536)
def _difference_hash(path: str, size: int, mtime_ns: int, shape: tuple[int, int]) -> np.ndarray:
    w, h = shape
    with Image.open(path) as im:
        im.draft("L", (2 * (w + 1), 2 * (h + 1)))  # JPEG: decode at 1/2-1/8 scale, much faster
        grey = np.asarray(im.convert("L").resize((w + 1, h + 1), Image.BILINEAR), np.int16)
    corner = grey[:-1, :-1]
    return np.packbits(np.concatenate([(grey[:-1, 1:] > corner).ravel(), (grey[1:, :-1] > corner).ravel()]))


def near_pairs(hashes: np.ndarray, n_bits: int, max_fraction: float = MAX_DIFFERENT_BITS
               ) -> list[tuple[int, int, float]]:
    """(i, j, share of bits that differ) for every i < j within `max_fraction`, from packed
    hashes (one row each); rows are compared in chunks so memory stays small for large sets."""
    n = len(hashes)
    if n < 2:
        return []
    pad = (-hashes.shape[1]) % 8
    words = np.ascontiguousarray(np.pad(hashes, ((0, 0), (0, pad)))).view(np.uint64)
    limit = int(max_fraction * n_bits)
    chunk = max(1, 4_000_000 // (n * words.shape[1]))
    out = []
    for start in range(0, n, chunk):
        block = words[start:start + chunk]
        dist = np.bitwise_count(block[:, None, :] ^ words[None, :, :]).sum(-1, dtype=np.int64)
        for a, b in zip(*np.nonzero(dist <= limit)):
            i = start + int(a)
            if int(b) > i:
                out.append((i, int(b), float(dist[a, b]) / n_bits))
    return out

