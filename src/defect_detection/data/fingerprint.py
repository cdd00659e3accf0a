"""What a run's data were, file by file (path, size, mtime), so a resume can refuse other data.

A resume after images were added to (or edited in) the same `data.root` continued silently on the
new set and overwrote the run's `data/splits.csv`. Each run logs `data/fingerprint.json` when it
starts; a resume compares it with the files found now. Only os.stat is read: milliseconds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from defect_detection.data.records import ImageRecord

ARTIFACT = "data/fingerprint.json"


def fingerprint(records: Sequence[ImageRecord]) -> dict[str, str]:
    """{path: "size|mtime_ns"} of every image and mask (a missing file: "missing")."""
    out: dict[str, str] = {}
    for path in sorted({p for r in records for p in (r.path, r.mask_path) if p}):
        try:
            st = os.stat(path)
            out[path] = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            out[path] = "missing"
    return out


@dataclass(frozen=True)
class DataChange:
    added: list[str]
    removed: list[str]
    changed: list[str]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def describe(self, shown: int = 3) -> str:
        parts = []
        for name, paths in (("added", self.added), ("removed", self.removed), ("changed", self.changed)):
            if paths:
                more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
                parts.append(f"{len(paths)} {name} ({', '.join(paths[:shown])}{more})")
        return "; ".join(parts)


def compare(before: dict[str, str], now: dict[str, str]) -> DataChange:
    return DataChange(added=sorted(set(now) - set(before)), removed=sorted(set(before) - set(now)),
                      changed=sorted(p for p in set(before) & set(now) if before[p] != now[p]))
