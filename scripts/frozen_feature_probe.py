#!/usr/bin/env python
"""Quick probes of detectors on frozen ImageNet features, on the project's own split seeds.

Why: a family or recipe costs hours to build and measure in the framework; this answers "could
it reach the target at all?" in minutes, because every image's stride-8/16 feature maps are
computed once (whole image at `--scale`, cached under .cache/probe/) and every probe below only
reads them. It scores val and test of the same stratified splits as `defect-train` (seed =
split seed) and prints val and test AUROC per seed, mean and worst.

    python scripts/frozen_feature_probe.py --data folder --data-root ../shared/data/aitex_fabric \\
        --probe patchcore --scale 0.5 --margin 1
    python scripts/frozen_feature_probe.py ... --probe mil --topk 32 --heads 3

Probes:
- patchcore: nearest distance of each patch to a bank of train-good patches (a random subset of
  `--bank` rows, which ranks like the greedy coreset at a fraction of the cost); image score =
  the largest distance, `--margin` patches at the border ignored (padding artefacts).
- mil: a 1x1-conv patch head (hidden 64) on the standardised frozen features, trained with image
  labels only: image score = mean of the `--topk` largest patch logits, class-weighted BCE, AdamW,
  `--epochs`; `--heads` heads from different seeds averaged (their spread is large on small sets).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from defect_detection import project_root
from defect_detection.config import CONFIG_DIR
from defect_detection.data.records import read_folder, read_mvtec
from defect_detection.data.splits import stratified_split
from defect_detection.models.families.patchcore import nearest_distances
from defect_detection.models.features import FeatureExtractor


def auroc(scores, labels) -> float:
    from defect_detection.evaluation.metrics import auroc_of

    return auroc_of(scores, labels)


def records(args):
    if args.data == "folder":
        return read_folder(args.data_root, "folder")
    return read_mvtec(args.data_root, args.categories)


def features(args, recs) -> dict[str, torch.Tensor]:
    """path -> D x h x w: stride-8 and (upsampled) stride-16 maps, 3x3-averaged, concatenated."""
    what = f"{args.backbone}|{args.scale}|{sorted(r.path for r in recs)}"
    key = hashlib.sha1(what.encode()).hexdigest()[:16]
    cache = project_root() / ".cache" / "probe" / f"{key}.pt"
    if cache.is_file():
        return torch.load(cache)
    net = FeatureExtractor(args.backbone, (8, 16)).eval()
    bb = OmegaConf.load(Path(CONFIG_DIR) / "backbone" / f"{args.backbone}.yaml")
    mean, std = torch.tensor(list(bb.mean))[:, None, None], torch.tensor(list(bb.std))[:, None, None]
    out = {}
    for r in recs:
        im = Image.open(r.path).convert("RGB")
        im = im.resize((round(im.width * args.scale), round(im.height * args.scale)), Image.BILINEAR)
        x = (torch.from_numpy(np.array(im)).permute(2, 0, 1).float()[None] / 255 - mean) / std
        with torch.inference_mode():
            maps = [F.avg_pool2d(m, 3, 1, 1, count_include_pad=False) for m in net(x)]
        size = maps[0].shape[-2:]
        out[r.path] = torch.cat([maps[0], F.interpolate(maps[1], size=size, mode="bilinear")], 1)[0].half()
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def trim(m: torch.Tensor, margin: int) -> torch.Tensor:
    return m[..., margin:m.shape[-2] - margin, margin:m.shape[-1] - margin] if margin else m


def patchcore_scorer(args, emb, train):
    goods = torch.cat([emb[r.path].float().flatten(1).T for r in train if r.label == 0])
    pick = torch.randperm(len(goods), generator=torch.Generator().manual_seed(0))[:args.bank]
    bank = goods[pick]

    def score(r) -> float:
        e = emb[r.path].float()
        d = nearest_distances(e.flatten(1).T, bank).view(e.shape[1:])
        return float(trim(d, args.margin).max())
    return score


def mil_scorer(args, emb, train, seed: int):
    xs = [emb[r.path].float() for r in train]
    y = torch.tensor([float(r.label) for r in train])
    flat = torch.cat([x.flatten(1) for x in xs], 1)
    mu, sd = flat.mean(1)[:, None, None], flat.std(1)[:, None, None] + 1e-3
    xs = [(x - mu) / sd for x in xs]
    heads = []
    for h in range(args.heads):
        torch.manual_seed(seed + 17 * h)
        head = torch.nn.Sequential(torch.nn.Conv2d(len(mu), 64, 1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(64, 1, 1))
        opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-2)
        pos_weight = (y == 0).sum() / (y == 1).sum().clamp_min(1)
        for _ in range(args.epochs):
            for batch in torch.randperm(len(xs)).split(8):
                s = torch.stack([image_logit(head, xs[i], args) for i in batch])
                loss = F.binary_cross_entropy_with_logits(s, y[batch], pos_weight=pos_weight)
                opt.zero_grad()
                loss.backward()
                opt.step()
        heads.append(head.eval())

    def score(r) -> float:
        x = (emb[r.path].float() - mu) / sd
        with torch.no_grad():
            return statistics.fmean(float(image_logit(h, x, args)) for h in heads)
    return score


def image_logit(head, x: torch.Tensor, args) -> torch.Tensor:
    z = trim(head(x[None])[0, 0], args.margin).flatten()
    return z.topk(min(args.topk, len(z))).values.mean()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=["folder", "mvtec"], default="folder")
    p.add_argument("--data-root", required=True)
    p.add_argument("--categories", nargs="+", default=["bottle"])
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--scale", type=float, default=0.5, help="of the native resolution")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--probe", choices=["patchcore", "mil"], default="patchcore")
    p.add_argument("--margin", type=int, default=1, help="border patches ignored")
    p.add_argument("--bank", type=int, default=16384)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    recs = records(args)
    emb = features(args, recs)
    rows = []
    for seed in args.seeds:
        split = stratified_split(recs, 0.2, 0.2, seed=seed)
        score = (patchcore_scorer(args, emb, split.train) if args.probe == "patchcore"
                 else mil_scorer(args, emb, split.train, seed))
        row = {name: auroc([score(r) for r in split[name]], [r.label for r in split[name]])
               for name in ("val", "test")}
        rows.append(row)
        print(f"split seed {seed}: val AUROC {row['val']:.3f}  test AUROC {row['test']:.3f}", flush=True)
    for name in ("val", "test"):
        v = [r[name] for r in rows]
        print(f"{name} AUROC mean {statistics.fmean(v):.3f}, worst {min(v):.3f}")


if __name__ == "__main__":
    main()
