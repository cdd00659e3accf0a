"""Measure the defect-monitor alarm limits: how often each check fires on unchanged parts, and how
often it notices a drift, on every dev line and the synthetic parts.

    python scripts/monitor_thresholds.py --out docs/results/monitor_thresholds.md \
        --bench-store /work/bench-before/mlruns/mlflow.db

Image checks: each line's good photos are split in two halves; one half is the reference (what a
training run logs as data/image_stats.json), windows of n parts are drawn (with replacement) from
the other half, unchanged or drifted: the lamp at 80 % and 120 %, focus lost (Gaussian blur,
radius 2 px at the photo's resolution), the camera moved (the photo shifted by 8 % of its width),
a colour cast (red x 1.1). A window "alarms" when any image check passes the limit. Score checks:
trained models' val goods against their own test goods (unchanged parts the model never saw), from
the finished default-recipe runs of a line-bench store when given. Reject-rate test: its false
alarm rate is at most its alpha when the FP-rate bound holds (docs/results: the FP-rate bound
study), so it is not re-measured here.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LINES = {
    "bottle": SHARED / "mvtec" / "bottle" / "train" / "good",
    "aitex": SHARED / "aitex_fabric" / "good",
    "bsdata": SHARED / "bsdata_pitting" / "good",
}
DRIFTS = {
    "lamp 80 %": lambda im: _scale(im, 0.8),
    "lamp 120 %": lambda im: _scale(im, 1.2),
    "focus lost": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "camera moved": lambda im: _shift(im, 0.08),
    "colour cast": lambda im: _red(im, 1.1),
}


def _scale(im: Image.Image, factor: float) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(im, np.float32) * factor, 0, 255).astype(np.uint8))


def _red(im: Image.Image, factor: float) -> Image.Image:
    a = np.asarray(im, np.float32).copy()
    a[..., 0] *= factor
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def _shift(im: Image.Image, share: float) -> Image.Image:
    a = np.asarray(im)
    return Image.fromarray(np.roll(a, int(share * a.shape[1]), axis=1))


def line_images(name: str, limit: int, seed: int) -> list[Image.Image]:
    from defect_detection.data.images import load_rgb
    from defect_detection.data.synthetic import synthetic_part

    if name.startswith("synthetic"):
        rng = np.random.default_rng(seed)
        category = name.split("-", 1)[1]
        return [Image.fromarray(synthetic_part(category, "good", rng, 128)) for _ in range(limit)]
    files = sorted(p for p in LINES[name].iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    picked = [files[int(i)] for i in np.linspace(0, len(files) - 1, min(limit, len(files))).round()]
    return [load_rgb(p) for p in picked]


def stats_of(images: list[Image.Image], size: int = 224) -> list[dict]:
    from defect_detection.data.geometry import Square
    from defect_detection.monitoring.image_stats import image_stats

    geometry = Square(size=(size, size))
    return [image_stats(geometry.prepare(im), (im.height, im.width)) for im in images]


def image_rates(
    reference: dict,
    pools: dict[str, dict[str, np.ndarray]],
    n: int,
    windows: int,
    shift_sd: float,
    min_change: float,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Share of windows with an image alarm, per pool (unchanged and each drift); `pools` hold each
    statistic's per-part values (checks.stat_values), so a window is indices and means, judged by
    the monitor's own deviation()."""
    from defect_detection.monitoring.checks import deviation

    out = {}
    for pool, values in pools.items():
        size = len(next(iter(values.values())))
        picks = rng.integers(0, size, (windows, n))
        alarms = np.zeros(windows, dtype=bool)
        for key, v in values.items():
            ref = reference["stats"][key]
            d = np.array([deviation(key, m, ref, min_change) for m in v[picks].mean(1)])
            alarms |= (d < -shift_sd) if key == "alignment" else (np.abs(d) > shift_sd)
        out[pool] = float(alarms.mean())
    return out


def score_null(store: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(line, val goods' log-odds, test goods' log-odds) of the finished default-recipe bench runs."""
    import mlflow

    from defect_detection.evaluation.scores import download_scores

    uri = f"sqlite:///{store}"
    client = mlflow.MlflowClient(uri)
    out = []
    for exp in client.search_experiments():
        for run in client.search_runs(
            [exp.experiment_id], "attributes.status = 'FINISHED'", max_results=5000
        ):
            tags = run.data.tags
            if tags.get("recipe", tags.get("line_bench_recipe")) not in ("default",) or "auto" in tags:
                continue
            line = tags.get("line", tags.get("line_bench_line", "?"))
            try:
                val, test = (
                    download_scores(uri, run.info.run_id, "val"),
                    download_scores(uri, run.info.run_id, "test"),
                )
            except Exception:
                continue
            out.append(
                (line, val.log_odds[val.label == 0].to_numpy(), test.log_odds[test.label == 0].to_numpy())
            )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path)
    parser.add_argument("--limit", type=int, default=240, help="good photos per line")
    parser.add_argument("--windows", type=int, default=400)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--shift-sd", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--min-change", type=float, nargs="+", default=[0.01, 0.03, 0.05])
    parser.add_argument("--bench-store", type=Path, help="a line-bench mlflow.db: score checks on its runs")
    args = parser.parse_args(argv)
    from defect_detection.monitoring.checks import psi, stat_values
    from defect_detection.monitoring.image_stats import summarize

    command = " ".join(
        ["python", "scripts/monitor_thresholds.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)]
    )
    lines = [n for n in LINES if LINES[n].is_dir()] + ["synthetic-disc", "synthetic-plate", "synthetic-mesh"]
    rng = np.random.default_rng(0)
    rows = []
    for name in lines:
        images = line_images(name, args.limit, seed=1)
        order = rng.permutation(len(images))
        half = len(images) // 2
        ref_images, stream_images = [images[i] for i in order[:half]], [images[i] for i in order[half:]]
        reference = summarize(stats_of(ref_images))
        pools = {"unchanged": stat_values(stats_of(stream_images), reference)}
        for drift, fn in DRIFTS.items():
            pools[drift] = stat_values(stats_of([fn(im) for im in stream_images]), reference)
        for n in args.sizes:
            for sd in args.shift_sd:
                for floor in args.min_change:
                    rates = image_rates(reference, pools, n, args.windows, sd, floor, rng)
                    rows.append({"line": name, "n": n, "shift_sd": sd, "min_change": floor, **rates})
        print(name, "done", flush=True)
    text = [
        "# defect-monitor's alarm limits, measured",
        "",
        f"Command: `{command}`",
        "",
        "Image checks: per line, good photos split in halves (reference / stream), windows of n parts drawn "
        f"{args.windows} times from the stream half; a window alarms when any image check passes the limits. "
        "`unchanged` is the false-alarm rate; the other columns the detection rate of each drift.",
        "",
    ]
    header = ["line", "n", "shift_sd", "min_change", "unchanged", *DRIFTS]
    text += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        text.append(
            "| "
            + " | ".join(
                str(r[h]) if h in ("line", "n", "shift_sd", "min_change") else f"{r[h]:.3f}" for h in header
            )
            + " |"
        )
    worst: dict[tuple, dict[str, float]] = {}
    for r in rows:
        w = worst.setdefault(
            (r["n"], r["shift_sd"], r["min_change"]), {"unchanged": 0.0, **dict.fromkeys(DRIFTS, 1.0)}
        )
        w["unchanged"] = max(w["unchanged"], r["unchanged"])
        for d in DRIFTS:
            w[d] = min(w[d], r[d])
    text += [
        "",
        "Worst line per setting: the highest false-alarm rate, and for each drift the lowest detection "
        "rate, over every line.",
        "",
        "| n | shift_sd | min_change | worst false alarm | "
        + " | ".join(f"worst: {d}" for d in DRIFTS)
        + " |",
        "|---|---|---|---|" + "---|" * len(DRIFTS),
    ]
    text += [
        f"| {k[0]} | {k[1]} | {k[2]} | {v['unchanged']:.3f} | "
        + " | ".join(f"{v[d]:.3f}" for d in DRIFTS)
        + " |"
        for k, v in sorted(worst.items())
    ]
    if args.bench_store and args.bench_store.is_file():
        null = score_null(args.bench_store)
        text += [
            "",
            f"Score checks on unchanged parts: {len(null)} finished default-recipe runs of "
            f"`{args.bench_store}`, each run's test goods (never seen in training or threshold choice) "
            "against its val goods.",
            "",
            "| line | runs | PSI median | PSI max | KS p min | alarms at psi 0.25 | alarms at ks 0.001 |",
            "|---|---|---|---|---|---|---|",
        ]
        from scipy import stats as scipy_stats

        by_line: dict[str, list] = {}
        for line, val, test in null:
            if len(val) and len(test):
                by_line.setdefault(line, []).append(
                    (
                        psi(val, test) if len(val) >= 20 else float("nan"),
                        scipy_stats.ks_2samp(test, val).pvalue,
                    )
                )
        for line, values in sorted(by_line.items()):
            p = np.array([v[0] for v in values])
            k = np.array([v[1] for v in values])
            text.append(
                f"| {line} | {len(values)} | {np.nanmedian(p):.3f} | {np.nanmax(p):.3f} | {k.min():.3g} | "
                f"{int(np.nansum(p > 0.25))} | {int((k < 0.001).sum())} |"
            )
    out = "\n".join(text) + "\n"
    print(out)
    if args.out:
        args.out.write_text(out)


if __name__ == "__main__":
    main()
