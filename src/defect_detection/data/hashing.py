"""Content hashes of image files: what finds identical images whatever their names or folders."""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

_CHUNK = 1 << 20


@functools.cache
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the key so an edited file is hashed again.
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str | None:
    """sha256 of the file's bytes, or None when it cannot be read (missing files stay ungrouped).

    Cached per (path, size, mtime) so the split and the audit of one process hash each file once.
    """
    try:
        stat = os.stat(path)
        return _sha256(str(path), stat.st_size, stat.st_mtime_ns)
    except OSError:
        return None
