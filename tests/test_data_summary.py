"""Dataset summary, audit and `defect-data`: counts match the generator, duplicates stay together."""

import io
import json
import shutil
import zlib
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import OmegaConf
from PIL import Image
from rich.console import Console

from defect_detection import GOOD
from defect_detection.config import CONFIG_DIR
from defect_detection.data.audit import audit_records
from defect_detection.data.records import ImageRecord, read_folder, read_mvtec
from defect_detection.data.splits import seed_protocol_split, stratified_split
from defect_detection.data.summary import DecodeOnDemand, write_data_summary
from defect_detection.data.synthetic import DEFECT_TYPES, generate_synthetic
from defect_detection.data.transforms import build_train_transform

CATEGORIES = ("disc", "plate")
GEN = dict(n_train_good=5, n_test_good=3, n_per_defect=2, image_size=32, seed=0)
N_GOOD = GEN["n_train_good"] + GEN["n_test_good"]  # per category
FIGURES = ("class_balance.png", "samples/disc.png", "samples/plate.png", "augmented_batch.png")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("data") / "syn", CATEGORIES, **GEN)


@pytest.fixture(scope="module")
def summary(tree, tmp_path_factory):
    records = read_mvtec(tree, CATEGORIES)
    split = stratified_split(records, 0.2, 0.2, seed=0)
    aug = OmegaConf.create({"crop_scale": [0.8, 1.0], "hflip": 0.5, "rotation": 15, "color_jitter": 0.2})
    preview = DecodeOnDemand(split.train, 32, build_train_transform(aug, 32, [0.5] * 3, [0.5] * 3))
    out = tmp_path_factory.mktemp("summary")
    return out, write_data_summary(out, split, records, train_dataset=preview, preview_images=8)


def test_counts_table_matches_the_generator(summary):
    _, s = summary
    counts = s.counts
    assert list(counts.columns) == ["split", "category", "defect_type", "label", "images"]
    per_type = counts.groupby(["category", "defect_type", "label"])["images"].sum().to_dict()
    expected = {(c, "good", "good"): N_GOOD for c in CATEGORIES}
    expected |= {(c, t, "defect"): GEN["n_per_defect"] for c in CATEGORIES for t in DEFECT_TYPES}
    assert per_type == expected
    # stratified 0.2/0.2 per (category, label): 8 good -> 4/2/2, 6 defects -> 4/1/1
    per_split = counts.groupby(["split", "category", "label"])["images"].sum()
    for c in CATEGORIES:
        assert [per_split[(s, c, "good")] for s in ("train", "val", "test")] == [4, 2, 2]
        assert [per_split[(s, c, "defect")] for s in ("train", "val", "test")] == [4, 1, 1]
    assert s.wide.iloc[-1]["images"] == len(CATEGORIES) * (N_GOOD + len(DEFECT_TYPES) * GEN["n_per_defect"])


def test_files_tables_and_splits_csv(summary):
    out, s = summary
    splits = pd.read_csv(out / "splits.csv")
    assert list(splits.columns) == ["path", "category", "defect_type", "label", "split"]
    assert len(splits) == splits["path"].nunique() == len(s.assignment) == 28
    assert set(splits["split"]) == {"train", "val", "test"}
    assert pd.read_csv(out / "counts.csv")["images"].sum() == 28
    assert "| all |  |  | 16 | 6 | 6 | 28 |" in (out / "counts.md").read_text()
    assert json.loads((out / "audit.json").read_text()) == [] and s.warnings == []
    assert {p.relative_to(out).as_posix() for p in s.files} >= {*FIGURES, "splits.csv", "audit.md"}


@pytest.mark.parametrize("name", FIGURES)
def test_figures_are_nonempty_images(summary, name):
    out, _ = summary
    with Image.open(out / name) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert min(pixels.shape[:2]) > 100 and pixels.std() > 5  # drawn, not a blank canvas


def test_seed_protocol_shows_its_leak_and_unused_images(tree, tmp_path):
    records = read_mvtec(tree, CATEGORIES)
    s = write_data_summary(tmp_path, seed_protocol_split(records), records, samples_per_type=1)
    assert s.warnings[0].check == "leaky_split" and s.warnings[0].paths
    unused = s.counts[s.counts.split == "unused"]
    assert unused["images"].sum() == len(CATEGORIES) * GEN["n_test_good"]  # test/good sits out
    assert s.wide.iloc[-1]["images"] == len(records)  # distinct files, not val + test twice


def _plant_duplicates(tree, dest):
    root = shutil.copytree(tree, dest)
    same = (root / "disc/train/good/000.png", root / "disc/test/good/100.png")
    conflict = (root / "plate/train/good/001.png", root / "plate/test/spot/100.png")
    for src, dst in (same, conflict):
        shutil.copyfile(src, dst)
    return root, [tuple(str(p) for p in pair) for pair in (same, conflict)]


def test_planted_duplicates_are_found_and_kept_in_one_split(tree, tmp_path):
    root, (same, conflict) = _plant_duplicates(tree, tmp_path / "dup")
    records = read_mvtec(root, CATEGORIES)
    checks = {(w.check, tuple(sorted(w.paths))) for w in audit_records(records)}
    assert ("duplicate", tuple(sorted(same))) in checks
    assert ("duplicate_label_conflict", tuple(sorted(conflict))) in checks

    def split_of(split, path):
        return next(s for s in ("train", "val", "test") if any(r.path == path for r in split[s]))

    apart = 0
    for seed in range(10):
        grouped = stratified_split(records, 0.2, 0.2, seed=seed)
        for a, b in (same, conflict):
            assert split_of(grouped, a) == split_of(grouped, b), seed
        naive = stratified_split(records, 0.2, 0.2, seed=seed, content_hash=None)
        if split_of(naive, same[0]) != split_of(naive, same[1]):
            apart += 1
            leak = {p: s for s in ("train", "val", "test") for p in (r.path for r in naive[s])}
            assert "duplicate_across_splits" in {w.check for w in audit_records(records, leak)}
    assert apart  # without grouping the pair does get separated: the test bites


def _img(path, size=32, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    pixels = rng.integers(0, 255, (size, size, 3) if mode == "RGB" else (size, size), dtype=np.uint8)
    Image.fromarray(pixels, mode).save(path)
    return str(path)


def test_audit_flags_layout_problems_with_paths(tmp_path):
    _img(tmp_path / "good/a.png")
    odd = _img(tmp_path / "good/b.png", size=40, mode="L")
    _img(tmp_path / "good/c.png")
    single = _img(tmp_path / "defect/scratch/d.png")
    _img(tmp_path / "defect/spot/e.png")
    _img(tmp_path / "defect/spot/f.png")
    (tmp_path / "defect/spot/g.png").write_bytes(b"not an image")
    lonely = _img(tmp_path / "other/h.png")
    records = read_folder(tmp_path) + [ImageRecord(lonely, GOOD, "lonely", "good")]
    found = {w.check: w.paths for w in audit_records(records)}
    assert found["single_image_type"] == (single,)
    assert found["mixed_resolution"] == (odd,) and found["mixed_mode"] == (odd,)
    assert found["no_defects"] == (lonely,)
    assert found["unreadable"] == (str(tmp_path / "defect/spot/g.png"),)
    assert "no_good" not in found and "duplicate" not in found


def _compose_data(root, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("data_summary", overrides=[f"paths.root_dir={root}", f"out_dir={root}/out",
                                                  *overrides])


def test_defect_data_prints_and_writes_on_a_tiny_tree(tree, tmp_path):
    from defect_detection.pipeline.data_summary import data_summary

    cfg = _compose_data(tmp_path, f"data.root={tree}", f"data.categories=[{','.join(CATEGORIES)}]",
                        "data.image_size=32", "preview_images=4",
                        *(f"data.records.{k}={v}" for k, v in GEN.items()))
    console = Console(file=io.StringIO(), width=150)
    s = data_summary(cfg, console)
    text = console.file.getvalue()
    assert "scratch" in text and "no problems found" in text and "28" in text
    for name in (*FIGURES, "splits.csv", "counts.csv", "counts.md", "audit.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert s.counts["images"].sum() == 28


def test_defect_data_still_reports_when_the_split_fails(tmp_path):
    from defect_detection.pipeline.data_summary import data_summary

    for i in range(2):  # too few for three non-empty splits
        _img(tmp_path / f"data/good/{i}.png")
    (tmp_path / "data/defect").mkdir()
    cfg = _compose_data(tmp_path, "data=folder", f"data.root={tmp_path}/data", "data.image_size=32")
    console = Console(file=io.StringIO(), width=150)
    s = data_summary(cfg, console)
    assert [w.check for w in s.warnings] == ["split", "no_defects"]
    assert json.loads((tmp_path / "out/audit.json").read_text())[0]["check"] == "split"
    assert "no defect images" in console.file.getvalue()
    assert set(s.assignment["split"]) == {"unused"} and not (tmp_path / "out/augmented_batch.png").exists()


def _assert_data_artifacts(client, run_id, cfg):
    logged = {a.path for a in client.list_artifacts(run_id, "data")}
    assert {f"data/{n}" for n in ("splits.csv", "counts.csv", "counts.md", "audit.json", "audit.md",
                                  "class_balance.png", "augmented_batch.png", "samples")} <= logged
    samples = {a.path for a in client.list_artifacts(run_id, "data/samples")}
    assert samples == {f"data/samples/{c}.png" for c in cfg.data.categories}
    splits = pd.read_csv(client.download_artifacts(run_id, "data/splits.csv"))
    n = cfg.data.records
    assert len(splits) == len(cfg.data.categories) * (n.n_train_good + n.n_test_good
                                                     + len(DEFECT_TYPES) * n.n_per_defect)
    assert Counter(splits["split"]).keys() == {"train", "val", "test"}
    assert client.get_run(run_id).data.tags["data_warnings"] == "0"


def test_log_data_summary_puts_everything_under_data_in_the_run(cfg_factory):
    from defect_detection.data.summary import log_data_summary
    from defect_detection.pipeline.builders import build_datamodule
    from defect_detection.pipeline.fit import build_logger
    from defect_detection.tracking.mlflow_run import RunTracker

    cfg = cfg_factory()
    datamodule = build_datamodule(cfg)
    tracker = RunTracker.from_lightning_logger(build_logger(cfg))
    summary = log_data_summary(tracker, cfg, datamodule)
    tracker.finish()
    assert summary is not None and set(datamodule.datasets) == {"train", "val", "test"}
    _assert_data_artifacts(MlflowClient(cfg.logger.tracking_uri), tracker.run_id, cfg)
    assert log_data_summary(tracker, OmegaConf.merge(cfg, {"log_data_summary": False}), datamodule) is None


@pytest.mark.slow
def test_training_run_logs_the_data_summary(tmp_path):
    from defect_detection.pipeline.fit import train
    from tests.conftest import compose_train

    cfg = compose_train(tmp_path, "log_model=false")
    result = train(cfg)
    _assert_data_artifacts(MlflowClient(cfg.logger.tracking_uri), result["run_id"], cfg)
