"""Group keys of image files (the part, position or batch a photo shows), from a CSV column or a
file-name regex.

A line that photographs the same part again makes near-copies: split image by image, one copy
trains and its twin is tested, and every val/test number is flattered. The split keeps each
group in one split; this module only says which file belongs to which group.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from defect_detection.base import UserError
from defect_detection.data.records import ImageRecord

log = logging.getLogger(__name__)
KEY = "split.make.groups"
_SHOWN = 3


def grouping_enabled(groups: Mapping | None) -> bool:
    """Whether `split.make.groups` names a source (csv or regex); all nulls mean file by file."""
    return bool(groups) and bool(groups.get("csv") or groups.get("regex"))


def group_keys(records: Sequence[ImageRecord], groups: Mapping) -> dict[str, str]:
    """path -> group key for every record that has one.

    Records without a key and CSV rows naming no record each get one warning naming them: the
    former split file by file, the latter are usually files dropped as bad (data.on_bad_image=skip)
    or renamed since the CSV was written.
    """
    csv_path, regex = groups.get("csv"), groups.get("regex")
    if csv_path and regex:
        raise UserError(f"{KEY}.csv={csv_path} and {KEY}.regex={regex} are both set: choose one source "
                        "of group keys (set the other to null).")
    keys = (_keys_from_csv(records, groups, csv_path) if csv_path else _keys_from_regex(records, str(regex)))
    source = f"{KEY}.csv={csv_path}" if csv_path else f"{KEY}.regex={regex}"
    if records and not keys:  # every file on its own: grouping would silently do nothing
        how = ("its file column must hold paths relative to data.root, e.g. good/a.png" if csv_path
               else "it is searched in each file name, e.g. 01_a_crop.jpg")
        raise UserError(f"{source} gives none of the {len(records)} images a group ({how}); first image: "
                        f"{sorted(r.path for r in records)[0]}.")
    missing = sorted(r.path for r in records if r.path not in keys)
    if missing:
        log.warning("%d of %d images have no group in %s, so each is split on its own (near-copies among "
                    "them can cross splits): %s.", len(missing), len(records), source, _examples(missing))
    return keys


def _keys_from_regex(records: Sequence[ImageRecord], regex: str) -> dict[str, str]:
    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise UserError(f"{KEY}.regex={regex!r} is not a valid regular expression ({err}).") from None
    if pattern.groups < 1:
        raise UserError(f"{KEY}.regex={regex!r} has no capture group: put the part of the file name that "
                        r"names the group in parentheses, e.g. '^(\d+)_'.")
    keys = {}
    for r in records:
        match = pattern.search(Path(r.path).name)
        if match and match.group(1):
            keys[r.path] = match.group(1)
    return keys


def _keys_from_csv(records: Sequence[ImageRecord], groups: Mapping, csv_path: str) -> dict[str, str]:
    root = Path(str(groups.get("root") or ".")).expanduser()
    path = Path(str(csv_path)).expanduser()
    path = path if path.is_absolute() else root / path
    file_col, group_col = groups.get("file_column") or "file", groups.get("column")
    if not group_col:
        raise UserError(f"{KEY}.csv={csv_path} needs {KEY}.column: the CSV column that holds each file's "
                        "group (e.g. part_position).")
    if not path.is_file():
        raise UserError(f"Group file not found: {path} ({KEY}.csv={csv_path}; a relative path is read "
                        f"from data.root={root}).")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        for key, col in ((f"{KEY}.file_column", file_col), (f"{KEY}.column", group_col)):
            if col not in columns:
                raise UserError(f"{path} has no column '{col}' ({key}); its columns: {', '.join(columns)}.")
        rows = [(row[file_col], row[group_col]) for row in reader]
    by_file: dict[Path, str] = {}
    conflicts = []
    for file, key in rows:
        where = _normal(root / file)
        if where in by_file and by_file[where] != key:
            conflicts.append(f"{file} ({by_file[where]}, {key})")
        by_file[where] = key
    if conflicts:
        raise UserError(f"{path} gives {len(conflicts)} file(s) two groups: {_examples(conflicts)}. "
                        "Give each file one group.")
    keys = {r.path: by_file[p] for r in records if (p := _normal(Path(r.path))) in by_file
            and by_file[p] not in ("", None)}
    present = {_normal(Path(r.path)) for r in records}
    absent = sorted(str(p) for p in by_file if p not in present)
    if absent:
        log.warning("%d file(s) named in %s are not among the %d images read (removed, renamed or "
                    "dropped as bad files?): %s.", len(absent), path, len(records), _examples(absent))
    return keys


def _normal(path: Path) -> Path:
    """One spelling per file, so `root/./good/a.jpg` in the CSV matches the reader's `root/good/a.jpg`."""
    return path.expanduser().resolve()


def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")
