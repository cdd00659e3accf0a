"""Layout checks a user wants before trusting a number: each problem is a warning with its paths."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from defect_detection.base import DEFECT, GOOD
from defect_detection.data import near_duplicates as nd
from defect_detection.data.hashing import file_sha256
from defect_detection.data.records import ImageRecord
from defect_detection.data.splits import duplicate_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditWarning:
    """One problem found in the data: `check` names the rule, `paths` the files behind it."""

    check: str
    message: str
    paths: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "paths": list(self.paths)}


def audit_records(records: Sequence[ImageRecord], assignment: Mapping[str, str] | None = None,
                  content_hash: Callable[[str], str | None] | None = file_sha256) -> list[AuditWarning]:
    """Every check on the records; `assignment` (path -> split name) enables the leak checks."""
    return [*check_classes(records), *check_single_image_types(records),
            *check_duplicates(records, assignment, content_hash),
            *check_near_duplicates(records, assignment, content_hash), *check_headers(records)]


def check_classes(records: Sequence[ImageRecord]) -> list[AuditWarning]:
    """Categories that cannot teach (or be scored on) both classes."""
    out = []
    by_category: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        by_category[r.category].append(r)
    for category, items in sorted(by_category.items()):
        labels = Counter(r.label for r in items)
        for label, name, hint in ((DEFECT, "no_defects", "defect"), (GOOD, "no_good", "good")):
            if not labels[label]:
                out.append(AuditWarning(
                    name, f"category '{category}' has no {hint} images ({len(items)} images in all): "
                          f"the classifier cannot learn or be scored on '{hint}' for it.",
                    tuple(sorted(r.path for r in items))))
    return out


def check_single_image_types(records: Sequence[ImageRecord]) -> list[AuditWarning]:
    """A defect type with one image can only ever sit in one split: it is never both learnt and tested."""
    types = Counter((r.category, r.defect_type) for r in records if r.label == DEFECT)
    return [AuditWarning("single_image_type", f"defect type '{category}/{kind}' has only one image.",
                         tuple(r.path for r in records if (r.category, r.defect_type) == (category, kind)))
            for (category, kind), n in sorted(types.items()) if n == 1]


def check_duplicates(records: Sequence[ImageRecord], assignment: Mapping[str, str] | None = None,
                     content_hash: Callable[[str], str | None] | None = file_sha256) -> list[AuditWarning]:
    """Identical files (same content hash): a leak across splits, a contradiction across labels."""
    out = []
    for group in duplicate_groups(records, content_hash):
        if len(group) < 2:
            continue
        paths = tuple(r.path for r in group)
        if len({r.label for r in group}) > 1:
            out.append(AuditWarning(
                "duplicate_label_conflict",
                f"{len(group)} identical files carry different labels "
                f"({', '.join(sorted({r.defect_type for r in group}))}): fix the labels.", paths))
        splits = sorted({assignment.get(r.path, "unused") for r in group}) if assignment else []
        if len(splits) > 1:
            out.append(AuditWarning(
                "duplicate_across_splits",
                f"{len(group)} identical files sit in different splits ({', '.join(splits)}): a leak "
                "that inflates val/test numbers; remove the copies or re-split.", paths))
        else:
            where = f" (all in {splits[0]})" if splits else ""
            out.append(AuditWarning("duplicate", f"{len(group)} identical files{where}: "
                                                 "they count twice in training and in the metrics.",
                                    paths))
    return out


def check_near_duplicates(records: Sequence[ImageRecord], assignment: Mapping[str, str] | None,
                          content_hash: Callable[[str], str | None] | None = file_sha256,
                          max_fraction: float = nd.MAX_DIFFERENT_BITS) -> list[AuditWarning]:
    """Near-copies (the same part photographed again) in different splits: one warning naming the
    closest pairs in its message and every pair in its paths (two by two, closest first).

    Identical files are left to check_duplicates; unused files (not in any split) cannot leak.
    """
    if not assignment:
        return []
    used = sorted({r.path for r in records if assignment.get(r.path, "unused") != "unused"})
    if len({assignment[p] for p in used}) < 2:
        return []
    shape = nd.hash_shape(used)
    hashed = [(p, h) for p, h in zip(used, nd.difference_hashes(used, shape)) if h is not None]
    if len(hashed) < 2:
        return []
    paths = [p for p, _ in hashed]
    pairs = nd.near_pairs(np.stack([h for _, h in hashed]), 2 * shape[0] * shape[1], max_fraction)
    cross = sorted(((paths[i], paths[j], d) for i, j, d in pairs
                    if assignment[paths[i]] != assignment[paths[j]]), key=lambda pair: pair[2])
    if content_hash:  # identical bytes: check_duplicates reports them
        cross = [(a, b, d) for a, b, d in cross
                 if content_hash(a) is None or content_hash(a) != content_hash(b)]
    if not cross:
        return []
    splits = sorted({assignment[p] for a, b, _ in cross for p in (a, b)})
    images = {p for a, b, _ in cross for p in (a, b)}
    closest = "; ".join(f"{Path(a).name} ({assignment[a]}) ~ {Path(b).name} ({assignment[b]}) {d:.1%}"
                        for a, b, d in cross[:3])
    return [AuditWarning(
        "near_duplicate_across_splits",
        f"{len(cross)} pair(s) of near-duplicate images ({len(images)} images; difference hash within "
        f"{max_fraction:.1%} of its bits) sit in different splits ({', '.join(splits)}); closest: {closest}. "
        "Photos of one part on both sides flatter val/test: keep them in one split with split.make.groups "
        "(a CSV column or a file-name regex). Paths: the pairs two by two, closest first.",
        tuple(p for a, b, _ in cross for p in (a, b)))]


def check_headers(records: Sequence[ImageRecord]) -> list[AuditWarning]:
    """Mixed resolutions or colour modes within a category, read from the headers only."""
    out = []
    by_category: dict[str, list[tuple[str, tuple[int, int], str]]] = defaultdict(list)
    unreadable = []
    for r in records:
        try:
            with Image.open(r.path) as im:  # lazy: parses the header, decodes no pixels
                by_category[r.category].append((r.path, im.size, im.mode))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            unreadable.append((r.path, err))
    if unreadable:
        out.append(AuditWarning("unreadable", f"{len(unreadable)} files cannot be opened as images "
                                              f"(first: {unreadable[0][1]}); remove or replace them.",
                                tuple(p for p, _ in unreadable)))
    for category, items in sorted(by_category.items()):
        for check, what, key in (("mixed_resolution", "resolutions", lambda i: "x".join(map(str, i[1]))),
                                 ("mixed_mode", "colour modes", lambda i: i[2])):
            counts = Counter(key(i) for i in items)
            if len(counts) < 2:
                continue
            common = counts.most_common(1)[0][0]
            listing = ", ".join(f"{k}: {n}" for k, n in counts.most_common())
            out.append(AuditWarning(
                check, f"category '{category}' mixes {len(counts)} {what} ({listing}); the paths are "
                       f"those not {common}.", tuple(p for p in (i[0] for i in items if key(i) != common))))
    return out
