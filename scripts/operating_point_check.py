"""Does the operating point hold? For every finished run of a line bench: the FP-rate bound its
validation split supports at the chosen threshold (the one-sided 95 % Clopper-Pearson bound every
run logs as threshold/fp_rate_upper_bound, shown in report.html), against the FP rate the run then
had on test. A bound that test exceeds more often than about 5 % of the time is no bound.

    python scripts/line_bench.py --recipes default --seeds 0 1 2 --out docs/results/line_bench_default.md
    python scripts/operating_point_check.py docs/results/line_bench_default.json \\
        --out docs/results/operating_point.md

The store is the one the bench wrote to (default: this checkout's mlruns/mlflow.db; --store).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from scipy import stats


def rows_with_bounds(bench: Path, store: str) -> list[dict]:
    from mlflow import MlflowClient

    client = MlflowClient(store)
    out = []
    for row in json.loads(bench.read_text())["rows"]:
        if row.get("status") != "ok":
            continue
        metrics = client.get_run(row["run_id"]).data.metrics
        good = row["test/fp"] + row["test/tn"]
        out.append({"line": row["line"], "recipe": row["recipe"], "seed": row["seed"],
                    "bound": metrics.get("threshold/fp_rate_upper_bound", float("nan")),
                    "fp": int(row["test/fp"]), "good": int(good),
                    "fp_rate": row["test/fp"] / good if good else float("nan")})
    return out


def markdown(rows: list[dict], command: str) -> str:
    lines = ["# Does the operating point hold? Test FP rate against val's FP-rate bound", "",
             f"Command: `{command}`", "",
             "Per run: the one-sided 95 % Clopper-Pearson upper bound of the good-part FP rate that the "
             "validation split supports at the chosen threshold (threshold/fp_rate_upper_bound, in every "
             "run's report.html), and the FP rate the run had on test. `above` marks a run whose test "
             "FP rate exceeded the bound; with a true 95 % bound that happens in at most about 5 % of "
             "runs (fewer: the bound is conservative).", "",
             "| line | recipe | seed | val bound | test FP / good | test FP rate | above |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["line"], r["recipe"], r["seed"])):
        above = "yes" if r["fp_rate"] > r["bound"] else ""
        lines.append(f"| {r['line']} | {r['recipe']} | {r['seed']} | {r['bound']:.3f} | "
                     f"{r['fp']} / {r['good']} | {r['fp_rate']:.3f} | {above} |")
    above = [r for r in rows if r["fp_rate"] > r["bound"]]
    n = len(rows)
    share = len(above) / n if n else float("nan")
    # is the share of runs above the bound compatible with at most 5 %? (one-sided binomial test)
    p = stats.binomtest(len(above), n, 0.05, alternative="greater").pvalue if n else float("nan")
    by_line = {}
    for r in rows:
        by_line.setdefault(r["line"], []).append(r)
    lines += ["", "| line | runs | above the bound | mean val bound | pooled test FP rate |",
              "|---|---|---|---|---|"]
    for line, rs in sorted(by_line.items()):
        fp, good = sum(r["fp"] for r in rs), sum(r["good"] for r in rs)
        pooled = fp / good if good else float("nan")
        lines.append(f"| {line} | {len(rs)} | {sum(r['fp_rate'] > r['bound'] for r in rs)} | "
                     f"{sum(r['bound'] for r in rs) / len(rs):.3f} | {pooled:.3f} |")
    lines += ["", f"**{len(above)} of {n} runs ({share:.0%}) had a test FP rate above their val bound** "
              f"(binomial test against at most 5 %: p = {p:.3g})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bench", type=Path, help="a line bench's <out>.json")
    parser.add_argument("--store", default=None, help="its MLflow tracking URI (default: this checkout's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    store = args.store or f"sqlite:///{Path(__file__).resolve().parents[1] / 'mlruns' / 'mlflow.db'}"
    command = " ".join(["python", "scripts/operating_point_check.py",
                        *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    text = markdown(rows_with_bounds(args.bench, store), command)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
