"""What the prediction log costs: scoring with and without it, for defect-predict and the served model.

    python scripts/prediction_log_benchmark.py --out docs/results/prediction_log_overhead.md

One model (trained here on synthetic parts, or --model) scores the same images --repeats times in
each mode, alternating: no log; the log's observer during scoring (image statistics and content
hash of every part, what defect-predict does); and after scoring the rows written in one batch
and the small maps of flagged and borderline parts. The served model (pyfunc, base64 requests of
--request images) is timed the same way, with the log on and off. Medians of the repeats.
"""

from __future__ import annotations

import argparse
import base64
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def parts(folder: Path, n: int, size: int, seed: int = 0) -> list[str]:
    from defect_detection.data.synthetic import DEFECT_TYPES, synthetic_part

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        kind = str(rng.choice(DEFECT_TYPES)) if rng.random() < 0.1 else "good"
        path = folder / f"{i:04d}.png"
        Image.fromarray(synthetic_part("disc", kind, rng, size)).save(path)
        out.append(str(path))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=224, help="side of the synthetic photos")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--request", type=int, default=16, help="images per served request")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from defect_detection import fit
    from defect_detection.data.synthetic import generate_synthetic
    from defect_detection.models.loading import load_predictor
    from defect_detection.monitoring.prediction_log import ModelInfo, PredictionLog
    from defect_detection.monitoring.recorder import Recorder
    from defect_detection.pipeline.predict import score

    command = " ".join(
        [
            "python",
            "scripts/prediction_log_benchmark.py",
            *map(shlex.quote, sys.argv[1:] if argv is None else argv),
        ]
    )
    work = Path(tempfile.mkdtemp(prefix="plog-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlruns' / 'mlflow.db'}"
    line = generate_synthetic(
        work / "line", categories=("disc",), n_train_good=40, n_test_good=12, n_per_defect=8,
        image_size=args.size,  # photos as large as the stream's
    )
    model = fit(
        "data=mvtec",
        f"data.root={line}",
        "data.categories=[disc]",
        "trainer.max_epochs=3",
        "explain=none",
        "callbacks.progress_bar=null",
        f"paths.root_dir={work}",
    )
    predictor = load_predictor(model.model_uri)
    images = parts(work / "stream", args.images, args.size)
    info = ModelInfo(model.model_uri, run_id=model.run_id)
    times: dict[str, list[float]] = {
        k: [] for k in ("off", "observed", "inside", "write", "maps", "per_map")
    }
    for r in range(args.repeats):
        plog = PredictionLog(f"sqlite:///{work / f'log{r}.db'}", batch_size=10_000)
        recorder = Recorder(plog, info, "predict")
        # the two modes alternate which goes first, so that a drift of the machine's speed (other
        # jobs, caches) does not load one mode only
        for mode in ("off", "observed") if r % 2 == 0 else ("observed", "off"):
            predictor.observer = None
            if mode == "observed":
                recorder.attach(predictor)
            t0 = time.perf_counter()
            result = score(predictor, images, progress=False)
            times[mode].append(time.perf_counter() - t0)
            if mode == "observed":
                table = result
        times["inside"].append(recorder.seconds)  # the observer's own time, summed over its calls
        predictor.observer = None
        t0 = time.perf_counter()
        rows = recorder.record(images, table)
        plog.record(rows)
        plog.flush()
        times["write"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        made, wanted = recorder.add_maps(predictor, images, rows, times["observed"][-1])
        times["maps"].append(time.perf_counter() - t0)
        # what one map costs, without a budget (on at most 20 of the parts that want one)
        want = [row for row in rows if row["decision"] == "defect" or row["borderline"]]
        sample = [dict(row, map_png=None) for row in want[:20]]
        unbounded = Recorder(plog, info, "predict", map_budget=float("inf"))
        t0 = time.perf_counter()
        n_maps, _ = unbounded.add_maps(predictor, images, sample, times["observed"][-1])
        times["per_map"].append((time.perf_counter() - t0) / max(1, n_maps))
    med = {k: statistics.median(v) for k, v in times.items()}
    # the served model: requests of base64 images, the log on and off
    import mlflow

    payload = pd.DataFrame(
        {"image_b64": [base64.b64encode(Path(p).read_bytes()).decode() for p in images[: args.request]]}
    )
    models = {}
    for mode in ("off", "on"):
        config = {"prediction_log": {"enabled": mode == "on", "url": f"sqlite:///{work / 'served.db'}"}}
        models[mode] = mlflow.pyfunc.load_model(model.model_uri, model_config=config)
        models[mode].predict(payload)  # warm-up
    runs: dict[str, list[float]] = {"off": [], "on": []}
    for r in range(args.repeats):  # alternating which goes first, as above
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            t0 = time.perf_counter()
            models[mode].predict(payload)
            runs[mode].append(time.perf_counter() - t0)
    served = {mode: statistics.median(v) for mode, v in runs.items()}
    n = args.images
    overhead = med["observed"] / med["off"] - 1
    logged = med["off"] + med["inside"] + med["write"] + med["maps"]
    total = logged / med["off"] - 1
    per_part = med["off"] / n
    text = [
        "# What the prediction log costs",
        "",
        f"Command: `{command}`",
        "",
        f"{n} synthetic photos of {args.size} px, the default classifier (Lite0, square 224), "
        f"{args.repeats} repeats, "
        f"medians; {wanted} of them flagged or borderline (wanting a map), {made} maps drawn within the "
        f"default time budget (prediction_log.map_budget={recorder.map_budget:g} of the scoring pass); "
        f"the review page draws the others when shown. CPU: {os.cpu_count()} cores.",
        "",
        "| defect-predict | seconds | ms per image | vs scoring without the log |",
        "|---|---|---|---|",
        f"| scoring, no log | {med['off']:.2f} | {1000 * med['off'] / n:.1f} | - |",
        f"| scoring with the log's observer (image statistics, content hash) | {med['observed']:.2f} | "
        f"{1000 * med['observed'] / n:.1f} | {overhead:+.1%} |",
        f"| of which inside the observer (its own clock) | {med['inside']:.2f} | "
        f"{1000 * med['inside'] / n:.1f} | {med['inside'] / med['off']:+.1%} |",
        f"| after scoring: the rows written (one batch) | {med['write']:.2f} | "
        f"{1000 * med['write'] / n:.1f} | {med['write'] / med['off']:+.1%} |",
        "| after scoring: small maps of flagged and borderline parts, within the budget | "
        f"{med['maps']:.2f} | "
        f"{1000 * med['maps'] / n:.1f} | {med['maps'] / med['off']:+.1%} |",
        f"| **scoring + all of the log (observer's own time, rows, maps)** | {logged:.2f} | "
        f"{1000 * logged / n:.1f} | "
        f"**{total:+.1%}** |",
        "",
        f"One map without a budget costs {1000 * med['per_map']:.0f} ms ({med['per_map'] / per_part:.1f} x "
        "scoring one part): a Grad-CAM backward pass.",
        "",
        f"| served model, a request of {args.request} base64 images | seconds | vs the log off |",
        "|---|---|---|",
        f"| log off | {served['off']:.3f} | - |",
        f"| log on (rows, maps within the budget, images kept for review) | {served['on']:.3f} | "
        f"{served['on'] / served['off'] - 1:+.1%} |",
    ]
    out = "\n".join(text) + "\n"
    print(out)
    if args.out:
        args.out.write_text(out)


if __name__ == "__main__":
    main()
