#!/usr/bin/env python
"""Where a finished run's maps point on its masked test defects (pointing game, pixel AUROC).

    python scripts/map_pointing.py --store /path/mlruns --runs <run_id> <run_id> ... --out maps.md

For runs trained without maps (the line bench's `explain=none`): each run's best checkpoint and
its `scores/test_scores.csv` (the test split it reported on) are read back from MLflow, every test
defect photo with a mask file (`data=folder` layout: masks/<type>/<stem>_mask.png) is mapped at
its own resolution with `Inspector.predict(maps=True)` (Grad-CAM for the classifier, its own map
for PatchCore, the segmenter and the patch head), and the map is scored against the mask with
explain/localisation.py, the functions the runs' own reports use.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from mlflow import MlflowClient
from PIL import Image

from defect_detection.api import Inspector
from defect_detection.explain.localisation import localisation_scores


def mask_of(path: Path) -> Path | None:
    """masks/<type>/<stem>_mask.png beside a data=folder line's defect/<type>/<file>."""
    root = path.parents[2]
    candidate = root / "masks" / path.parent.name / f"{path.stem}_mask.png"
    return candidate if candidate.is_file() else None


def run_maps(client: MlflowClient, run_id: str, limit: int | None) -> dict:
    run = client.get_run(run_id)
    folder = Path(client.download_artifacts(run_id, "checkpoints"))
    ckpt = sorted(folder.glob("best-*.ckpt")) or sorted(folder.glob("*.ckpt"))
    scores = pd.read_csv(client.download_artifacts(run_id, "scores/test_scores.csv"))
    defects = [(Path(p), m) for p in scores.loc[scores.label != 0, "path"] if (m := mask_of(Path(p)))]
    defects = defects[:limit] if limit else defects
    inspector = Inspector.load(ckpt[0])
    table = inspector.predict([str(p) for p, _ in defects], maps=True)
    cams, masks = [], []
    for (_, m), cam in zip(defects, table["map"]):
        cams.append(torch.as_tensor(np.asarray(cam, dtype=np.float32)))
        masks.append(torch.as_tensor(np.asarray(Image.open(m).convert("L")) > 0))
    scores_, _ = localisation_scores(cams, masks)
    return {"run": run_id, "name": run.data.tags.get("mlflow.runName", ""),
            "family": run.data.params.get("detector.name", "classifier"), "maps": len(cams),
            "pointing_game": scores_.pointing_game, "pixel_auroc": scores_.pixel_auroc,
            "test_auroc": run.data.metrics.get("test/auroc", float("nan"))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="MLflow tracking URI of the runs (sqlite:///.../mlflow.db)")
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--limit", type=int, default=None, help="at most this many masked defects per run")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (markdown)")
    args = p.parse_args(argv)
    client = MlflowClient(args.store)
    rows = [run_maps(client, r, args.limit) for r in args.runs]
    lines = ["| run | name | family | test AUROC | masked test defects | pointing game | pixel AUROC |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['name']} | {r['family']} | {r['test_auroc']:.3f} | {r['maps']} | "
              f"{r['pointing_game']:.3f} | {r['pixel_auroc']:.3f} |" for r in rows]
    if len(rows) > 1:
        lines.append(f"| mean |  |  |  |  | {statistics.fmean(r['pointing_game'] for r in rows):.3f} |  |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
