#!/usr/bin/env python
"""Re-apply the auto recipe's selection rule to finished auto runs, without training: which
candidate each rule would have chosen, and that candidate's test numbers.

    python scripts/auto_reselect.py PARENT_OR_CANDIDATE_RUN_ID ... [--tie-se 0 1 2]

Reads each parent run's auto/candidates.json (order, status, time) and auto/profile.json (the val
counts), and the candidates' own val and test metrics; applies runner.rank as defect-train would
with auto.tie_se set to each value. Test numbers are read only to report what was chosen.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
from mlflow import MlflowClient  # noqa: E402

from defect_detection import project_root  # noqa: E402
from defect_detection.auto.candidates import Candidate  # noqa: E402
from defect_detection.auto.runner import Outcome, auroc_se, rank  # noqa: E402


def outcomes(client: MlflowClient, parent: str) -> tuple[list[Outcome], dict]:
    table = json.loads(Path(client.download_artifacts(parent, "auto/candidates.json")).read_text())
    profile = json.loads(Path(client.download_artifacts(parent, "auto/profile.json")).read_text())
    out = []
    for row in sorted((dict(zip(table["columns"], r)) for r in table["data"]), key=lambda r: r["order"]):
        c = Candidate(row["candidate"], row["overrides"].split(), row["why"])
        result = {}
        if row["status"] == "finished":
            m = client.get_run(row["run_id"]).data.metrics
            result = {"run_id": row["run_id"], "val": {k: v for k, v in m.items() if k.startswith("val/")},
                      "test": {k: v for k, v in m.items() if k.startswith("test/")}}
        out.append(Outcome(c, row["status"], 60 * float(row["minutes"] or 0), None, result))
    return out, profile["counts"]["val"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="auto parent run ids (or a candidate's: its parent is used)")
    p.add_argument("--tie-se", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--out", type=Path, default=None, help="also write the table (markdown) here")
    p.add_argument("--tracking-uri", default=f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}")
    args = p.parse_args()
    client = MlflowClient(args.tracking_uri)
    chosen: dict[float, list[float]] = {t: [] for t in args.tie_se}
    lines: list[str] = []
    emit = lines.append
    heads = [f"tie_se={t:g}: winner (val / test AUROC, test recall, FP)" for t in args.tie_se]
    emit("| parent | val good / defect | SE at best val AUROC | " + " | ".join(heads) + " |")
    emit("|---" * (3 + len(args.tie_se)) + "|")
    for run in args.runs:
        tags = client.get_run(run).data.tags
        parent = run if tags.get("auto") == "parent" else tags["mlflow.parentRunId"]
        outs, val = outcomes(client, parent)
        best = max(o.val("val/auroc") for o in outs if o.status == "finished")
        cells = []
        for t in args.tie_se:
            w = rank(outs, val["good"], val["defect"], t)[0]
            chosen[t].append(w.result["test"]["test/auroc"])
            test = w.result["test"]
            cells.append(f"{w.candidate.label} ({w.val('val/auroc'):.3f} / {test['test/auroc']:.3f}, "
                         f"{test.get('test/recall', float('nan')):.3f}, {int(test.get('test/fp', -1))})")
        emit(f"| {parent[:8]} | {val['good']} / {val['defect']} | "
              f"{auroc_se(best, val['good'], val['defect']):.3f} | " + " | ".join(cells) + " |")
    for t, v in chosen.items():
        emit(f"\ntie_se={t:g}: chosen test AUROC mean {statistics.mean(v):.4f}, worst {min(v):.4f} "
              f"over {len(v)} runs")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.out:
        command = shlex.join(["python", "scripts/auto_reselect.py", *sys.argv[1:]])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"Command: `{command}`\n\n{text}")


if __name__ == "__main__":
    main()
