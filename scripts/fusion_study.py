#!/usr/bin/env python
"""Would a val-chosen score fusion have changed the auto recipe's outcome? Measured on finished
auto runs of the line bench, from the scores their candidates logged.

    python scripts/fusion_study.py --bench-state outputs/line_bench.json --store sqlite:///mlruns/mlflow.db \
        --out outputs/fusion_study.md

For every auto run in the bench state (recipe `auto`), its candidates are read back from MLflow.
Where a supervised candidate (the winner when it is one, else the first supervised that finished)
and a PatchCore candidate both finished, their val and test scores (`scores/<split>_scores.csv`)
are fused by auto/fusion.py: each standardised by its val goods, the weight chosen on val alone
with auto's own rule (singles first; a mix must beat them by more than `--tie-se` standard errors
of val AUROC). The fusion then joins auto's ranking as the last candidate, so it is chosen only
where val shows it ahead of every candidate by more than that allowance. Test numbers are read
for the table only; nothing is chosen on them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import pandas as pd
from mlflow import MlflowClient

from defect_detection.auto.fusion import aligned, choose_fusion
from defect_detection.auto.runner import auroc_se
from defect_detection.data.summary import markdown_table
from defect_detection.evaluation.metrics import auroc_of
from defect_detection.evaluation.scores import download_scores


def candidates_of(client: MlflowClient, winner_id: str) -> tuple[str, list]:
    """(the auto parent's id, its finished candidate runs in the order they ran)."""
    winner = client.get_run(winner_id)
    parent = winner.data.tags["mlflow.parentRunId"]
    runs = client.search_runs([winner.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'",
                              order_by=["attributes.start_time ASC"])
    return parent, [r for r in runs if r.info.status == "FINISHED" and r.data.tags.get("auto_candidate")]


def study_row(client: MlflowClient, uri: str, row: dict, tie_se: float) -> dict | None:
    parent, runs = candidates_of(client, row["run_id"])
    label = {r.info.run_id: r.data.tags["auto_candidate"] for r in runs}
    good_only = [r for r in runs if label[r.info.run_id].startswith("patchcore")]
    supervised = [r for r in runs if not label[r.info.run_id].startswith("patchcore")]
    if not good_only or not supervised:
        return None
    sup = next((r for r in supervised if r.info.run_id == row["run_id"]), supervised[0])
    pc = good_only[0]
    val, test = (aligned(*(download_scores(uri, r.info.run_id, split) for r in (sup, pc)))
                 for split in ("val", "test"))
    n_good, n_defect = int((val.label == 0).sum()), int((val.label == 1).sum())
    singles = {label[r.info.run_id]: float(r.data.metrics.get("val/auroc", float("nan"))) for r in runs}
    best_single = max(v for v in singles.values() if v == v)
    allowance = tie_se * auroc_se(best_single, n_good, n_defect)
    fusion = choose_fusion(val, allowance)
    fused_val = fusion.val_auroc[fusion.weight]
    fused_test = auroc_of(fusion(test.a.to_numpy(), test.b.to_numpy()), test.label.to_numpy())
    # the fusion as auto's last candidate: chosen only when ahead of every candidate by the allowance
    picked = fusion.weight not in (0.0, 1.0) and fused_val > best_single + allowance
    winner_test = float(row["test/auroc"])
    return {
        "line": row["line"], "seed": row["seed"], "auto winner": row.get("winner", ""),
        "fused": f"{label[sup.info.run_id]} + {label[pc.info.run_id]}",
        "weight (val)": fusion.weight, "val AUROC fused": round(fused_val, 4),
        "val AUROC best candidate": round(best_single, 4), "allowance": round(allowance, 4),
        "test AUROC supervised": round(auroc_of(test.a, test.label), 4),
        "test AUROC PatchCore": round(auroc_of(test.b, test.label), 4),
        "test AUROC fused": round(fused_test, 4), "auto winner test AUROC": round(winner_test, 4),
        "fusion chosen": picked,
        "auto + fusion test AUROC": round(fused_test if picked else winner_test, 4),
        "auto parent": parent,
    }


def summary(rows: list[dict]) -> list[dict]:
    by_line: dict[str, list[dict]] = {}
    for r in rows:
        by_line.setdefault(r["line"], []).append(r)
    def mean(rs: list[dict], key: str) -> float:
        return round(statistics.mean(r[key] for r in rs), 4)

    return [{"line": line, "seeds": len(rs), "auto test AUROC mean": mean(rs, "auto winner test AUROC"),
             "auto + fusion test AUROC mean": mean(rs, "auto + fusion test AUROC"),
             "fused alone (val weight) mean": mean(rs, "test AUROC fused"),
             "fusion chosen": sum(r["fusion chosen"] for r in rs)} for line, rs in by_line.items()]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench-state", required=True, type=Path, help="a line bench's <out>.json")
    p.add_argument("--store", required=True, help="its MLflow tracking URI")
    p.add_argument("--tie-se", type=float, default=1.0, help="auto.tie_se (default 1)")
    p.add_argument("--out", type=Path, default=None, help="markdown (default: print)")
    args = p.parse_args(argv)
    client = MlflowClient(args.store)
    state = json.loads(args.bench_state.read_text())
    rows, skipped = [], []
    for row in state["rows"]:
        if row.get("recipe") != "auto" or row.get("status") != "ok":
            continue
        found = study_row(client, args.store, row, args.tie_se)
        (rows.append(found) if found else skipped.append(f"{row['line']} seed {row['seed']}"))
    text = [
        "# A val-chosen fusion of a supervised and a PatchCore score, on the line bench's auto runs", "",
        f"Command: `python scripts/fusion_study.py --bench-state {args.bench_state.name} --store <store> "
        f"--tie-se {args.tie_se:g}`", "",
        "## Per line", "", markdown_table(pd.DataFrame(summary(rows))) if rows else "(none)", "",
        "## Per auto run", "", markdown_table(pd.DataFrame(rows)) if rows else "(none)", "",
        f"Auto runs without both a finished supervised and a finished PatchCore candidate: "
        f"{', '.join(skipped) or 'none'}.", "",
    ]
    if args.out:
        args.out.write_text("\n".join(text))
        print(f"Wrote {args.out}")
    else:
        print("\n".join(text))


if __name__ == "__main__":
    main()
