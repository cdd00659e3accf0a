"""Decode every image once, as the input geometry prepares it, into uint8 3 x H x W pixels.

Decoding and resizing a full-size PNG costs far more than a training step on it, so it happens
once per run (`memory`), once per dataset version (`disk`: an .npy memmap reused while the key
matches) or, for data that cannot be held at all, on every access (`none`). Augmentation then
runs on the cached uint8 tensors. All three modes produce identical pixels (Geometry.prepare).

Square and letterbox images all have the working size (one N x 3 x H x W array); tiles keep each
image at its own (scaled) native size, so that store is ragged: one flat array plus the (h, w) of
every image. Tiles are cut from the cached image per batch (data/geometry.py), never stored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress

from defect_detection.base import UserError
from defect_detection.data.geometry import Geometry, Square, header_hw, size_hw
from defect_detection.data.images import load_rgb
from defect_detection.data.records import ImageRecord

log = logging.getLogger(__name__)

CACHE_MODES = ("memory", "disk", "none")
# Bump when Geometry.prepare or the file layout changes: old cache files then stop matching.
# 3: a checksum per entry beside each disk cache (<cache>.sums).
FORMAT_VERSION = 3


def as_geometry(geometry: Geometry | int | Sequence[int]) -> Geometry:
    """An int or [h, w] working size means the square geometry (the original behaviour)."""
    return geometry if isinstance(geometry, Geometry) else Square(size=size_hw(geometry))


def _stat_line(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as err:
        raise UserError(f"Cannot read image {path}: {err}. Restore the file or remove it from the "
                        "dataset folder.") from err
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def cache_key(paths: Sequence[str], geometry: Geometry | int | Sequence[int]) -> tuple[str, str]:
    """(identity, content) digests of a set of images under one geometry.

    identity: the paths and geometry, i.e. which cache entry this is. content: also every
    file's size and mtime_ns, so an edited, replaced or touched file gives a new key. Only
    os.stat is read, never the pixels, so checking the key costs milliseconds.
    """
    head = f"v{FORMAT_VERSION}|{as_geometry(geometry).key()}|{len(paths)}\n"
    identity, content = hashlib.sha256(head.encode()), hashlib.sha256(head.encode())
    for path in paths:
        identity.update(f"{path}\n".encode())
        content.update(f"{_stat_line(path)}\n".encode())
    return identity.hexdigest()[:16], content.hexdigest()[:16]


def prepared_chw(path: str, geometry: Geometry) -> np.ndarray:
    """3 x H x W uint8 pixels of one image file as `geometry` prepares them."""
    return geometry.prepare(load_rgb(path)).transpose(2, 0, 1)


def prepared_mask(path: str | None, geometry: Geometry, hw: tuple[int, int]) -> np.ndarray:
    """1 x H x W uint8 (0/1) mask as `geometry` prepares it; all zeros without a mask file."""
    from PIL import Image

    if not path:
        return np.zeros((1, *geometry.prepared_hw(hw)), dtype=np.uint8)
    try:
        with Image.open(path) as im:
            mask = im.convert("L")
    except OSError as err:
        raise UserError(f"Cannot read mask {path}: {err}. Remove or replace the file, or set "
                        "data.on_bad_image=skip to train without it.") from err
    if (mask.height, mask.width) != tuple(hw):
        raise UserError(f"Mask {path} is {mask.width} x {mask.height} px but its image is {hw[1]} x {hw[0]}: "
                        "a mask must have its image's size. Re-export the mask at the image's size or "
                        "remove it.")
    return geometry.prepare_mask(mask)[None].astype(np.uint8)


def _decoded(items: Sequence, fn, total_label: str, description: str) -> Iterator[np.ndarray]:
    """fn(item) for every item in order, with a progress bar; PIL releases the GIL while it
    decodes and resizes, so a few threads use every core."""
    threads = max(1, min(8, os.cpu_count() or 1))
    with Progress(transient=True) as progress, ThreadPoolExecutor(threads) as pool:
        task = progress.add_task(f"{description} {len(items)} {total_label}", total=len(items))
        try:
            for array in pool.map(fn, items):
                progress.advance(task)
                yield array
        except BaseException:  # a bad file: stop at once instead of decoding the rest first
            pool.shutdown(wait=False, cancel_futures=True)
            raise


class _Source:
    """What one store holds: the prepared images of `paths`, or the masks of `records`."""

    def __init__(self, records: Sequence[ImageRecord], geometry: Geometry, kind: str = "image",
                 sizes: Sequence[tuple[int, int]] | None = None) -> None:
        self.records, self.geometry, self.kind = list(records), geometry, kind
        self.paths = [r.path for r in self.records]
        uniform = geometry.name != "tiles"
        if sizes is None:  # square/letterbox images need no size; masks are checked against it
            sizes = ([geometry.size] * len(self.paths) if uniform and kind == "image"
                     else [header_hw(p) for p in self.paths])
        self.sizes = [tuple(s) for s in sizes]
        channels = 3 if kind == "image" else 1
        self.shapes = [(channels, *geometry.prepared_hw(hw)) for hw in self.sizes]

    @property
    def uniform(self) -> bool:
        return len(set(self.shapes)) <= 1

    def prepare(self, i: int) -> np.ndarray:
        if self.kind == "image":
            return prepared_chw(self.paths[i], self.geometry)
        return prepared_mask(self.records[i].mask_path, self.geometry, self.sizes[i])

    def decoded(self, description: str) -> Iterator[np.ndarray]:
        label = "images" if self.kind == "image" else "masks"
        return _decoded(range(len(self.paths)), self.prepare,
                        f"{label} ({self.geometry.describe()})", description)

    def nbytes(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes)

    def key(self) -> tuple[str, str]:
        identity, content = cache_key(self.paths, self.geometry)
        if self.kind == "image":
            return identity, content
        masks = hashlib.sha256("\n".join(_stat_line(r.mask_path) if r.mask_path else "-"
                                          for r in self.records).encode()).hexdigest()[:8]
        return f"{identity}m", f"{content}{masks}"


def _fill(out, source: _Source, description: str) -> None:
    """Decode every item of `source` into a dense array (N x C x H x W) or a ragged one (flat)."""
    if source.uniform:
        for i, array in enumerate(source.decoded(description)):
            out[i] = array
        return
    offsets = _offsets(source.shapes)
    for i, array in enumerate(source.decoded(description)):
        out[offsets[i]:offsets[i + 1]] = array.reshape(-1)


def _offsets(shapes: Sequence[tuple[int, ...]]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum([int(np.prod(s)) for s in shapes])]).astype(np.int64)


class RaggedImages:
    """Images of different sizes in one flat uint8 buffer: images[i] -> C x h_i x w_i view.

    The tile geometry keeps each image at its own native (scaled) size; one buffer instead of
    one tensor per image keeps the store a single allocation (and, on disk, a single memmap).
    """

    def __init__(self, flat, shapes: Sequence[tuple[int, ...]]) -> None:
        self.flat, self.shapes = flat, [tuple(int(v) for v in s) for s in shapes]
        self.offsets = _offsets(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> torch.Tensor:
        start, stop = self.offsets[index], self.offsets[index + 1]
        part = self.flat[start:stop]
        if isinstance(part, np.ndarray):
            part = torch.from_numpy(np.array(part))  # a private, writable copy of one image
        return part.view(self.shapes[index])

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])


def decode_images(records: Sequence[ImageRecord], geometry: Geometry | int | Sequence[int],
                  description: str = "decoding", kind: str = "image",
                  sizes: Sequence[tuple[int, int]] | None = None):
    """The prepared images (or masks) in memory: one N x C x H x W uint8 tensor when every image
    has the same prepared size, else a RaggedImages; augmentation then runs on tensors."""
    source = _Source(records, as_geometry(geometry), kind, sizes)
    if source.uniform:
        shape = source.shapes[0] if source.shapes else (3 if kind == "image" else 1, *source.geometry.size)
        out = np.empty((len(records), *shape), dtype=np.uint8)
        _fill(out, source, description)
        return torch.from_numpy(out)
    flat = np.empty(source.nbytes(), dtype=np.uint8)
    _fill(flat, source, description)
    return RaggedImages(torch.from_numpy(flat), source.shapes)


class DecodeOnAccess:
    """`none` mode: images[i] decodes file i on every access (for data that fits nowhere)."""

    def __init__(self, paths_or_source, geometry: Geometry | int | Sequence[int] | None = None) -> None:
        if isinstance(paths_or_source, _Source):
            self.source = paths_or_source
        else:
            records = [ImageRecord(str(p), 0, "", "") for p in paths_or_source]
            self.source = _Source(records, as_geometry(geometry))

    def __len__(self) -> int:
        return len(self.source.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.source.prepare(index)))


class MemmapImages:
    """`disk` mode: images[i] reads image i of an .npy memmap (N x C x H x W, or flat + shapes).

    The memmap is opened lazily in each process and dropped when pickled, so DataLoader
    workers (fork or spawn) open the file themselves instead of receiving a copy of it.
    """

    def __init__(self, path: str | Path, shape: tuple[int, ...],
                 shapes: Sequence[tuple[int, ...]] | None = None) -> None:
        self.path, self.shape = Path(path), tuple(shape)
        self.shapes = None if shapes is None else [tuple(s) for s in shapes]
        self._array: np.ndarray | None = None
        self._ragged: RaggedImages | None = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = _open_valid(self.path, self.shape)
            if self._array is None:
                raise UserError(f"Decoded-image cache {self.path} vanished or changed while in use. "
                                "Run again; it is rebuilt.")
        return self._array

    def __len__(self) -> int:
        return self.shape[0] if self.shapes is None else len(self.shapes)

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.shapes is not None:
            if self._ragged is None:
                self._ragged = RaggedImages(self.array, self.shapes)
            return self._ragged[index]
        return torch.from_numpy(np.array(self.array[index]))  # a private, writable copy of one row

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None, "_ragged": None}


def _open_valid(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The memmap when the file is a complete uint8 array of the expected shape, else None."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if array.dtype != np.uint8 or tuple(array.shape) != shape:
        return None
    return array


def _entry_views(array: np.ndarray, source: _Source) -> list[np.ndarray]:
    """Each cached image's bytes in `array` (a row, or its slice of a ragged store)."""
    if source.uniform:
        return [array[i] for i in range(len(source.paths))]
    offsets = _offsets(source.shapes)
    return [array[offsets[i]:offsets[i + 1]] for i in range(len(source.paths))]


def _digest(view: np.ndarray) -> int:
    return int.from_bytes(hashlib.blake2b(np.ascontiguousarray(view), digest_size=8).digest(), "little")


def _sums_path(final: Path) -> Path:
    return final.with_suffix(".sums")


def _entry_sums(array: np.ndarray, source: _Source) -> np.ndarray:
    return np.array([_digest(v) for v in _entry_views(array, source)], dtype=np.uint64)


def _repair(final: Path, source: _Source, shape: tuple[int, ...]) -> None:
    """Re-decode the entries whose checksum no longer matches (a cache damaged in place: same size,
    other bytes); a cache without readable checksums is rebuilt whole."""
    try:
        expected = np.load(_sums_path(final), allow_pickle=False)
    except (OSError, ValueError, EOFError):
        expected = None
    if expected is None or expected.shape != (len(source.paths),):
        log.warning("Decoded-image cache %s has no readable checksums: rebuilding it.", final)
        final.unlink(missing_ok=True)
        _build_disk_cache(final, source, shape, "rebuilding")
        return
    array = np.load(final, mmap_mode="r+", allow_pickle=False)
    views = _entry_views(array, source)
    damaged = [i for i, v in enumerate(views) if _digest(v) != int(expected[i])]
    if damaged:
        log.warning("Decoded-image cache %s: %d of %d entries are damaged (checksum mismatch, first: %s); "
                    "re-decoding them from the image files.", final, len(damaged), len(views),
                    source.paths[damaged[0]])
        for i in damaged:
            views[i][...] = source.prepare(i).reshape(views[i].shape)
        array.flush()
    del views, array


def _build_disk_cache(final: Path, source: _Source, shape: tuple[int, ...], description: str) -> None:
    """Decode into a private temp file, then publish it with an atomic rename: a run that
    dies half-way leaves only a temp file, which no reader ever opens. The entries' checksums
    are published first, beside it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    ignore = final.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# decoded-image cache: rebuilt on demand, never committed\n*\n")
    token = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = final.with_name(f".{final.stem}.{token}.tmp")
    tmp_sums = final.with_name(f".{final.stem}.{token}.sums.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        _fill(out, source, description)
        out.flush()
        with open(tmp_sums, "wb") as f:
            np.save(f, _entry_sums(out, source), allow_pickle=False)
        del out
        os.replace(tmp_sums, _sums_path(final))
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_sums.unlink(missing_ok=True)
    stem = final.stem.split("-")[0]
    for stale in final.parent.glob(f"{stem}-*.npy"):  # same images and geometry, older contents
        if stale != final:
            stale.unlink(missing_ok=True)
            _sums_path(stale).unlink(missing_ok=True)


def store_nbytes(records: Sequence[ImageRecord], geometry: Geometry | int | Sequence[int],
                 sizes: Sequence[tuple[int, int]] | None = None, kind: str = "image") -> int:
    """Bytes the cache of `records` will take (exact: uint8 prepared pixels), before decoding."""
    return _Source(records, as_geometry(geometry), kind, sizes).nbytes()


def cached_images(records: Sequence[ImageRecord], geometry: Geometry | int | Sequence[int],
                  mode: str = "memory", cache_dir: str | Path | None = None,
                  description: str = "caching", kind: str = "image",
                  sizes: Sequence[tuple[int, int]] | None = None):
    """Indexable uint8 C x H x W images (or masks: kind="mask") of `records`: images[i] is a
    tensor, len(images) == N. An int or [h, w] geometry means square at that size.

    memory: decoded now. disk: a memmap under cache_dir, reused when the key (paths, file sizes,
    mtimes, geometry) matches and rebuilt otherwise. none: decode on access. `sizes`: the
    images' original (h, w) when already known (tiles), else read from the file headers.
    """
    if mode not in CACHE_MODES:
        raise UserError(f"data.cache={mode!r} is not a cache mode: use one of {', '.join(CACHE_MODES)}.")
    geometry = as_geometry(geometry)
    source = _Source(records, geometry, kind, sizes)
    if mode == "none":
        return DecodeOnAccess(source)
    if mode == "memory" or not source.paths:
        return decode_images(records, geometry, description, kind, source.sizes)
    if not cache_dir:
        raise UserError("data.cache=disk needs data.cache_dir: set it to a writable folder.")
    identity, content = source.key()
    shape = (len(source.paths), *source.shapes[0]) if source.uniform else (source.nbytes(),)
    final = Path(cache_dir).expanduser() / f"{identity}-{content}.npy"
    if _open_valid(final, shape) is not None:
        log.info("Reusing decoded-image cache %s (%d %ss, %s)", final, len(source.paths), kind,
                 geometry.describe())
        _repair(final, source, shape)  # every entry checked against its checksum
    else:
        try:
            _build_disk_cache(final, source, shape, description)
        except OSError as err:
            raise UserError(f"Cannot write the decoded-image cache in {final.parent}: {err}. Point "
                            "data.cache_dir at a writable folder with space, or use data.cache=memory."
                            ) from err
        log.info("Wrote decoded-image cache %s (%.1f MB)", final, final.stat().st_size / 1e6)
    return MemmapImages(final, shape, None if source.uniform else source.shapes)
