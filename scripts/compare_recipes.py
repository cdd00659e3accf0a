#!/usr/bin/env python
"""Seed recipe vs the default recipe, honestly: same data, same stratified split seeds, threshold
chosen on val (max_recall_at_fp, k=0), everything reported on test.

    python scripts/compare_recipes.py                      # MVTec bottle, split seeds 0-4
    python scripts/compare_recipes.py --data-root /data/mvtec --categories bottle cable \
        --seeds 0 1 2 --recipes seed_recipe default --out outputs/recipe_comparison.md

A recipe is `default` (the composed defaults of conf/train.yaml), the name of an
`experiment=` overlay (e.g. seed_recipe), or `LABEL:OVERRIDES` (the defaults plus those
overrides). Input geometries on the AITEX fabric scans (folder layout):

    python scripts/compare_recipes.py --data folder --data-root ../shared/data/aitex_fabric \
        --recipes square:input=square \
        "letterbox:input=letterbox data.image_size=[128,2048]" \
        "tiles:input=tiles input.scale=0.5 input.tile_size=[128,512] input.overlap=64"
 Every run trains in this process through
defect_detection.train.train on the real configs and is an MLflow run in the experiment
`recipe-comparison`, nested under one parent run that also holds the markdown table.
Single split seeds are noisy (59 test images on bottle), so the table gives mean ± std and
the worst case over seeds; the per-seed rows follow.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from defect_detection import project_root
from defect_detection.config import CONFIG_DIR
from defect_detection.pipeline.fit import train
from defect_detection.tracking.mlflow_run import ensure_local_store, get_or_create_experiment

EXPERIMENT = "recipe-comparison"
# (column, result key, how the worst case is taken)
COLUMNS = [("test AUROC", "test/auroc", min), ("test recall", "test/recall", min),
           ("test FP", "test/fp", max), ("test FN", "test/fn", max), ("val AUROC", "val/auroc", min),
           ("val margin", "val/margin", min)]
# with --maps: the localisation of each family's own map on the masked test images
MAP_COLUMNS = [("pixel AUROC", "test/cam_pixel_auroc", min), ("pointing game", "test/cam_pointing_game", min)]
# test images decided otherwise than by the first recipe on the same split seed (e.g. bf16 vs fp32)
FLIP_COLUMN = ("test flips vs first recipe", "test/flips", max)


def test_decisions(result: dict) -> dict[str, bool] | None:
    """Path -> rejected, at the run's own threshold (None when the run returned no test scores)."""
    table = (result.get("scores") or {}).get("test")
    if table is None:
        return None
    return dict(zip(table.path, table.p_defect >= result["threshold"]))


def flips(mine: dict[str, bool] | None, first: dict[str, bool] | None) -> float:
    """How many shared test images the two runs decide differently (NaN when either is unknown)."""
    if mine is None or first is None:
        return float("nan")
    return float(sum(mine[p] != first[p] for p in mine.keys() & first.keys()))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(project_root().parent / "shared" / "data" / "mvtec"),
                   help="MVTec-layout root holding <category>/{train,test} (default: ../shared/data/mvtec)")
    p.add_argument("--categories", nargs="+", default=["bottle"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="split seeds")
    p.add_argument("--recipes", nargs="+", default=["seed_recipe", "default"],
                   help="`default`, an experiment overlay name (conf/experiment/<name>.yaml), or "
                        "'LABEL:OVERRIDE OVERRIDE...' (the default recipe with those overrides, e.g. "
                        "'tiles:input=tiles input.scale=0.5')")
    p.add_argument("--data", choices=["mvtec", "folder", "synthetic"], default="mvtec",
                   help="layout of --data-root: mvtec (<category>/train, test) or folder "
                        "(good/, defect/<type>/); synthetic: the generated parts with masks of "
                        "conf/data/synthetic.yaml (--data-root and --categories unused)")
    p.add_argument("--maps", action="store_true",
                   help="also compute each run's maps on test and report their localisation against "
                        "the masks (pixel AUROC, pointing game)")
    p.add_argument("--out", default=str(project_root() / "outputs" / "recipe_comparison.md"))
    p.add_argument("--experiment-name", default=EXPERIMENT)
    p.add_argument("--full-logging", action="store_true",
                   help="also log the pyfunc model, data summary and Grad-CAM (slower; metrics identical)")
    p.add_argument("overrides", nargs="*",
                   help="extra Hydra overrides applied to every run, e.g. data.cache=memory")
    return p.parse_args(argv)


def recipe_overrides(recipe: str) -> list[str]:
    """The overrides a recipe stands for (see --recipes)."""
    if ":" in recipe:
        return shlex.split(recipe.split(":", 1)[1])
    return [] if recipe == "default" else [f"experiment={recipe}"]


def recipe_label(recipe: str) -> str:
    return recipe.split(":", 1)[0]


def run_overrides(args: argparse.Namespace, recipe: str, seed: int, out_dir: Path) -> list[str]:
    cats = ",".join(args.categories)
    data = [f"data={args.data}"] + ([f"data.root={args.data_root}"] if args.data != "synthetic" else [])
    data += [f"data.categories=[{cats}]"] if args.data == "mvtec" else []
    label = recipe_label(recipe)
    return recipe_overrides(recipe) + data + bench_overrides(
        seed, args.experiment_name, f"{label}-seed{seed}", out_dir / f"{label}-seed{seed}",
        full_logging=args.full_logging, maps=args.maps) + list(args.overrides)


def bench_overrides(seed: int, experiment_name: str, run_name: str, output_dir: Path,
                    full_logging: bool = False, maps: bool = False) -> list[str]:
    """What every benchmark run adds: the split seed, where it is tracked and written, a disk
    cache of decoded images shared by the runs, and (unless full_logging) no model, data summary or
    Grad-CAM: the metrics are the same, the runs faster."""
    ov = ["data.cache=disk", f"seed={seed}", f"experiment_name={experiment_name}", f"run_name={run_name}",
          f"paths.output_dir={output_dir}", "callbacks.progress_bar=null"]
    if not full_logging:
        ov += ["log_model=false", "log_data_summary=false"]
        ov += ["explain.n_per_group=1", "explain.max_images=8"] if maps else ["explain=none"]
    return ov


def fmt(values: list[float], worst, digits: int) -> tuple[str, str]:
    values = [v for v in values if v == v]  # NaN: not measured for that run (e.g. the first recipe's flips)
    if not values:
        return "-", "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}", f"{worst(values):.{digits}f}"


def markdown(args: argparse.Namespace, rows: list[dict], command: str, wall_s: float) -> str:
    where = {"mvtec": ", ".join(args.categories), "synthetic": "synthetic parts (conf/data/synthetic.yaml)"
             }.get(args.data, Path(args.data_root).name)
    columns = COLUMNS + [c for c in [*MAP_COLUMNS, FLIP_COLUMN] if any(c[1] in r for r in rows)]
    recipes = "; ".join(f"{recipe_label(r)} = {' '.join(recipe_overrides(r)) or 'the defaults'}"
                        for r in args.recipes)
    lines = [f"# Recipe comparison: {', '.join(map(recipe_label, args.recipes))} on {where}", "",
             f"Recipes: {recipes}.", "",
             f"Command: `{command}`", "",
             f"Split seeds {args.seeds} (each recipe's split: stratified train/val/test 60/20/20 for "
             "seed_recipe and default), threshold chosen on val by each recipe's policy "
             "(max_recall_at_fp, k=0, for both), every number below on test unless it says val. "
             "Val margin: the lowest val defect score minus the highest val good score, in log-odds "
             "(how much room the val-chosen threshold has; AUROC is 1.000 however thin it is). "
             f"Mean ± sample std over seeds; worst = min for AUROC/recall/margin, max for FP/FN. "
             f"Total wall time {wall_s / 60:.1f} min ({datetime.now():%Y-%m-%d %H:%M}).", "",
             "| recipe | " + " | ".join(f"{c} mean ± std | {c} worst" for c, _, _ in columns)
             + " | train+eval s/run |",
             "|---" * (2 + 2 * len(columns)) + "|"]
    for recipe in map(recipe_label, args.recipes):
        mine = [r for r in rows if r["recipe"] == recipe]
        if not mine:
            continue
        cells = []
        for _, key, worst in columns:
            digits = 1 if key in ("test/fp", "test/fn", "test/flips") else 3
            cells += fmt([r.get(key, float("nan")) for r in mine], worst, digits)
        secs = statistics.fmean(r["seconds"] for r in mine)
        lines.append(f"| {recipe} | " + " | ".join(cells) + f" | {secs:.0f} |")
    lines += ["", "Per seed:", "",
              "| recipe | seed | test AUROC | recall | FP | FN | threshold | val AUROC | val margin | epochs "
              "| flips | s | MLflow run |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        flipped = r.get("test/flips", float("nan"))
        lines.append(f"| {r['recipe']} | {r['seed']} | {r['test/auroc']:.4f} | {r['test/recall']:.3f} | "
                     f"{r['test/fp']:.0f} | {r['test/fn']:.0f} | {r['threshold']:.4f} | "
                     f"{r['val/auroc']:.4f} | {r.get('val/margin', float('nan')):.2f} | "
                     f"{r['epochs']} | {'-' if flipped != flipped else f'{flipped:.0f}'} | "
                     f"{r['seconds']:.0f} | {r['run_id']}"
                     + (f" (auto winner: {r['winner']})" if r.get("winner") else "") + " |")
    return "\n".join(lines) + "\n"


def write_table(args: argparse.Namespace, rows: list[dict], command: str, wall_s: float) -> tuple[str, Path]:
    text = markdown(args, rows, command, wall_s)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text, out


def open_store(experiment_name: str, overrides: list[str]) -> tuple[MlflowClient, str, Path]:
    """The store the composed config tracks to (with `overrides`, e.g. another paths.root_dir):
    a client, the experiment's id (created when missing) and the project root runs write under."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):  # where runs are tracked
        probe = compose("train", overrides=["paths.output_dir=.", *overrides])
    uri = probe.logger.tracking_uri
    ensure_local_store(uri)
    client = MlflowClient(uri)
    return client, get_or_create_experiment(client, experiment_name, probe.logger), Path(probe.paths.root_dir)


def run_recipe(overrides: list[str], client: MlflowClient, parent: str, tags: dict) -> tuple[dict, dict]:
    """Compose train with `overrides`, run it (the whole auto recipe when auto.enabled), nest it
    under `parent` with `tags`; returns (its row of numbers, train's result)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    t0 = time.perf_counter()
    if (cfg.get("auto") or {}).get("enabled"):  # experiment=auto: the whole auto run counts
        from defect_detection.auto.entry import run_auto_recipe

        result = run_auto_recipe(cfg, overrides)
    else:
        result = train(cfg)
    seconds = time.perf_counter() - t0
    for key, value in {"mlflow.parentRunId": parent, **tags}.items():  # auto: its parent run nests
        client.set_tag(result.get("auto_parent_run_id", result["run_id"]), key, value)
    extra = {"winner": str(client.get_run(result["run_id"]).info.run_name)} if "candidates" in result else {}
    history = client.get_metric_history(result["run_id"], "val/auroc")
    row = {"seconds": seconds, "run_id": result["run_id"], "threshold": result["threshold"],
           "epochs": len(history) - 1,  # the last val/auroc is the best checkpoint's
           **{k: float(v) for k, v in {**result["val"], **result["test"]}.items()}, **extra}
    logged = client.get_run(result["run_id"]).data.metrics
    row.update({key: logged[key] for _, key, _ in MAP_COLUMNS if key in logged})
    return row, result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/compare_recipes.py", *sys.argv[1:]])
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    client, exp_id, root = open_store(args.experiment_name, args.overrides)
    parent = client.create_run(exp_id, run_name=f"comparison-{stamp}",
                               tags={"command": command, "role": "recipe-comparison"}).info.run_id
    out_dir = root / "outputs" / "recipe_comparison" / stamp

    rows, start = [], time.perf_counter()
    first_decisions: dict[int, dict[str, bool] | None] = {}  # split seed -> the first recipe's
    try:
        for seed in args.seeds:  # seed-major: a partial table still pairs recipes on the same splits
            for recipe in args.recipes:
                row, result = run_recipe(run_overrides(args, recipe, seed, out_dir), client, parent,
                                         {"comparison": stamp, "recipe": recipe_label(recipe)})
                rows.append({"recipe": recipe_label(recipe), "seed": seed, **row})
                decisions = test_decisions(result)
                if recipe == args.recipes[0]:
                    first_decisions[seed] = decisions
                elif seed in first_decisions:
                    rows[-1]["test/flips"] = flips(decisions, first_decisions[seed])
                logging.info("%s seed %d: test auroc %.4f recall %.3f fp %d fn %d (%.0f s)", recipe, seed,
                             rows[-1]["test/auroc"], rows[-1]["test/recall"], rows[-1]["test/fp"],
                             rows[-1]["test/fn"], row["seconds"])
                write_table(args, rows, command, time.perf_counter() - start)  # partial table survives a kill
    finally:
        wall = time.perf_counter() - start
        text, out = write_table(args, rows, command, wall)
        client.log_text(parent, text, "recipe_comparison.md")
        client.log_metric(parent, "wall_minutes", wall / 60)
        complete = len(rows) == len(args.seeds) * len(args.recipes)
        client.set_terminated(parent, "FINISHED" if complete else "FAILED")
        print(text)
        print(f"Wrote {out}")


if __name__ == "__main__":
    main()
