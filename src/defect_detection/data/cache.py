"""Decode every image once, at the working resolution, into uint8 N x 3 x S x S pixels.

Decoding and resizing a full-size PNG costs far more than a training step on it, so it happens
once per run (`memory`), once per dataset version (`disk`: an .npy memmap reused while the key
matches) or, for data that cannot be held at all, on every access (`none`). Augmentation then
runs on the cached uint8 tensors. All three modes produce identical pixels (`load_resized`).
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

from defect_detection import UserError
from defect_detection.data.images import load_resized
from defect_detection.data.records import ImageRecord

log = logging.getLogger(__name__)

CACHE_MODES = ("memory", "disk", "none")
# Bump when load_resized or the file layout changes: old cache files then stop matching.
FORMAT_VERSION = 1


def _stat_line(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as err:
        raise UserError(f"Cannot read image {path}: {err}. Restore the file or remove it from the "
                        "dataset folder.") from err
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def cache_key(paths: Sequence[str], size: int) -> tuple[str, str]:
    """(identity, content) digests of a set of images at one resolution.

    identity: the paths and resolution, i.e. which cache entry this is. content: also every
    file's size and mtime_ns, so an edited, replaced or touched file gives a new key. Only
    os.stat is read, never the pixels, so checking the key costs milliseconds.
    """
    head = f"v{FORMAT_VERSION}|{int(size)}|{len(paths)}\n"
    identity, content = hashlib.sha256(head.encode()), hashlib.sha256(head.encode())
    for path in paths:
        identity.update(f"{path}\n".encode())
        content.update(f"{_stat_line(path)}\n".encode())
    return identity.hexdigest()[:16], content.hexdigest()[:16]


def _chw(path: str, size: int) -> np.ndarray:
    return load_resized(path, size).transpose(2, 0, 1)


def _decoded(paths: Sequence[str], size: int, description: str) -> Iterator[np.ndarray]:
    """3 x S x S uint8 arrays in order, with a progress bar; PIL releases the GIL while it
    decodes and resizes, so a few threads use every core."""
    threads = max(1, min(8, os.cpu_count() or 1))
    with Progress(transient=True) as progress, ThreadPoolExecutor(threads) as pool:
        task = progress.add_task(f"{description} {len(paths)} images at {size} px", total=len(paths))
        try:
            for array in pool.map(_chw, paths, [size] * len(paths)):
                progress.advance(task)
                yield array
        except BaseException:  # a bad file: stop at once instead of decoding the rest first
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _fill(out: np.ndarray, paths: Sequence[str], size: int, description: str) -> None:
    for i, array in enumerate(_decoded(paths, size, description)):
        out[i] = array


def decode_images(records: Sequence[ImageRecord], size: int, description: str = "decoding") -> torch.Tensor:
    """N x 3 x size x size uint8 tensor in memory; augmentation then runs on tensors, never on files."""
    out = np.empty((len(records), 3, size, size), dtype=np.uint8)
    _fill(out, [r.path for r in records], size, description)
    return torch.from_numpy(out)


class DecodeOnAccess:
    """`none` mode: images[i] decodes file i on every access (for data that fits nowhere)."""

    def __init__(self, paths: Sequence[str], size: int) -> None:
        self.paths, self.size = list(paths), int(size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(_chw(self.paths[index], self.size)))


class MemmapImages:
    """`disk` mode: images[i] reads row i of an N x 3 x S x S .npy memmap.

    The memmap is opened lazily in each process and dropped when pickled, so DataLoader
    workers (fork or spawn) open the file themselves instead of receiving a copy of it.
    """

    def __init__(self, path: str | Path, shape: tuple[int, ...]) -> None:
        self.path, self.shape = Path(path), tuple(shape)
        self._array: np.ndarray | None = None

    @property
    def array(self) -> np.ndarray:
        if self._array is None:
            self._array = _open_valid(self.path, self.shape)
            if self._array is None:
                raise UserError(f"Decoded-image cache {self.path} vanished or changed while in use. "
                                "Run again; it is rebuilt.")
        return self._array

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.array[index]))  # a private, writable copy of one row

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}


def _open_valid(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The memmap when the file is a complete uint8 array of the expected shape, else None."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if array.dtype != np.uint8 or tuple(array.shape) != shape:
        return None
    return array


def _build_disk_cache(final: Path, paths: Sequence[str], shape: tuple[int, ...], size: int,
                      description: str) -> None:
    """Decode into a private temp file, then publish it with an atomic rename: a run that
    dies half-way leaves only a temp file, which no reader ever opens."""
    final.parent.mkdir(parents=True, exist_ok=True)
    ignore = final.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# decoded-image cache: rebuilt on demand, never committed\n*\n")
    tmp = final.with_name(f".{final.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
        _fill(out, paths, size, description)
        out.flush()
        del out
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    stem = final.stem.split("-")[0]
    for stale in final.parent.glob(f"{stem}-*.npy"):  # same images and size, older contents
        if stale != final:
            stale.unlink(missing_ok=True)


def cached_images(records: Sequence[ImageRecord], size: int, mode: str = "memory",
                  cache_dir: str | Path | None = None, description: str = "caching"):
    """Indexable uint8 3 x S x S images of `records`: images[i] is a tensor, len(images) == N.

    memory: one tensor decoded now. disk: a memmap under cache_dir, reused when the key (paths,
    file sizes, mtimes, resolution) matches and rebuilt otherwise. none: decode on access.
    """
    if mode not in CACHE_MODES:
        raise UserError(f"data.cache={mode!r} is not a cache mode: use one of {', '.join(CACHE_MODES)}.")
    paths = [r.path for r in records]
    if mode == "none":
        return DecodeOnAccess(paths, size)
    if mode == "memory" or not paths:
        return decode_images(records, size, description)
    if not cache_dir:
        raise UserError("data.cache=disk needs data.cache_dir: set it to a writable folder.")
    identity, content = cache_key(paths, size)
    shape = (len(paths), 3, int(size), int(size))
    final = Path(cache_dir).expanduser() / f"{identity}-{content}.npy"
    if _open_valid(final, shape) is not None:
        log.info("Reusing decoded-image cache %s (%d images at %d px)", final, len(paths), size)
    else:
        try:
            _build_disk_cache(final, paths, shape, size, description)
        except OSError as err:
            raise UserError(f"Cannot write the decoded-image cache in {final.parent}: {err}. Point "
                            "data.cache_dir at a writable folder with space, or use data.cache=memory."
                            ) from err
        log.info("Wrote decoded-image cache %s (%.1f MB)", final, final.stat().st_size / 1e6)
    return MemmapImages(final, shape)
