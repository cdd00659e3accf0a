"""A practice operator: answers the review queue of a practice stream with the truth in its file names.

    python examples/practice_review.py                every card of the queue, as `defect-review` shows it
    python examples/practice_review.py --limit 40 --reviewer practice

On a real line an operator answers the queue on the page `defect-review` serves (good / defect with
a type / unsure, by button or key). Parts written by `examples/practice_line.py --stream` carry their
true kind in the file name (00017_spot.png), so this script can play the operator: it takes the
same queue (flagged parts, then the borderline band, then the random audit sample of passed parts)
and records the same verdicts in the same prediction log, so `defect-review export=...` and the
escape-rate estimate work exactly as after a real review. The log is the one the commands use:
SQLite beside the MLflow store (MLFLOW_TRACKING_URI, else this checkout's mlruns/), or `--log URL`.
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from pathlib import Path

from defect_detection import project_root
from defect_detection.monitoring.prediction_log import PredictionLog, default_url
from defect_detection.monitoring.review import escape_estimate, review_queue


def main(argv: list[str] | None = None) -> Counter:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=200, help="cards to answer (the page shows 200)")
    parser.add_argument("--reviewer", default="practice operator", help="recorded with each verdict")
    parser.add_argument("--log", help="the prediction log's URL (default: beside the MLflow store)")
    args = parser.parse_args(argv)
    store = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"
    plog = PredictionLog(args.log or default_url(store, project_root() / "mlruns"))
    answered: Counter = Counter()
    for item in review_queue(plog, limit=args.limit):
        stem = Path(item.prediction.image_path or "").stem
        kind = stem.split("_", 1)[1] if "_" in stem else None
        if kind is None:  # not a practice part: an operator would have to look at it
            verdict, kind = "unsure", None
        elif kind == "good":
            verdict, kind = "good", None
        else:
            verdict = "defect"
        plog.add_verdict(item.prediction.id, verdict, args.reviewer, item.queue, kind)
        answered[f"{item.queue}: {verdict}"] += 1
    print(
        f"answered {sum(answered.values())} card(s): "
        + (", ".join(f"{k} {v}" for k, v in sorted(answered.items())) or "the queue is empty")
    )
    print(escape_estimate(plog).describe())
    plog.close()
    return answered


if __name__ == "__main__":
    main()
