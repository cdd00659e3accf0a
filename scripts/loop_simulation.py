"""A simulated line through the whole loop after deployment: predict -> log -> monitor -> review ->
retrain -> challenge -> guarded promotion.

    python scripts/loop_simulation.py --seeds 0 1 2 --out docs/results/loop_simulation.md
    python scripts/loop_simulation.py --small            # the slow test's size

Per seed: a champion is trained on synthetic parts (scratches, spots, cracks). Parts then stream
through `predict` in batches (each part logged); after `--drift-at` parts the lamp dims by 30 %
and a new defect type appears (a ring-shaped "dent" the champion never saw). `defect-monitor`
runs after every batch on the last `--window` parts; the part count at its first alarm is
recorded. The operator (simulated: the true label) answers the review queue, flagged,
borderline and audit parts, `--review-batches` times after the alarm; the judged parts are
exported (30 % held back), a challenger is trained with them (`data.extra_roots`), compared with
the champion on the same parts, and promoted only through the guard. Recall on the new defect
type (fresh dented parts under the dimmed lamp, at each model's own threshold) is measured
before and after. Everything runs through the package's API, the same functions as the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORY = "disc"


def write_parts(
    folder: Path,
    rng: np.random.Generator,
    n: int,
    defect_share: float,
    drifted: bool,
    size: int,
    new_type_share: float = 0.5,
) -> list[tuple[str, str]]:
    """n parts under `folder` (file names carry the truth); returns (path, true kind)."""
    from defect_detection.data.synthetic import DEFECT_TYPES, synthetic_part

    out = []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if rng.random() < defect_share:
            kind = "dent" if drifted and rng.random() < new_type_share else str(rng.choice(DEFECT_TYPES))
        else:
            kind = "good"
        image = synthetic_part(CATEGORY, kind, rng, size, lighting=0.7 if drifted else 1.0)
        path = folder / f"{i:05d}_{kind}.png"
        Image.fromarray(image).save(path)
        out.append((str(path), kind))
    return out


def recall_on(model_uri: str, parts: list[tuple[str, str]], kind: str) -> float:
    from defect_detection import Inspector

    chosen = [p for p, k in parts if k == kind]
    table = Inspector.load(model_uri).predict(chosen)
    return float((table["decision"] == "defect").mean())


def run_seed(seed: int, work: Path, args) -> dict:
    from defect_detection import fit
    from defect_detection.api import challenge, monitor, predict
    from defect_detection.data.synthetic import generate_synthetic
    from defect_detection.monitoring.prediction_log import PredictionLog
    from defect_detection.monitoring.review import escape_estimate, export_reviewed, review_queue

    root = work / f"seed{seed}"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    common = [
        f"paths.root_dir={root}",
        f"data.image_size={args.size}",
        "explain=none",
        "callbacks.progress_bar=null",
        f"trainer.max_epochs={args.epochs}",
        f"seed={seed}",
    ]
    line = generate_synthetic(
        root / "line",
        categories=(CATEGORY,),
        n_train_good=args.train_goods,
        n_test_good=args.train_goods // 3,
        n_per_defect=args.per_defect,
        image_size=args.size,
        seed=seed,
    )
    data = ["data=mvtec", f"data.root={line}", f"data.categories=[{CATEGORY}]"]
    began = time.perf_counter()
    champion = fit(*data, *common)
    champion_uri = champion.model_uri
    rng = np.random.default_rng(1000 + seed)
    plog = PredictionLog(f"sqlite:///{root / 'mlruns' / 'predictions.db'}")
    streamed, alarm_at, alarm_causes, reviewed = 0, None, [], 0
    batch, answered = 0, 0
    while streamed < args.max_parts:
        drifted = streamed >= args.drift_at
        parts = write_parts(
            root / "stream" / f"b{batch:03d}", rng, args.batch, args.defect_share, drifted, args.size
        )
        predict(
            str(root / "stream" / f"b{batch:03d}"),
            f"model={champion_uri}",
            f"output={root / 'p.csv'}",
            f"paths.root_dir={root}",
        )
        streamed += len(parts)
        batch += 1
        if streamed >= args.window:
            result = monitor(
                f"model={champion_uri}",
                f"window.last={args.window}",
                f"min_parts={args.window}",
                f"defect_share={args.defect_share}",
                f"paths.root_dir={root}",
            )
            if result.alarm and alarm_at is None:
                alarm_at = streamed
                alarm_causes = sorted({c.cause for c in result.alarms})
            if not drifted and result.alarm:
                alarm_causes.append(f"false alarm before the drift at part {streamed}")
        if alarm_at is not None:  # the operator reviews the queue once per batch after the alarm
            truth = {
                p: k
                for b in sorted((root / "stream").iterdir())
                for p, k in ((str(f), f.stem.split("_", 1)[1]) for f in sorted(b.glob("*.png")))
            }
            for item in review_queue(plog, limit=args.review_per_batch):
                kind = truth[item.prediction.image_path]
                plog.add_verdict(
                    item.prediction.id,
                    "good" if kind == "good" else "defect",
                    "simulated operator",
                    item.queue,
                    None if kind == "good" else kind,
                )
                reviewed += 1
            answered += 1
            if answered >= args.review_batches:
                break
    escape = escape_estimate(plog)
    export = root / "reviewed"
    manifest = export_reviewed(plog, export, holdout=0.3, seed=seed)
    challenger = fit(*data, *common, f"data.extra_roots=[{export / 'train'}]")
    fresh = write_parts(
        root / "fresh",
        np.random.default_rng(5000 + seed),
        args.fresh,
        1.0,
        True,
        args.size,
        new_type_share=1.0,
    )
    before, after = recall_on(champion_uri, fresh, "dent"), recall_on(challenger.model_uri, fresh, "dent")
    duel = challenge(
        f"challenger={challenger.model_uri}",
        f"champion={champion_uri}",
        f"holdout={export / 'holdout'}",
        f"paths.root_dir={root}",
        "promote=false",
    )
    table = duel.table.set_index(["set", "metric"])
    return {
        "seed": seed,
        "alarm_at_part": alarm_at,
        "parts_after_drift": None if alarm_at is None else alarm_at - args.drift_at,
        "alarm_causes": alarm_causes,
        "reviewed": reviewed,
        "exported": len(manifest["parts"]),
        "escape": escape.describe(),
        "new_type_recall_before": before,
        "new_type_recall_after": after,
        "all_recall_champion": float(table.loc[("all", "recall"), "champion"]),
        "all_recall_challenger": float(table.loc[("all", "recall"), "challenger"]),
        "all_fp_rate_champion": float(table.loc[("all", "fp_rate"), "champion"]),
        "all_fp_rate_challenger": float(table.loc[("all", "fp_rate"), "challenger"]),
        "minutes": round((time.perf_counter() - began) / 60, 1),
    }


def markdown(rows: list[dict], command: str, args) -> str:
    lines = [
        "# The loop after deployment, on a simulated line",
        "",
        f"Command: `{command}`",
        "",
        f"Synthetic `{CATEGORY}` parts at {args.size} px; champion trained on {args.train_goods} goods and "
        f"{args.per_defect} of each of 3 defect types ({args.epochs} epochs). Parts stream in batches of "
        f"{args.batch} with {args.defect_share:.0%} defects; after part {args.drift_at} the lamp dims by "
        f"30 % and half the defects are a new type (dent). defect-monitor runs after every batch on the last "
        f"{args.window} parts (defect_share set); the simulated operator answers up to "
        f"{args.review_per_batch} queue cards after each of {args.review_batches} batches from the alarm on; "
        f"the export holds back 30 %; recall on the new type is measured on {args.fresh} fresh dented parts "
        "under the dimmed lamp, each model at its own val-chosen threshold.",
        "",
        "| seed | alarm at part | parts after the drift | alarm causes | reviewed | exported | new-type "
        "recall before | after | recall all (champion / challenger) | FP rate all | escape estimate | min |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['alarm_at_part']} | {r['parts_after_drift']} | "
            f"{'; '.join(r['alarm_causes'])} | {r['reviewed']} | {r['exported']} | "
            f"{r['new_type_recall_before']:.2f} | {r['new_type_recall_after']:.2f} | "
            f"{r['all_recall_champion']:.2f} / {r['all_recall_challenger']:.2f} | "
            f"{r['all_fp_rate_champion']:.2f} / {r['all_fp_rate_challenger']:.2f} | {r['escape']} | "
            f"{r['minutes']} |"
        )
    after = [r["parts_after_drift"] for r in rows if r["parts_after_drift"] is not None]
    if rows:
        lines += [
            "",
            f"Mean over {len(rows)} seeds: alarm {statistics.mean(after) if after else float('nan'):.0f} "
            f"parts after the drift ({len(after)} of {len(rows)} seeds alarmed); "
            f"{statistics.mean(r['reviewed'] for r in rows):.0f} parts reviewed; new-type recall "
            f"{statistics.mean(r['new_type_recall_before'] for r in rows):.2f} -> "
            f"{statistics.mean(r['new_type_recall_after'] for r in rows):.2f}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--small", action="store_true", help="the slow test's size")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-goods", type=int, default=60)
    parser.add_argument("--per-defect", type=int, default=12)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--defect-share", type=float, default=0.1)
    parser.add_argument("--drift-at", type=int, default=300)
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--max-parts", type=int, default=900)
    parser.add_argument("--review-per-batch", type=int, default=40)
    parser.add_argument("--review-batches", type=int, default=4)
    parser.add_argument("--fresh", type=int, default=40)
    args = parser.parse_args(argv)
    if args.small:
        args.size, args.epochs, args.train_goods, args.per_defect = 64, 2, 24, 6
        args.batch, args.drift_at, args.window, args.max_parts = 20, 60, 40, 200
        args.review_per_batch, args.review_batches, args.fresh = 20, 2, 10
    command = " ".join(
        ["python", "scripts/loop_simulation.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="loop-"))
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, work, args))
        print(json.dumps(rows[-1]), flush=True)
    text = markdown(rows, command, args)
    print(text)
    if args.out:
        args.out.write_text(text)
    return rows


if __name__ == "__main__":
    main()
