#!/usr/bin/env python
"""Judge a change on every development line at once: recipes x lines x split seeds, one table per
line and a summary over lines (the mean and the worst line), everything in MLflow.

    python scripts/line_bench.py --recipes default auto --seeds 0 1 2 3 4 \
        --out docs/results/line_bench_before.md
    python scripts/line_bench.py --lines bottle bsdata --recipes default "lr1e3:optimizer=adamw_1e3"

Lines: the three real development sets under ../shared/data (MVTec bottle; AITEX fabric; BSData
pitting, split by part position with split.make.groups) and synthetic lines that mimic the real
lines the auto recipe did badly on (see SYNTHETIC). A recipe is `default`, `auto` (experiment=auto
with a 10-minute budget), an experiment overlay name, or 'LABEL:OVERRIDES'.

A bench is hours long, so each finished (line, recipe, seed) run is written at once to the JSON
beside --out; started again with the same --out, the bench skips the cells it finished with the
same overrides and reruns the others (failed, interrupted, or with changed overrides), under the
same MLflow parent run. --fresh starts over.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_recipes as cr  # noqa: E402  (the shared machinery: one run, its row, its parent)
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from defect_detection import project_root  # noqa: E402

EXPERIMENT = "line-bench"
RECIPES = {"default": [], "auto": ["experiment=auto", "auto.budget_minutes=10"],
           # the native patch head alone: auto's patchhead-native candidate, sized from each line's photos
           "native": ["experiment=auto", "auto.only=[patchhead-native]"]}


def _synthetic(name: str, category: str, **records) -> list[str]:
    values = {k: f"[{','.join(v)}]" if isinstance(v, list) else v for k, v in records.items()}
    return ["data=synthetic", f"data.root=${{paths.data_dir}}/lines/{name}", f"data.categories=[{category}]",
            *[f"data.records.{k}={v}" for k, v in values.items()]]


# Synthetic lines, each mimicking an unseen real line where the auto recipe did badly, at the
# synthetic working size (128 px) with the real line's image-to-working-size ratios, small enough
# for under a minute per default run on 2 cores. Defects are drawn at half contrast (faint) so the
# default recipe is off its ceiling: calibrated once on split seeds 0-1 of the default recipe
# (test AUROC 0.862-0.997; at full contrast four of these five lines scored 1.000 on seed 0).
SYNTHETIC = {
    # (a) 500 x 1240-1273 photos (height varies by a few px), 32 labelled train defects, thin cracks
    "portrait_jitter": ("portrait 160 x 400-406 px (height jitter), faint thin cracks only, 54 defects",
                        _synthetic("portrait_jitter", "plate", image_size=160, height=400, height_jitter=6,
                                   defect_types=["crack"], defect_scale=0.5, defect_contrast=0.5,
                                   n_per_defect=54, n_train_good=100, n_test_good=20)),
    # (b) 1024 x 1024 grey parts, small defects, 71 train defects
    "large_grey_small": ("grey 512 x 512 parts, small faint defects (scale 0.3), 120 defects",
                         _synthetic("large_grey_small", "disc", image_size=512, grey=True, defect_scale=0.3,
                                    defect_contrast=0.5, n_per_defect=40, n_train_good=100, n_test_good=20)),
    # (c) 640 x 640 grey scans, defects a few pixels across, 240 train defects
    "grey_tiny_many": ("grey 320 x 320 scans, faint defects a few px across (scale 0.15), 180 defects",
                       _synthetic("grey_tiny_many", "plate", image_size=320, grey=True, defect_scale=0.15,
                                  defect_contrast=0.5, n_per_defect=60, n_train_good=100, n_test_good=20)),
    # (d) 1024 px colour parts with masks (here on a quarter of the defect images)
    "masks_on_few": ("colour 512 x 512 parts, faint defects (scale 0.3), masks on 15 of 60 defect images",
                     _synthetic("masks_on_few", "disc", image_size=512, defect_scale=0.3, defect_contrast=0.5,
                                mask_fraction=0.25, n_per_defect=20, n_train_good=100, n_test_good=20)),
    # (e) a small line: 100 photos, 15 good / 5 defect on val
    "small": ("100 photos of 128 px (76 good, 24 faint defects): 15 good / 5 defect on val",
              _synthetic("small", "mesh", image_size=128, defect_types=["scratch", "spot"], defect_scale=0.6,
                         defect_contrast=0.7, n_per_defect=12, n_train_good=60, n_test_good=16)),
}
REAL = {
    "bottle": ("MVTec AD bottle, 900 x 900", lambda shared: [
        "data=mvtec", f"data.root={shared / 'mvtec'}", "data.categories=[bottle]"]),
    "aitex": ("AITEX fabric, 4096 x 256 grey", lambda shared: [
        "data=folder", f"data.root={shared / 'aitex_fabric'}", "data.category=aitex"]),
    "bsdata": ("BSData pitting, 1130 x 460, split by part position (groups.csv)", lambda shared: [
        "data=folder", f"data.root={shared / 'bsdata_pitting'}", "data.category=bsdata",
        "split.make.groups.csv=groups.csv", "split.make.groups.column=part_position"]),
}
LINES = [*REAL, *SYNTHETIC]
# (column, row key, worst of a list of values)
METRICS = [("test AUROC", "test/auroc", min), ("recall at val threshold", "test/recall", min),
           ("test FP rate", "test/fp_rate", max)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["default", "auto"],
                   help=f"{', '.join(RECIPES)}, an experiment overlay name, or 'LABEL:OVERRIDE OVERRIDE...'")
    p.add_argument("--lines", nargs="+", default=LINES, choices=LINES, metavar="LINE",
                   help=f"default: all ({', '.join(LINES)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="split seeds")
    p.add_argument("--shared-data", default=str(project_root().parent / "shared" / "data"),
                   help="folder holding mvtec/, aitex_fabric/ and bsdata_pitting/")
    p.add_argument("--out", default=str(project_root() / "outputs" / "line_bench.md"),
                   help="the markdown; its finished runs are kept beside it in <out>.json")
    p.add_argument("--experiment-name", default=EXPERIMENT)
    p.add_argument("--fresh", action="store_true", help="ignore the finished runs in <out>.json")
    p.add_argument("--merge", nargs="+", default=[], metavar="STATE",
                   help="also show the runs of these other benches' <out>.json (e.g. the default recipe's, "
                   "to pair a new recipe with it on the same splits); they are not rerun")
    p.add_argument("--report", action="store_true", help="write the tables from the saved runs; run nothing")
    p.add_argument("--select", nargs="+", default=[], metavar="RECIPE",
                   help="--report: also a row per (line, seed) for the auto recipe's choice among these "
                   "recipes' runs, in this order (its val-only rule, auto.tie_se=1): what auto would have "
                   "picked had they been its only candidates")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    return p.parse_args(argv)


def recipe_overrides(recipe: str) -> list[str]:
    name = cr.recipe_label(recipe)
    return list(RECIPES[name]) if name in RECIPES and ":" not in recipe else cr.recipe_overrides(recipe)


def line_overrides(line: str, shared: Path) -> list[str]:
    return REAL[line][1](shared) if line in REAL else list(SYNTHETIC[line][1])


def line_description(line: str) -> str:
    return (REAL.get(line) or SYNTHETIC[line])[0]


def cell_overrides(args: argparse.Namespace, line: str, recipe: str) -> list[str]:
    """What defines a cell's result (bar its seed): a finished cell is reused only when these match."""
    return line_overrides(line, Path(args.shared_data)) + recipe_overrides(recipe) + list(args.overrides)


def state_path(out: str | Path) -> Path:
    return Path(out).with_suffix(".json")


def load_state(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"rows": [], "starts": []}


def save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)  # a kill mid-write leaves the previous file whole


def finished(args: argparse.Namespace, state: dict, seed: int, line: str, recipe: str) -> bool:
    """Whether the cell has an ok row run with the overrides it has now."""
    key = (line, cr.recipe_label(recipe), seed, cell_overrides(args, line, recipe))
    return any((r["line"], r["recipe"], r["seed"], r["overrides"]) == key and r["status"] == "ok"
               for r in state["rows"])


def _num(value: float, spec: str = ".3f") -> str:
    return "-" if value != value else format(value, spec)


def line_stats(rows: list[dict], line: str, recipe: str) -> dict:
    """Mean and worst seed of each metric, mean seconds, and runs ok / all, for one table row."""
    mine = [r for r in rows if r["line"] == line and r["recipe"] == recipe]
    ok = [r for r in mine if r["status"] == "ok"]
    out = {"runs": f"{len(ok)}/{len(mine)}", "n_ok": len(ok)}
    for _, key, worst in METRICS:
        values = [r[key] for r in ok if r.get(key) == r.get(key)]
        out[key] = (statistics.fmean(values), worst(values)) if values else (float("nan"), float("nan"))
    out["seconds"] = statistics.fmean(r["seconds"] for r in ok) if ok else float("nan")
    return out


def summary(rows: list[dict], lines: list[str], recipe: str) -> dict:
    """Over the lines with finished runs: the mean of the line means, and the worst line's mean
    (named) for each metric; seconds per run averaged over lines."""
    stats = {line: line_stats(rows, line, recipe) for line in lines}
    done = {line: s for line, s in stats.items() if s["n_ok"]}
    out = {"lines": f"{len(done)}/{len(lines)}"}
    for _, key, worst in METRICS:
        means = {line: s[key][0] for line, s in done.items() if s[key][0] == s[key][0]}
        if means:
            worst_line = worst(means, key=means.get)
            out[key] = (statistics.fmean(means.values()), means[worst_line], worst_line)
        else:
            out[key] = (float("nan"), float("nan"), "-")
    secs = [s["seconds"] for s in done.values()]
    out["seconds"] = statistics.fmean(secs) if secs else float("nan")
    return out


def selection_label(recipes: list[str]) -> str:
    return "auto-rule(" + "|".join(recipes) + ")"


def val_counts(client: MlflowClient, run_id: str) -> tuple[int, int]:
    """(good, defect) of a run's val split, from its logged val scores."""
    import pandas as pd

    labels = pd.read_csv(client.download_artifacts(run_id, "scores/val_scores.csv"))["label"]
    return int((labels == 0).sum()), int((labels != 0).sum())


def selected_rows(rows: list[dict], recipes: list[str], counts, tie_se: float = 1.0) -> list[dict]:
    """Per (line, seed) where every recipe finished: the run that the auto recipe's rule picks on
    val alone (auto/runner.py's rank: the first in `recipes` order within `tie_se` SE of the best
    val AUROC), relabelled as one more recipe. `counts(run_id)` gives the val (good, defect)."""
    from defect_detection.auto.candidates import Candidate
    from defect_detection.auto.runner import Outcome, rank

    ok = {(r["line"], r["recipe"], r["seed"]): r for r in rows if r["status"] == "ok"}
    out = []
    for line, seed in sorted({(k[0], k[2]) for k in ok}):
        runs = [ok.get((line, recipe, seed)) for recipe in recipes]
        if any(r is None for r in runs):
            continue
        outcomes = [Outcome(Candidate(r["recipe"], [], ""), "finished", r["seconds"],
                            result={"val": {k: v for k, v in r.items() if k.startswith("val/")}})
                    for r in runs]
        good, defect = counts(runs[0]["run_id"])
        best = rank(outcomes, good, defect, tie_se)[0]
        chosen = runs[outcomes.index(best)]
        out.append({**chosen, "recipe": selection_label(recipes), "winner": chosen["recipe"],
                    "seconds": sum(r["seconds"] for r in runs)})
    return out


def paired(rows: list[dict], lines: list[str], recipes: list[str]) -> list[str]:
    """Each later recipe against the first on the same (line, split seed): the mean difference
    of test AUROC and recall over the seeds both finished, and on how many seeds it was ahead."""
    if len(recipes) < 2:
        return []
    ok = {(r["line"], r["recipe"], r["seed"]): r for r in rows if r["status"] == "ok"}
    base = recipes[0]
    out = ["", f"## Paired with {base} (same line, same split seed)", "",
           "| recipe | line | seeds | test AUROC diff mean | worst seed | recall diff mean "
           "| AUROC ahead / behind |",
           "|---|---|---|---|---|---|---|"]
    for recipe in recipes[1:]:
        for line in lines:
            seeds = sorted(k[2] for k in ok if k[0] == line and k[1] == recipe and (line, base, k[2]) in ok)
            if not seeds:
                continue
            d_auc = [ok[(line, recipe, s)]["test/auroc"] - ok[(line, base, s)]["test/auroc"] for s in seeds]
            d_rec = [ok[(line, recipe, s)]["test/recall"] - ok[(line, base, s)]["test/recall"] for s in seeds]
            ahead, behind = sum(d > 1e-6 for d in d_auc), sum(d < -1e-6 for d in d_auc)
            out.append(f"| {recipe} | {line} | {len(seeds)} | {statistics.fmean(d_auc):+.3f} | "
                       f"{min(d_auc):+.3f} | {statistics.fmean(d_rec):+.3f} | {ahead} / {behind} |")
    return out


def markdown(args: argparse.Namespace, state: dict, command: str) -> str:
    recipes = [cr.recipe_label(r) for r in args.recipes]
    if getattr(args, "select", None):
        recipes.append(selection_label(args.select))
    rows = [r for r in state["rows"] if r["line"] in args.lines and r["recipe"] in recipes]
    defined = "; ".join(f"{cr.recipe_label(r)} = {' '.join(recipe_overrides(r)) or 'the defaults'}"
                        for r in args.recipes)
    if getattr(args, "select", None):
        defined += (f"; {selection_label(args.select)} = the run of {', '.join(args.select)} that the auto "
                    "recipe's val-only rule picks (auto.tie_se=1, first in that order within noise), not a "
                    "run of its own (its seconds: both runs)")
    hours = sum(r["seconds"] for r in rows) / 3600
    earlier = [s["command"] for s in state.get("starts", [])[:-1]]
    out = [f"# Line bench: {', '.join(recipes)} on {len(args.lines)} lines", "",
           f"Command: `{command}`", "",
           *([f"Earlier starts, whose finished runs with the same overrides were kept: "
              f"{'; '.join(f'`{c}`' for c in earlier)}.", ""] if earlier else []),
           f"Recipes: {defined}. Split seeds {args.seeds}; stratified train/val/test 60/20/20 (BSData by "
           "part position); threshold chosen on val by each recipe's policy; every number on test. "
           "Recall is at the val-chosen threshold; FP rate = test FP / test good. Mean and worst over "
           f"seeds per line; the summary averages the line means and names the worst line. {len(rows)} "
           f"runs, {hours:.1f} h of run time ({datetime.now():%Y-%m-%d %H:%M}; MLflow experiment "
           f"`{args.experiment_name}`, parent run {state.get('parent_run_id', '-')}).", "",
           "## Summary over lines", "",
           "| recipe | lines | " + " | ".join(f"{c} mean | {c} worst line" for c, _, _ in METRICS)
           + " | s per run |", "|---" * (3 + 2 * len(METRICS)) + "|"]
    for recipe in recipes:
        s = summary(rows, args.lines, recipe)
        cells = []
        for _, key, _ in METRICS:
            mean, worst, line = s[key]
            cells += [_num(mean), f"{_num(worst)} ({line})"]
        out.append(f"| {recipe} | {s['lines']} | " + " | ".join(cells) + f" | {_num(s['seconds'], '.0f')} |")
    out += paired(rows, args.lines, recipes)
    for line in args.lines:
        out += ["", f"## {line}: {line_description(line)}", "",
                "| recipe | runs ok | " + " | ".join(f"{c} mean | {c} worst" for c, _, _ in METRICS)
                + " | s per run |", "|---" * (3 + 2 * len(METRICS)) + "|"]
        for recipe in recipes:
            st = line_stats(rows, line, recipe)
            cells = [_num(v) for _, key, _ in METRICS for v in st[key]] + [_num(st["seconds"], ".0f")]
            out.append(f"| {recipe} | {st['runs']} | " + " | ".join(cells) + " |")
    out += ["", "## Every run", "",
            "| line | recipe | seed | test AUROC | recall | FP / good | threshold | s | MLflow run | note |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (args.lines.index(r["line"]), recipes.index(r["recipe"]), r["seed"])):
        if r["status"] == "ok":
            out.append(f"| {r['line']} | {r['recipe']} | {r['seed']} | {r['test/auroc']:.4f} | "
                       f"{r['test/recall']:.3f} | {r['test/fp']:.0f} / {r['test/fp'] + r['test/tn']:.0f} | "
                       f"{r['threshold']:.4f} | {r['seconds']:.0f} | {r['run_id']} | "
                       f"{'winner: ' + r['winner'] if r.get('winner') else ''} |")
        else:
            out.append(f"| {r['line']} | {r['recipe']} | {r['seed']} | - | - | - | - | {r['seconds']:.0f} | "
                       f"- | {r['status']}: {r['error'][:200].replace('|', '/')} |")
    return "\n".join(out) + "\n"


def log_to_parent(client: MlflowClient, parent: str, args: argparse.Namespace, state: dict,
                  text: str) -> None:
    """The markdown and, per recipe, the summary and per-line numbers as the parent's metrics."""
    client.log_text(parent, text, "line_bench.md")
    rows = [r for r in state["rows"] if r["line"] in args.lines]
    metrics = {}
    for recipe in map(cr.recipe_label, args.recipes):
        s = summary(rows, args.lines, recipe)
        for _, key, _ in METRICS:
            name = f"summary/{recipe}/{key.split('/')[1]}"
            metrics[f"{name}_mean"], metrics[f"{name}_worst_line"] = s[key][:2]
        for line in args.lines:
            st = line_stats(rows, line, recipe)
            for _, key, _ in METRICS:
                name = key.split("/")[1]
                metrics[f"{line}/{recipe}/{name}_mean"], metrics[f"{line}/{recipe}/{name}_worst"] = st[key]
    for key, value in metrics.items():
        if value == value:
            client.log_metric(parent, key, value)


def run_cell(args, line: str, recipe: str, seed: int, client, parent: str, out_dir: Path, stamp: str) -> dict:
    """One (line, recipe, seed) run as a row: its numbers, or its failure in one line."""
    label = cr.recipe_label(recipe)
    name = f"{line}-{label}-seed{seed}"
    overrides = (line_overrides(line, Path(args.shared_data)) + recipe_overrides(recipe)
                 + cr.bench_overrides(seed, args.experiment_name, name, out_dir / name)
                 + list(args.overrides))
    row = {"line": line, "recipe": label, "seed": seed, "overrides": cell_overrides(args, line, recipe),
           "started": datetime.now().isoformat(timespec="seconds")}
    t0 = time.perf_counter()
    try:
        numbers, _ = cr.run_recipe(overrides, client, parent, {"bench": stamp, "line": line, "recipe": label,
                                                               "split_seed": str(seed)})
    except Exception as err:  # noqa: BLE001  (one failing cell must not end an hours-long bench)
        logging.exception("%s failed", name)
        return {**row, "status": "failed", "seconds": time.perf_counter() - t0,
                "error": f"{type(err).__name__}: {' '.join(str(err).split())}"}
    good = numbers.get("test/fp", 0) + numbers.get("test/tn", 0)
    numbers["test/fp_rate"] = numbers["test/fp"] / good if good else float("nan")
    return {**row, "status": "ok", **numbers}


def open_parent(args, state: dict, command: str, stamp: str) -> tuple[MlflowClient, str, Path]:
    """The bench's parent run: the one in `state` when it is still in the store (a resumed bench
    keeps every run under one parent), else a new one."""
    client, exp_id, root = cr.open_store(args.experiment_name, list(args.overrides))
    earlier = state.get("parent_run_id")
    if earlier:
        try:
            client.update_run(earlier, status="RUNNING")
            client.set_tag(earlier, f"resumed-{stamp}", command)
            return client, earlier, root
        except MlflowException:
            logging.warning("parent run %s of %s is not in the store: a new parent run", earlier, args.out)
    tags = {"command": command, "role": "line-bench"}
    return client, client.create_run(exp_id, run_name=f"line-bench-{stamp}", tags=tags).info.run_id, root


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/line_bench.py", *(argv or sys.argv[1:])])
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path = state_path(args.out)
    state = {"rows": [], "starts": []} if args.fresh else load_state(path)
    if args.report:  # the tables again, with the merged benches' runs; the runs' commands listed
        missing = [m for m in args.merge if not Path(m).is_file()]
        if missing:
            raise SystemExit(f"error: --merge {' '.join(missing)}: no such bench state (a <out>.json); give "
                             "Hydra overrides before --merge")
        merged = [load_state(Path(m)) for m in args.merge]
        starts = [*state.get("starts", []), *(st for m in merged for st in m.get("starts", []))]
        rows = state["rows"] + [r for m in merged for r in m["rows"]]
        if args.select:
            client = cr.open_store(args.experiment_name, list(args.overrides))[0]
            rows += selected_rows(rows, args.select, lambda run_id: val_counts(client, run_id))
        shown = {**state, "rows": rows, "starts": [*starts, {"command": command}]}
        print(write(args, shown, command))
        return shown
    client, parent, root = open_parent(args, state, command, stamp)
    state["parent_run_id"] = parent
    state["starts"].append({"at": stamp, "command": command})
    out_dir = root / "outputs" / "line_bench" / stamp
    cells = [(seed, line, recipe) for seed in args.seeds for line in args.lines for recipe in args.recipes]
    complete = False
    try:  # seed-major: a partial bench already covers every line and pairs recipes on the same split
        for n, (seed, line, recipe) in enumerate(cells, 1):
            if finished(args, state, seed, line, recipe):
                logging.info("[%d/%d] %s %s seed %d: finished earlier, skipped", n, len(cells), line,
                             recipe, seed)
                continue
            row = run_cell(args, line, recipe, seed, client, parent, out_dir, stamp)
            key = (line, row["recipe"], seed)
            state["rows"] = [r for r in state["rows"] if (r["line"], r["recipe"], r["seed"]) != key] + [row]
            save_state(path, state)
            text = write(args, state, command)
            log_to_parent(client, parent, args, state, text)
            logging.info("[%d/%d] %s %s seed %d: %s (%.0f s)", n, len(cells), line, recipe, seed,
                         f"test auroc {row['test/auroc']:.4f} recall {row['test/recall']:.3f} fp rate "
                         f"{row['test/fp_rate']:.3f}" if row["status"] == "ok" else row["error"][:200],
                         row["seconds"])
        complete = all(finished(args, state, *cell) for cell in cells)
    finally:
        save_state(path, state)
        text = write(args, state, command)
        log_to_parent(client, parent, args, state, text)
        client.set_terminated(parent, "FINISHED" if complete else "FAILED")
        print(text)
        print(f"Wrote {args.out} and {path}")
    return state


def write(args: argparse.Namespace, state: dict, command: str) -> str:
    text = markdown(args, state, command)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


if __name__ == "__main__":
    main()
