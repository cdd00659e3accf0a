"""Train/val/test assignment of records: an honest stratified split (file by file or group by
group) and the seed's protocol."""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from defect_detection.base import DEFECT, UserError
from defect_detection.data.groups import group_keys, grouping_enabled
from defect_detection.data.hashing import file_sha256
from defect_detection.data.records import ImageRecord

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass
class Split:
    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]
    leaky: bool = False  # True when the report set is the set the threshold was chosen on
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> list[ImageRecord]:
        return getattr(self, name)

    def assignment(self) -> list[dict]:
        """Every record with the split it landed in, for the audit trail."""
        return [{**r.to_dict(), "split": name} for name in SPLITS for r in self[name]]


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    for key, value in (("split.val_fraction", val_fraction), ("split.test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise UserError(f"{key}={value} is outside [0, 1).")
    if val_fraction + test_fraction >= 1:
        raise UserError(f"split.val_fraction + split.test_fraction = {val_fraction + test_fraction:g}"
                        " leaves no training data; their sum must be below 1.")


def duplicate_groups(records: Sequence[ImageRecord],
                     content_hash: Callable[[str], str | None] | None = file_sha256
                     ) -> list[list[ImageRecord]]:
    """Records sorted by path, grouped so identical files (same content hash) form one group.

    Files the hash cannot read (None) stay alone, so records of missing files still split.
    """
    groups: list[list[ImageRecord]] = []
    by_hash: dict[str, list[ImageRecord]] = {}
    for r in sorted(records, key=lambda r: r.path):
        digest = content_hash(r.path) if content_hash else None
        if digest is None:
            groups.append([r])
        elif digest in by_hash:
            by_hash[digest].append(r)
        else:
            by_hash[digest] = [r]
            groups.append(by_hash[digest])
    return groups


def stratum_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(test, val) images of a stratum of n; every stratum with enough images (>= 3) reaches val
    and test so both can be scored."""
    n_test = round(n * test_fraction) if test_fraction else 0
    n_val = round(n * val_fraction) if val_fraction else 0
    if test_fraction and n >= 3:
        n_test = max(n_test, 1)
    if val_fraction and n >= 3:
        n_val = max(n_val, 1)
    return n_test, n_val


def stratified_split(records: Sequence[ImageRecord], val_fraction: float = 0.2,
                     test_fraction: float = 0.2, seed: int = 0,
                     content_hash: Callable[[str], str | None] | None = file_sha256,
                     max_train_defects: int | None = None, groups: Mapping | None = None) -> Split:
    """Pool every image and split each (category, label) stratum with the same fractions.

    Identical files are a leak when they land in different splits, so each group of files with
    the same `content_hash` is assigned as a unit (to the stratum of its first path); pass
    content_hash=None to split file by file. `groups` (split.make.groups: a CSV column or a
    file-name regex, see data/groups.py) keeps every group of related photos in one split too.
    `max_train_defects` keeps that many train defect
    images (a seeded choice; 0: good parts only) and leaves the rest unused, with val and test
    exactly as without it: how a line with few or no defect photos would fare, on the same test.
    """
    _check_fractions(val_fraction, test_fraction)
    _check_max_train_defects(max_train_defects)
    if grouping_enabled(groups):
        out = grouped_assignment(records, group_keys(records, groups), val_fraction, test_fraction, seed,
                                 content_hash)
        return _finish(out, max_train_defects, seed)
    strata: dict[tuple[str, int], list[list[ImageRecord]]] = defaultdict(list)
    groups = duplicate_groups(records, content_hash)
    for group in groups:
        strata[(group[0].category, group[0].label)].append(group)
    out: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    rng = random.Random(seed)
    for key in sorted(strata):
        items = strata[key]
        rng.shuffle(items)
        n = sum(len(g) for g in items)
        n_test, n_val = stratum_counts(n, val_fraction, test_fraction)
        # Fill test, then val, group by group (a duplicate group may overshoot by its size - 1).
        taken = {"test": 0, "val": 0}
        for group in items:
            name = ("test" if taken["test"] < n_test else "val" if taken["val"] < n_val else "train")
            out[name] += group
            if name in taken:
                taken[name] += len(group)
    n_dup = sum(1 for g in groups if len(g) > 1)
    if n_dup:
        log.warning("%d groups of identical files (same content hash) were each kept in one split; "
                    "see the data audit for their paths.", n_dup)
    return _finish(out, max_train_defects, seed)


def _finish(out: dict[str, list[ImageRecord]], max_train_defects: int | None, seed: int) -> Split:
    notes = []
    if max_train_defects is not None:
        out["train"] = _limit_train_defects(out["train"], int(max_train_defects), seed)
        notes.append(f"split.make.max_train_defects={int(max_train_defects)}")
    split = Split(**out, notes=notes)
    _check_nonempty(split)
    return split


def grouped_assignment(records: Sequence[ImageRecord], keys: Mapping[str, str], val_fraction: float,
                       test_fraction: float, seed: int,
                       content_hash: Callable[[str], str | None] | None = file_sha256
                       ) -> dict[str, list[ImageRecord]]:
    """Whole groups to test, val or train, each (category, label) stratum near its fractions.

    A group may hold several strata (a part position photographed good, then pitted), so groups
    cannot be dealt per stratum: in a seeded order, each goes to the split whose per-stratum
    counts it brings closest to their targets (squared shortfall relative to each target, so a
    small defect stratum weighs as much as a large good one), or to train when it would bring
    neither closer. Identical files join their groups; a file without a key is a group of one.
    """
    units = _units(records, keys, content_hash)
    total: dict[tuple[str, int], int] = defaultdict(int)
    for r in records:
        total[(r.category, r.label)] += 1
    targets = {"test": {}, "val": {}}
    for stratum, n in total.items():
        targets["test"][stratum], targets["val"][stratum] = stratum_counts(n, val_fraction, test_fraction)
    have = {name: defaultdict(int) for name in targets}
    out: dict[str, list[ImageRecord]] = {s: [] for s in SPLITS}
    placed = {s: 0 for s in SPLITS}
    random.Random(seed).shuffle(units)
    for unit in units:
        counts: dict[tuple[str, int], int] = defaultdict(int)
        for r in unit:
            counts[(r.category, r.label)] += 1
        gains = {name: _gain(counts, have[name], targets[name]) for name in ("test", "val")}
        name = max(gains, key=lambda n: gains[n])  # ties: test first (dict order)
        name = name if gains[name] > 0 else "train"
        out[name] += unit
        placed[name] += 1
        if name in have:
            for stratum, n in counts.items():
                have[name][stratum] += n
    log.info("split.make.groups: %d groups kept whole (a file without one counts as one): %d train / "
             "%d val / %d test.", len(units), placed["train"], placed["val"], placed["test"])
    return out


def _gain(counts: Mapping, have: Mapping, target: Mapping) -> float:
    """How much closer adding `counts` brings `have` to `target` (relative squared error)."""
    def err(stratum, n):
        return ((n - target[stratum]) / max(target[stratum], 1)) ** 2

    return sum(err(s, have[s]) - err(s, have[s] + n) for s, n in counts.items())


def _units(records: Sequence[ImageRecord], keys: Mapping[str, str],
           content_hash: Callable[[str], str | None] | None) -> list[list[ImageRecord]]:
    """Records joined by group key and by identical content, sorted so the order of `records`
    never matters; the seeded shuffle then decides."""
    parent = {r.path: r.path for r in records}

    def find(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    def join(paths: Sequence[str]) -> None:
        for p in paths[1:]:
            parent[find(p)] = find(paths[0])

    by_key: dict[str, list[str]] = defaultdict(list)
    for path, key in keys.items():
        if path in parent:
            by_key[key].append(path)
    for paths in by_key.values():
        join(paths)
    for dup in duplicate_groups(records, content_hash):
        join([r.path for r in dup])
    units: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in sorted(records, key=lambda r: r.path):
        units[find(r.path)].append(r)
    return sorted(units.values(), key=lambda u: u[0].path)


def _check_max_train_defects(value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UserError(f"split.max_train_defects={value!r}: give a whole number >= 0 (0: train on "
                        "good parts only) or null to keep every train defect.")


def _limit_train_defects(train: list[ImageRecord], keep: int, seed: int) -> list[ImageRecord]:
    defects = sorted((r for r in train if r.label != 0), key=lambda r: r.path)
    if keep >= len(defects):
        return train
    random.Random(seed).shuffle(defects)
    dropped = {r.path for r in defects[keep:]}
    log.info("split.max_train_defects=%d: %d of %d train defect images left unused (val and test "
             "unchanged).", keep, len(dropped), len(defects))
    return [r for r in train if r.path not in dropped]


def seed_protocol_split(records: Sequence[ImageRecord], val_fraction: float = 0.2,
                        seed: int = 42) -> Split:
    """The seed notebook's protocol, kept for reproduction only.

    train/good plus the test defects are pooled (test/good is unused), sorted by path, shuffled
    with `seed` and cut 80/20. The 20% is both the threshold-selection set and the report set,
    so every number reported on it is optimistic: the split is flagged leaky.
    """
    _check_fractions(val_fraction, 0.0)
    pool = [r for r in records if r.source_split != "test" or r.label == DEFECT]
    pool.sort(key=lambda r: r.path)
    random.Random(seed).shuffle(pool)
    n_val = int(len(pool) * val_fraction)
    val = pool[len(pool) - n_val:]
    split = Split(train=pool[:len(pool) - n_val], val=val, test=list(val), leaky=True,
                  notes=["seed protocol: the test set IS the validation set (leaky, reproduction only)"])
    log.warning("split=seed: the threshold is chosen on the same images it is reported on. "
                "Use split=stratified for honest numbers.")
    _check_nonempty(split)
    return split


def _check_nonempty(split: Split) -> None:
    for name in SPLITS:
        if not split[name]:
            raise UserError(f"The {name} split is empty after splitting "
                            f"({len(split.train)}/{len(split.val)}/{len(split.test)} train/val/test). "
                            "Add images or change split.val_fraction / split.test_fraction.")
