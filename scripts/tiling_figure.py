#!/usr/bin/env python
"""The README's picture of input=tiles: one image with the tiles its run cuts (the run's own
geometry and tile layout code), the run's stitched Grad-CAM overlay of it, and a zoom of both.

    python scripts/tiling_figure.py --run-artifacts mlruns/artifacts/<run>/artifacts \\
        --image ../shared/data/aitex_fabric/defect/019_fuzzyball/0022_019_02.png \\
        --overlay mlruns/artifacts/<run>/artifacts/gradcam/images/folder/019_fuzzyball/\\
0022_019_02_p0.98.png --zoom 2450 2950 --out docs/images/aitex_tiles_stitched_map.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from omegaconf import OmegaConf
from PIL import Image

from defect_detection.data.geometry import axis_starts, build_geometry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-artifacts", type=Path, required=True,
                   help="a tiles run's artifact folder (its config.yaml)")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--overlay", type=Path, required=True, help="the run's Grad-CAM overlay of --image")
    p.add_argument("--zoom", type=int, nargs=2, default=None, metavar=("X0", "X1"),
                   help="columns of the original image to show enlarged")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    cfg = OmegaConf.load(args.run_artifacts / "config.yaml")
    geometry = build_geometry(OmegaConf.to_container(cfg.input, resolve=True), cfg.data.image_size)
    image = np.asarray(Image.open(args.image).convert("RGB"))
    ph, pw = geometry.prepared_hw(image.shape[:2])
    th, tw = geometry.tile_hw
    prepared = np.asarray(Image.fromarray(image).resize((pw, ph), Image.BILINEAR))
    overlay = np.asarray(Image.open(args.overlay).convert("RGB").resize((pw, ph), Image.BILINEAR))
    ys, xs = axis_starts(ph, th, geometry.overlap), axis_starts(pw, tw, geometry.overlap)
    rows = 3 if args.zoom else 2
    fig = Figure(figsize=(14, 1.3 * rows + 0.9 + (1.6 if args.zoom else 0)))
    axes = fig.subplots(rows, 1, gridspec_kw={"height_ratios": [1, 1] + ([2.2] if args.zoom else [])})
    axes[0].imshow(prepared)
    colours = ["#ffcc00", "#00c8ff"]
    for i, (y, x) in enumerate((y, x) for y in ys for x in xs):
        axes[0].add_patch(Rectangle((x + 0.5, y + 0.5), tw - 1, th - 1, fill=False, lw=1.6,
                                    ec=colours[i % 2], ls="-" if i % 2 == 0 else "--"))
    axes[0].set_title(f"input=tiles: {args.image.name} ({image.shape[1]} x {image.shape[0]}) at scale "
                      f"{geometry.scale:g} -> {pw} x {ph}, {len(ys) * len(xs)} tiles of {tw} x {th}, "
                      f"overlap {geometry.overlap}, the last one flush with the edge", fontsize=9)
    axes[1].imshow(overlay)
    axes[1].set_title("the tiles' Grad-CAM maps stitched back onto the whole image (from the run's "
                      f"gradcam/ artifacts: {args.overlay.name})", fontsize=9)
    if args.zoom:
        x0, x1 = (round(v * pw / image.shape[1]) for v in args.zoom)
        axes[2].imshow(np.concatenate([prepared[:, x0:x1], np.full((ph, 4, 3), 255, np.uint8),
                                       overlay[:, x0:x1]], axis=1))
        axes[2].set_title(f"columns {args.zoom[0]}-{args.zoom[1]} of the original, enlarged: image | map",
                          fontsize=9)
        for ax in axes[:2]:
            ax.add_patch(Rectangle((x0, 0), x1 - x0, ph - 1, fill=False, lw=1.2, ec="white"))
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    main()
