#!/usr/bin/env python
"""Measure the near-duplicate threshold of the data audit on real lines: the difference-hash
distances of BSData photos of the same part position vs different positions, and of MVTec bottle
(and AITEX) pairs, plus the hashing time.

    python scripts/near_duplicate_threshold.py --out docs/results/near_duplicates.md

A near-duplicate threshold is right when it stays below every pair of different parts (BSData's
other positions: same machine, crop and light, the hardest case there is) and above the re-shot
pairs. Distances are shares of the hash's bits that differ.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from defect_detection import project_root
from defect_detection.data import near_duplicates as nd
from defect_detection.data.records import read_folder, read_mvtec

PERCENTILES = (0, 1, 5, 25, 50)


def distances(paths: list[str]) -> tuple[np.ndarray, float, tuple[int, int]]:
    """All pairwise bit-difference shares, the seconds hashing took (shape + hashes) and the shape."""
    nd._difference_hash.cache_clear()
    start = time.perf_counter()
    shape = nd.hash_shape(paths)
    hashes = np.stack(nd.difference_hashes(paths, shape))
    seconds = time.perf_counter() - start
    bits = np.unpackbits(hashes, axis=1)[:, :2 * shape[0] * shape[1]].astype(np.float32)
    diff = (bits @ (1 - bits).T + (1 - bits) @ bits.T) / bits.shape[1]
    return diff, seconds, shape


def average_hash_16(paths: list[str]) -> np.ndarray:
    """The usual 16 x 16 average hash (grey above its mean), for comparison: pairwise bit shares."""
    from PIL import Image

    bits = []
    for path in paths:
        with Image.open(path) as im:
            im.draft("L", (128, 128))
            grey = np.asarray(im.convert("L").resize((16, 16), Image.BILINEAR), np.float32)
        bits.append((grey > grey.mean()).ravel())
    b = np.array(bits, np.float32)
    return (b @ (1 - b).T + (1 - b) @ b.T) / b.shape[1]


def pair_search_seconds(paths: list[str]) -> tuple[float, int]:
    shape = nd.hash_shape(paths)
    hashes = np.stack(nd.difference_hashes(paths, shape))
    start = time.perf_counter()
    pairs = nd.near_pairs(hashes, 2 * shape[0] * shape[1])
    return time.perf_counter() - start, len(pairs)


def quantiles(values: np.ndarray) -> str:
    return " / ".join(f"{v:.3f}" for v in np.percentile(values, PERCENTILES))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = project_root().parent / "shared" / "data"
    p.add_argument("--shared-data", default=str(shared))
    p.add_argument("--out", default=str(project_root() / "outputs" / "near_duplicates.md"))
    args = p.parse_args(argv)
    root = Path(args.shared_data)
    t = nd.MAX_DIFFERENT_BITS
    command = " ".join(map(shlex.quote, ["python", "scripts/near_duplicate_threshold.py", *sys.argv[1:]]))
    lines = ["# Near-duplicate threshold of the data audit, measured", "", f"Command: `{command}`",
             "", f"Difference hash (signs of horizontal and vertical grey steps) of a thumbnail with a "
             f"{nd.LONG_SIDE} px long side in the median image's aspect; distance = share of bits that "
             f"differ; the audit's threshold `MAX_DIFFERENT_BITS` = {t}. Percentiles "
             f"{', '.join(map(str, PERCENTILES))}.", "",
             "| data | pairs | n | distance percentiles | pairs <= threshold |", "|---|---|---|---|---|"]
    bs = root / "bsdata_pitting"
    position = {str(bs / r["file"]): r["part_position"] for r in csv.DictReader(open(bs / "groups.csv"))}
    paths = sorted(position)
    diff, bs_s, bs_shape = distances(paths)
    iu = np.triu_indices(len(paths), 1)
    pos = np.array([position[p] for p in paths])
    same = (pos[:, None] == pos[None, :])[iu]
    d = diff[iu]
    for name, mask in (("same part position", same), ("different positions", ~same)):
        lines.append(f"| BSData {bs_shape[0]}x{bs_shape[1]} | {name} | {mask.sum()} | {quantiles(d[mask])} | "
                     f"{int((d[mask] <= t).sum())} |")
    baseline = average_hash_16(paths)[iu]
    for name, mask in (("same part position", same), ("different positions", ~same)):
        lines.append(f"| BSData, 16x16 average hash | {name} | {mask.sum()} | {quantiles(baseline[mask])} "
                     "| - |")
    nearest = np.where(np.eye(len(paths), dtype=bool), np.inf, diff)
    nn_same = float((pos[nearest.argmin(1)] == pos).mean())
    partners = np.where(pos[:, None] == pos[None, :], nearest, np.inf).min(1)
    covered = float((partners <= t).mean())
    bs_search, _ = pair_search_seconds(paths)

    floor = float(d[~same].min())
    timing = [f"BSData ({len(paths)} JPEG, 1130 x 460): hashing {bs_s:.2f} s, pair search {bs_search:.3f} s"]
    closest_of = {}
    for label, records in (("MVTec bottle", read_mvtec(root / "mvtec", ["bottle"])),
                           ("AITEX", read_folder(root / "aitex_fabric"))):
        files = sorted(r.path for r in records)
        diff, secs, shape = distances(files)
        iu = np.triu_indices(len(files), 1)
        d = diff[iu]
        lines.append(f"| {label} {shape[0]}x{shape[1]} | all pairs | {len(d)} | {quantiles(d)} | "
                     f"{int((d <= t).sum())} |")
        small = average_hash_16(files)[iu]
        lines.append(f"| {label}, 16x16 average hash | all pairs | {len(d)} | {quantiles(small)} "
                     f"(max {small.max():.3f}) | - |")
        order = np.argsort(d)[:3]
        closest_of[label] = d[order]
        closest = ", ".join(f"{Path(files[iu[0][k]]).relative_to(root).as_posix()} ~ "
                            f"{Path(files[iu[1][k]]).name} {d[k]:.3f}" for k in order)
        timing.append(f"{label} ({len(files)} images): hashing {secs:.2f} s; closest pairs: {closest}")
    bottle = closest_of["MVTec bottle"]
    lines += ["", f"Threshold {t}: above the closest bottle pair ({bottle[0]:.3f}; train/good 069 and 070 "
                  "show the same bottle photographed twice), below the next bottle pair "
                  f"({bottle[1]:.3f}) and the closest BSData photos of two different part positions "
                  f"({floor:.3f}).", "",
              f"BSData: the nearest other photo of {nn_same:.1%} of the photos shows the same part "
                  f"position; {covered:.1%} of the photos have a same-position photo within the threshold "
                  "(the rest changed with wear and soiling more than a re-shot photo does).", "",
              "Time (this machine, 2 cores, shared load):", "", *[f"- {x}" for x in timing], ""]
    text = "\n".join(lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
