#!/usr/bin/env python
"""Our PatchCore next to anomalib's on the development lines: same split, same pixels, same Lite0
features; test image AUROC, fit time, scoring time and bank size of each, one markdown table.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=src python scripts/patchcore_reference.py \\
        --anomalib-python ../anomalib-venv/bin/python --work outputs/patchcore_reference \\
        --ours "before:net.zero_pad=false" --ours after --anomalib-lines grey_tiny_many aitex \\
        --out docs/results/patchcore_reference.md paths.root_dir=...   # where the bench made its lines

(the page's own command is at its top). Synthetic lines are read from paths.root_dir's data/lines
(made by scripts/line_bench.py); the real ones from --shared-data.

anomalib is never a dependency of this project: it lives in a venv of its own and this script
drives it as a subprocess (`--anomalib-python`; without it only our side runs). That venv was made
so that it uses the project venv's torch/torchvision/timm (no second, CUDA-sized torch download):

    python3 -m venv anomalib-venv
    anomalib-venv/bin/pip install anomalib==2.7.0 --no-deps
    echo <project>/.venv/lib/python3.11/site-packages \\
        > anomalib-venv/lib/python3.11/site-packages/zz_project_torch.pth   # after its own packages
    anomalib-venv/bin/pip install "jsonargparse[signatures]>=4.27.7,<4.47.0" lightning kornia \\
        opencv-python-headless tifffile scikit-image einops FrEIA          # what its import needs

What runs, per line and split seed:
1. prepare (project venv): the line's config (scripts/line_bench.py's overrides, detector=patchcore,
   input=square, data.image_size=224), its stratified split and the data module's prepared,
   normalised 3 x 224 x 224 tensors of the train goods and of every test image, saved once under
   --work (with the split as CSV). Both implementations read these tensors: identical pixels.
2. ours: the PatchCore module that defect-train builds (build_module: PatchCoreNet with our
   FeatureExtractor, strides from detector.strides), fed the train goods in split order through
   training_step, then build_bank; test scored by net.image_scores. Variants: --ours LABEL:OVERRIDES.
3. anomalib: anomalib.models.image.patchcore.torch_model.PatchcoreModel (its 3 x 3 AvgPool2d,
   bilinear upsampling and concatenation of the layers, KCenterGreedy coreset with its sparse
   random projection, nearest-neighbour scoring with its re-weighting over num_neighbors=9),
   its feature_extractor replaced by our FeatureExtractor (the same Lite0 weights, strides 8/16,
   eval mode); fitted without its Engine (forward in train mode fills its embedding store, then
   subsample_embedding(0.1)); test pred_score from forward in eval mode. Its pre-processor
   (resize 256 / crop 224, ImageNet normalisation) and post-processor (min-max normalisation of
   scores, monotone: no AUROC change) are not used: the inputs are step 1's tensors.
Fit seconds = embedding the train goods + building the bank; score ms/image = test scored in
batches of --batch, over the test images. Torch runs on one thread in both (set here and in the
subprocess); the machine may be shared, so the timings are noted with the load average.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def auroc(scores, labels) -> float:
    from defect_detection.evaluation.metrics import auroc_of

    return auroc_of(scores, labels)


def batches(x, size: int):
    for start in range(0, len(x), size):
        yield x[start:start + size]


# -- 1. prepare (project venv) ----------------------------------------------------------------------
def line_config(line: str, seed: int, shared: Path, extra: list[str], work: Path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import line_bench
    from hydra import compose, initialize_config_dir

    from defect_detection.config import CONFIG_DIR

    overrides = [*line_bench.line_overrides(line, shared), "detector=patchcore", "input=square",
                 "data.image_size=224", f"seed={seed}", "logger=none", "data.cache=memory",
                 "data.num_workers=0", f"paths.output_dir={work / 'hydra'}", *extra]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides), overrides


def prepare(line: str, seed: int, args) -> Path:
    import torch

    from defect_detection.pipeline.builders import build_datamodule

    path = args.work / f"{line}-seed{seed}.pt"
    if path.is_file():
        return path
    cfg, overrides = line_config(line, seed, Path(args.shared_data), args.overrides, args.work)
    dm = build_datamodule(cfg)
    dm.setup()
    tensors = {}
    for stage in ("train", "test"):
        ds = dm.datasets[stage]
        xs, ys = [], []
        for i in range(len(ds)):
            x, y = ds[i][0], int(ds[i][1])
            if stage == "train" and y != 0:
                continue  # PatchCore learns from good parts only (ours ignores train defects too)
            xs.append(x)
            ys.append(y)
        tensors[stage] = (torch.stack(xs), torch.tensor(ys))
    with (args.work / f"{line}-seed{seed}-split.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stage", "path", "label"])
        for stage in ("train", "val", "test"):
            w.writerows([stage, r.path, r.label] for r in dm.records(stage))
    torch.save({"train_x": tensors["train"][0], "test_x": tensors["test"][0], "test_y": tensors["test"][1],
                "overrides": overrides, "backbone": cfg.backbone.name,
                "strides": list(cfg.detector.strides)}, path)
    return path


# -- 2. ours (project venv) ---------------------------------------------------------------------------
def run_ours(data_path: Path, line: str, seed: int, extra: list[str], args) -> dict:
    import torch

    from defect_detection.data.datamodule import Batch
    from defect_detection.pipeline.builders import build_module

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d = torch.load(data_path)
    # `net.NAME=VALUE` sets an attribute of PatchCoreNet that is no config key (net.zero_pad=false:
    # the neighbourhood average over the inside neighbours only, what this family did first)
    attrs = {k[4:]: v for k, _, v in (o.partition("=") for o in extra if o.startswith("net."))}
    extra = [o for o in extra if not o.startswith("net.")]
    cfg, _ = line_config(line, seed, Path(args.shared_data), [*args.overrides, *extra], args.work)
    module = build_module(cfg, (len(d["train_x"]), 0))
    for name, value in attrs.items():
        old = getattr(module.net, name)
        setattr(module.net, name, type(old)(value.lower() in ("1", "true")) if isinstance(old, bool)
                else type(old)(value))
    module.train()
    began = time.perf_counter()
    for i, x in enumerate(batches(d["train_x"], args.batch)):
        n = len(x)
        module.training_step(Batch(x, torch.zeros(n, dtype=torch.long), torch.arange(n)), i)
    module.build_bank()
    fit_s = time.perf_counter() - began
    module.eval()
    began = time.perf_counter()
    with torch.no_grad():
        scores = torch.cat([module.net.image_scores(x) for x in batches(d["test_x"], args.batch)])
    score_s = time.perf_counter() - began
    return {"scores": scores.tolist(), "fit_s": fit_s, "score_ms": 1000 * score_s / len(d["test_x"]),
            "bank": int(module.net.bank.shape[0])}


# -- 3. anomalib (its own venv; this function runs there) ---------------------------------------------
def run_anomalib(data_path: Path, out: Path, ratio: float, neighbors: int, threads: int, batch: int) -> None:
    import torch
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    from torch import nn

    from defect_detection.models.features import FeatureExtractor

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    d = torch.load(data_path)

    class Ours(nn.Module):
        """Our frozen Lite0 extractor under anomalib's layer names (always eval, no grad)."""

        def __init__(self, names: list[str]) -> None:
            super().__init__()
            self.names = names
            self.body = FeatureExtractor(d["backbone"], d["strides"], pretrained=True, download=False)

        def forward(self, x):
            self.body.eval()
            with torch.no_grad():
                return dict(zip(self.names, self.body(x)))

    names = ["layer2", "layer3"][:len(d["strides"])]  # placeholders: anomalib only needs them as keys
    model = PatchcoreModel(layers=names, backbone="resnet18", pre_trained=False, num_neighbors=neighbors)
    model.feature_extractor = Ours(names)
    model.train()
    began = time.perf_counter()
    with torch.no_grad():
        for x in batches(d["train_x"], batch):
            model(x)
        model.subsample_embedding(ratio)
    fit_s = time.perf_counter() - began
    model.eval()
    began = time.perf_counter()
    with torch.no_grad():
        scores = torch.cat([model(x).pred_score.flatten() for x in batches(d["test_x"], batch)])
    score_s = time.perf_counter() - began
    import anomalib

    out.write_text(json.dumps({"scores": scores.tolist(), "fit_s": fit_s,
                               "score_ms": 1000 * score_s / len(d["test_x"]),
                               "bank": int(model.memory_bank.shape[0]), "version": anomalib.__version__}))


def anomalib_subprocess(data_path: Path, line: str, seed: int, args) -> dict:
    """anomalib's result for a line: run in its venv, or read back from --work when an earlier run
    of this script left it with the same settings (its fit alone takes minutes per line)."""
    out = args.work / f"{line}-seed{seed}-anomalib.json"
    settings = {"ratio": args.anomalib_ratio, "neighbors": args.anomalib_neighbors, "threads": args.threads,
                "batch": args.batch}
    if out.is_file() and not args.rerun_anomalib:
        done = json.loads(out.read_text())
        if done.get("settings") == settings and out.stat().st_mtime > data_path.stat().st_mtime:
            return {**done, "reused": True}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1",
           # anomalib's KCenterGreedy allocates a pool-sized temporary (tens of MB) per selected
           # point, between small allocations that it keeps: under glibc's default (dynamic) mmap
           # threshold these land on the heap and fragment it, and its fit grew past 20 GB and was
           # killed on a 23k-patch pool. A fixed 1 MB threshold puts them on mmap (freed at once):
           # ~1.5 GB, at the price of page faults that its fit seconds include.
           "MALLOC_MMAP_THRESHOLD_": "1048576"}
    cmd = [args.anomalib_python, str(Path(__file__).resolve()), "anomalib", str(data_path), str(out),
           "--ratio", str(args.anomalib_ratio), "--neighbors", str(args.anomalib_neighbors),
           "--threads", str(args.threads), "--batch", str(args.batch)]
    with (args.work / f"{line}-seed{seed}-anomalib.log").open("w") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    done = {**json.loads(out.read_text()), "settings": settings}
    out.write_text(json.dumps(done))
    return done


# -- the table ----------------------------------------------------------------------------------------
def load_avg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def write_table(args, rows: list[dict], labels: list[str]) -> None:
    f = lambda v, p: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    def table(head: list[str], body: list[list[str]]) -> str:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(out + ["| " + " | ".join(c) + " |" for c in body])

    quality, speed = [], []
    for r in rows:
        a = r.get("anomalib") or {}
        mark = " (reused)" if a.get("reused") else ""
        quality.append([r["line"], str(r["seed"]), str(r["train_goods"]),
                        f"{r['test']} ({r['test_defects']})",
                        *[f(r["ours"][lb]["auroc"], 3) for lb in labels], f(a.get("auroc"), 3) + mark,
                        *[str(r["ours"][lb]["bank"]) for lb in labels], str(a.get("bank", "-"))])
        speed.append([r["line"], str(r["seed"]), *[f(r["ours"][lb]["fit_s"], 1) for lb in labels],
                      f(a.get("fit_s"), 1), *[f(r["ours"][lb]["score_ms"], 1) for lb in labels],
                      f(a.get("score_ms"), 1), r["load"]])
    both = [r for r in rows if r.get("anomalib")]
    mean = lambda rs, key: f(sum(map(key, rs)) / len(rs), 3) if rs else "-"  # noqa: E731
    for name, rs in ((f"mean, the {len(both)} lines with anomalib", both),
                     (f"mean, all {len(rows)} lines", rows)):
        ours = [mean(rs, lambda r, lb=lb: r["ours"][lb]["auroc"]) for lb in labels]
        theirs = mean(rs, lambda r: r["anomalib"]["auroc"]) if rs is both else "-"
        quality.append([name, "", "", "", *ours, theirs, *[""] * (len(labels) + 1)])
    q_head = ["line", "seed", "train goods", "test (defects)", *[f"AUROC ours {lb}" for lb in labels],
              "AUROC anomalib", *[f"bank ours {lb}" for lb in labels], "bank anomalib"]
    s_head = ["line", "seed", *[f"fit s ours {lb}" for lb in labels], "fit s anomalib",
              *[f"ms/img ours {lb}" for lb in labels], "ms/img anomalib", "load avg (1/5/15 min)"]
    variants = "\n".join(f"- ours `{lb}`: `{args.ours_spec[lb]}`" if args.ours_spec[lb] else
                         f"- ours `{lb}`: the defaults (conf/detector/patchcore.yaml)" for lb in labels)
    version = next((r["anomalib"].get("version") for r in both), "(not run)")
    text = f"""# PatchCore: ours next to anomalib {version}

Command: `{args.command}`

Same split (the project's stratified split at each seed; BSData by part position), same prepared
and normalised 224 x 224 square inputs, same frozen Lite0 features (our FeatureExtractor, strides
8 and 16) in both; test image AUROC over every test image. anomalib = its PatchcoreModel (torch
model, no Engine): coreset ratio {args.anomalib_ratio}, num_neighbors {args.anomalib_neighbors}; the random
projection of its coreset selection is not seeded, so its AUROC moves from run to run on the small
test sets.
"(reused)": anomalib's result read back from an earlier run of this script with the same settings.

{variants}

{table(q_head, quality)}

Fit = embedding the train goods + building the bank, in seconds; ms/img = scoring the test images
in batches of {args.batch}. Torch on {args.threads} thread(s) for both, on a machine shared with other
jobs (load average after each line in the last column), so the timings are rough. anomalib's fit runs
with glibc's mmap threshold fixed at 1 MB (its coreset selection fragmented the heap past 20 GB
otherwise): its fit seconds include the page faults that costs.

{table(s_head, speed)}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


def parse_args(argv=None):
    sys.path.insert(0, str(ROOT / "scripts"))
    import line_bench

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", nargs="+", default=line_bench.LINES, choices=line_bench.LINES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--shared-data", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--work", type=Path, default=ROOT / "outputs" / "patchcore_reference")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "patchcore_reference.md")
    p.add_argument("--anomalib-python", default=None, help="python of a venv with anomalib (else ours only)")
    p.add_argument("--anomalib-lines", nargs="+", default=None,
                   help="run anomalib on these lines only (default: every line); its coreset selection "
                        "costs minutes per line on a CPU")
    p.add_argument("--anomalib-ratio", type=float, default=0.1)
    p.add_argument("--anomalib-neighbors", type=int, default=9)
    p.add_argument("--ours", action="append", default=None,
                   help="LABEL or 'LABEL:OVERRIDES' (Hydra overrides of our PatchCore), one column each; "
                        "repeat for more (default: one column, `default`)")
    p.add_argument("--rerun-anomalib", action="store_true",
                   help="run anomalib again even where --work holds its result with the same settings")
    p.add_argument("--table-from", default=None, help="only write --out from this JSON of an earlier run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every line (e.g. paths.root_dir=...)")
    args = p.parse_args(argv)
    args.ours_spec = {}
    for spec in args.ours or ["default"]:
        label, _, rest = spec.partition(":")
        args.ours_spec[label] = rest
    args.command = shlex.join(["python", "scripts/patchcore_reference.py", *(argv or sys.argv[1:])])
    return args


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "anomalib":  # the part that runs in anomalib's venv
        p = argparse.ArgumentParser()
        p.add_argument("cmd")
        p.add_argument("data", type=Path)
        p.add_argument("out", type=Path)
        p.add_argument("--ratio", type=float, default=0.1)
        p.add_argument("--neighbors", type=int, default=9)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--batch", type=int, default=32)
        a = p.parse_args(argv)
        run_anomalib(a.data, a.out, a.ratio, a.neighbors, a.threads, a.batch)
        return
    args = parse_args(argv)
    if args.table_from:  # the table again from a finished run's JSON (same --ours labels)
        state = json.loads(Path(args.table_from).read_text())
        args.command = f"{state['command']}`, then this table from its JSON: `{args.command}"
        write_table(args, state["rows"], list(args.ours_spec))
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    args.work.mkdir(parents=True, exist_ok=True)
    state_path = args.out.with_suffix(".json")
    rows: list[dict] = []
    for line in args.lines:
        for seed in args.seeds:
            import torch

            data_path = prepare(line, seed, args)
            d = torch.load(data_path)
            y = d["test_y"].tolist()
            row = {"line": line, "seed": seed, "train_goods": len(d["train_x"]), "test": len(y),
                   "test_defects": sum(y), "ours": {}}
            for label, rest in args.ours_spec.items():
                r = run_ours(data_path, line, seed, shlex.split(rest), args)
                r["auroc"] = auroc(r.pop("scores"), y)
                row["ours"][label] = r
                print(line, seed, label, {k: round(v, 4) for k, v in r.items()}, flush=True)
            if args.anomalib_python and (args.anomalib_lines is None or line in args.anomalib_lines):
                a = anomalib_subprocess(data_path, line, seed, args)
                a["auroc"] = auroc(a.pop("scores"), y)
                row["anomalib"] = a
                print(line, seed, "anomalib", a, flush=True)
            row["load"] = load_avg()
            rows.append(row)
            state_path.parent.mkdir(parents=True, exist_ok=True)
            state_path.write_text(json.dumps({"command": args.command, "rows": rows}, indent=1))
            write_table(args, rows, list(args.ours_spec))


if __name__ == "__main__":
    main()
