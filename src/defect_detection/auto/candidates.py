"""The auto recipe's rules: which (family, geometry) candidates fit the data, in the order the
likely best runs first. Each rule is one readable sentence in `reason`, logged with the run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from defect_detection.auto.profile import DataProfile
from defect_detection.base import UserError


@dataclass(frozen=True)
class Candidate:
    label: str
    overrides: list[str]
    reason: str
    family: str = "classifier"
    geometry: str = "square"
    pixels: int = 0  # network input pixels per image (what a run's time scales with)
    notes: list[str] = field(default_factory=list)


def families(profile: DataProfile, min_train_defects: int) -> list[tuple[str, str]]:
    """(family, why) in the order they are tried."""
    n, masks = profile.train_defects, profile.train_masks
    if n == 0:
        return [("patchcore", "no defect images in train: only a good-parts detector can learn")]
    out = []
    if masks:
        out.append(("segmenter", f"{masks} train defects have masks: the segmenter learns from them"))
    pc = ("patchcore", "learns from the good parts alone; robust when defects are few or unlike each other")
    cl = ("classifier", f"{n} labelled train defects")
    out += [cl, pc] if n >= min_train_defects else [pc, cl]
    return out


def geometries(
    profile: DataProfile, size: int, elongated_aspect: float, large_factor: float
) -> list[tuple[str, list[str], int, str]]:
    """(name, overrides, pixels per image, why) in the order they are tried."""
    square = (
        "square",
        ["input=square", f"data.image_size={size}"],
        size * size,
        f"the whole part squashed to {size} x {size}",
    )
    short, long = min(profile.height, profile.width), profile.long_side()
    if profile.aspect > elongated_aspect:
        # line scans: the short side scaled to half the working size (never up), tiles as tall
        # as the scaled image and four times as long, overlapping by half a tile height
        scale = min(1.0, (size // 2) / short)
        t = max(32, int(short * scale))
        tl = min(4 * t, int(long * scale))
        tile = [t, tl] if profile.height <= profile.width else [tl, t]
        n_tiles = max(1, -(-int(long * scale - t // 2) // max(1, tl - t // 2)))
        tiles = (
            "tiles",
            [
                "input=tiles",
                f"input.scale={scale:.4g}",
                f"input.tile_size=[{tile[0]},{tile[1]}]",
                f"input.overlap={t // 2}",
                f"data.image_size={size}",
            ],
            n_tiles * t * tl,
            f"elongated (aspect {profile.aspect:.1f} > {elongated_aspect:g}): squashing would lose "
            f"small defects; tiles {tile[0]} x {tile[1]} at scale {scale:.2f}",
        )
        return [tiles, square]
    if long > large_factor * size:
        scale = min(1.0, 2 * size / short)  # about two tiles across the short side
        overlap = size // 8
        n_side = [
            max(1, -(-int(s * scale - overlap) // (size - overlap))) for s in (profile.height, profile.width)
        ]
        tiles = (
            "tiles",
            [
                "input=tiles",
                f"input.scale={scale:.4g}",
                f"input.tile_size={size}",
                f"input.overlap={overlap}",
                f"data.image_size={size}",
            ],
            n_side[0] * n_side[1] * size * size,
            f"large ({long} px > {large_factor:g} x {size}): tiles of {size} px at scale {scale:.2f} keep "
            "small defects",
        )
        return [square, tiles]  # a squashed part is cheap and often enough: it goes first
    return [square]


def native_size(profile: DataProfile, max_pixels: int) -> tuple[int, int, float]:
    """(h, w, scale): the median photo at native resolution, scaled down (aspect kept) to at most
    `max_pixels`, the most one backbone pass per image affords within the budget."""
    h, w = profile.height, profile.width
    scale = min(1.0, math.sqrt(max_pixels / max(1, h * w)))
    return max(32, int(h * scale)), max(32, int(w * scale)), scale


def native(profile: DataProfile, size: int, native_factor: float, max_pixels: int) -> Candidate | None:
    """The patch head on cached frozen features at (nearly) native resolution, whenever the photos
    are larger than the working size: what squashing to `size` would lose, it keeps."""
    if profile.train_defects == 0 or profile.long_side() < native_factor * size:
        return None
    h, w, scale = native_size(profile, max_pixels)
    return Candidate(
        "patchhead-native",
        ["detector=patchhead", "input=letterbox", f"data.image_size=[{h},{w}]"],
        f"photos {profile.width} x {profile.height} px > {native_factor:g} x {size}: a head on frozen "
        f"features computed once per image at {w} x {h} (scale {scale:.2f}) keeps small defects at one "
        "backbone pass per image",
        "patchhead",
        "native",
        h * w,
    )


def candidates(
    profile: DataProfile,
    size: int,
    *,
    elongated_aspect: float = 2.0,
    large_factor: float = 3.0,
    min_train_defects: int = 10,
    native_factor: float = 1.5,
    native_max_pixels: int = 500_000,
    only: Sequence[str] | None = None,
) -> list[Candidate]:
    """Every (family, geometry) pair: each family on the likeliest geometry, then on the next;
    the native patch head after the first geometry's candidates. `only`: these labels, in order."""
    fams = families(profile, min_train_defects)
    geos = geometries(profile, size, elongated_aspect, large_factor)
    out = []
    for k, (geo, g_over, pixels, g_why) in enumerate(geos):
        for fam, f_why in fams:
            out.append(
                Candidate(f"{fam}-{geo}", [f"detector={fam}", *g_over], f"{f_why}; {g_why}", fam, geo, pixels)
            )
        if k == 0 and (head := native(profile, size, native_factor, native_max_pixels)) is not None:
            out.append(head)
    if only:
        by_label = {c.label: c for c in out}
        missing = [label for label in only if label not in by_label]
        if missing:
            raise UserError(f"auto.only={list(only)}: {missing} not among this data's candidates "
                            f"{list(by_label)}.")
        out = [by_label[label] for label in only]
    return out
