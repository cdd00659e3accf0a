"""A practice line: synthetic parts in the folder layout `data=folder` reads, for the tutorials.

    python examples/practice_line.py practice/line                  good/ and defect/<type>/, 128 px
    python examples/practice_line.py practice/masked --masks        plus masks/<type>/<stem>_mask.png
    python examples/practice_line.py practice/scan --width 1024 --size 64 --grey --defect-scale 0.5
    python examples/practice_line.py practice/today --stream 200    parts as a camera sends them
    python examples/practice_line.py practice/later --stream 200 --lighting 0.7 --new-type-share 0.5

No photos of your own yet? This writes what a line's folder looks like, from the same generator as
`make demo` (textured discs, plates or meshes with scratches, spots and cracks; data/synthetic.py):
`good/*.png`, `defect/<type>/*.png` and, with `--masks`, the defects' masks. `--stream N` writes N
unjudged parts instead (about `--defect-share` of them defective; each file name ends in its true kind, for
examples/practice_review.py), the kind of folder
`defect-predict images=...` scores each shift; `--lighting 0.7` dims the lamp by 30 % and
`--new-type-share` makes that share of the defects a type the line never had ("dent").
The same arguments write the same images (`--seed`).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from defect_detection.data.synthetic import CATEGORIES, DEFECT_TYPES, generate_synthetic, synthetic_part


def write_line(
    out: Path,
    category: str,
    good: int,
    per_defect: int,
    size: int,
    seed: int,
    masks: bool,
    width: int | None,
    grey: bool,
    defect_scale: float,
    defect_contrast: float,
) -> dict[str, int]:
    """good/, defect/<type>/ and (masks) masks/<type>/ under `out`; returns the counts per folder."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = (
            generate_synthetic(
                Path(tmp) / "mvtec",
                categories=(category,),
                n_train_good=good - good // 4,
                n_test_good=good // 4,
                n_per_defect=per_defect,
                image_size=size,
                seed=seed,
                width=width,
                grey=grey,
                defect_scale=defect_scale,
                defect_contrast=defect_contrast,
            )
            / category
        )
        counts: dict[str, int] = {}
        goods = sorted((tree / "train" / "good").glob("*.png")) + sorted(
            (tree / "test" / "good").glob("*.png")
        )
        for i, path in enumerate(goods):
            _copy(path, out / "good" / f"part_{i:04d}.png")
        counts["good"] = len(goods)
        for kind in DEFECT_TYPES:
            images = sorted((tree / "test" / kind).glob("*.png"))
            for path in images:
                name = f"{kind}_{path.stem}"
                _copy(path, out / "defect" / kind / f"{name}.png")
                mask = tree / "ground_truth" / kind / f"{path.stem}_mask.png"
                if masks and mask.is_file():
                    _copy(mask, out / "masks" / kind / f"{name}_mask.png")
            counts[f"defect/{kind}"] = len(images)
    return counts


def write_stream(
    out: Path,
    category: str,
    n: int,
    size: int,
    seed: int,
    defect_share: float,
    lighting: float,
    new_type_share: float,
) -> dict[str, int]:
    """n parts under `out` (00000_good.png, 00001_scratch.png ...: the name carries the truth, which a
    real line does not know and the practice operator, examples/practice_review.py, answers with);
    returns how many of each kind were drawn."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    drawn: dict[str, int] = {}
    for i in range(n):
        kind = "good"
        if rng.random() < defect_share:
            kind = "dent" if rng.random() < new_type_share else str(rng.choice(DEFECT_TYPES))
        Image.fromarray(synthetic_part(category, kind, rng, size, lighting=lighting)).save(
            out / f"{i:05d}_{kind}.png"
        )
        drawn[kind] = drawn.get(kind, 0) + 1
    return drawn


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "out", type=Path, help="the folder to write (created; files of the same name replaced)"
    )
    parser.add_argument("--category", choices=CATEGORIES, default="disc", help="which synthetic part")
    parser.add_argument("--good", type=int, default=60, help="good parts")
    parser.add_argument("--per-defect", type=int, default=12, help="defective parts of each type")
    parser.add_argument("--size", type=int, default=128, help="image height (and width unless --width) in px")
    parser.add_argument("--width", type=int, help="image width in px (>= --size): a line scan")
    parser.add_argument("--grey", action="store_true", help="single-channel PNGs")
    parser.add_argument("--masks", action="store_true", help="write masks/<type>/<stem>_mask.png")
    parser.add_argument("--defect-scale", type=float, default=1.0, help="< 1: smaller defects")
    parser.add_argument("--defect-contrast", type=float, default=1.0, help="< 1: fainter defects")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stream", type=int, metavar="N", help="write N parts as a camera sends them, instead of a line"
    )
    parser.add_argument(
        "--defect-share", type=float, default=0.1, help="with --stream: share of defective parts"
    )
    parser.add_argument(
        "--lighting", type=float, default=1.0, help="with --stream: 0.7 = a lamp 30 %% dimmer"
    )
    parser.add_argument(
        "--new-type-share",
        type=float,
        default=0.0,
        help="with --stream: share of the defects that are a new type (dent)",
    )
    args = parser.parse_args(argv)
    if args.stream:
        counts = write_stream(
            args.out,
            args.category,
            args.stream,
            args.size,
            args.seed,
            args.defect_share,
            args.lighting,
            args.new_type_share,
        )
        print(f"{args.out}: {args.stream} parts ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})")
    else:
        counts = write_line(
            args.out,
            args.category,
            args.good,
            args.per_defect,
            args.size,
            args.seed,
            args.masks,
            args.width,
            args.grey,
            args.defect_scale,
            args.defect_contrast,
        )
        masks = len(list((args.out / "masks").rglob("*.png"))) if args.masks else 0
        print(
            f"{args.out}: "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
            + (f", masks {masks}" if masks else "")
        )
    return counts


if __name__ == "__main__":
    main()
