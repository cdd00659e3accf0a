"""experiment=auto: readable candidate rules, val-only choice, the budget, one parent run."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
from omegaconf import OmegaConf

from defect_detection import UserError
from defect_detection.auto.candidates import Candidate, candidates
from defect_detection.auto.entry import run_auto_recipe
from defect_detection.auto.profile import DataProfile
from defect_detection.auto.runner import Outcome, auroc_se, estimate_seconds, family_probe, rank, work_units
from tests.conftest import compose_train


def _profile(train_defects=30, masks=0, h=600, w=600, aspect=1.0) -> DataProfile:
    counts = {
        "train": {"good": 100, "defect": train_defects},
        "val": {"good": 30, "defect": 10},
        "test": {"good": 30, "defect": 10},
    }
    return DataProfile(counts, masks, h, w, aspect, False)


def test_the_rules_pick_families_and_geometry_from_the_data():
    assert [c.label for c in candidates(_profile(train_defects=0), 224)] == ["patchcore-square"]
    assert [c.label for c in candidates(_profile(masks=5), 224)] == [
        "segmenter-square",
        "classifier-square",
        "patchcore-square",
        "patchhead-native",
    ]
    assert [c.label for c in candidates(_profile(train_defects=4), 224)] == [
        "patchcore-square",
        "classifier-square",
        "patchhead-native",
    ]
    line_scan = candidates(_profile(h=256, w=4096, aspect=16.0), 224)
    assert [c.label for c in line_scan] == [
        "classifier-tiles",
        "patchcore-tiles",
        "patchhead-native",
        "classifier-square",
        "patchcore-square",
    ]
    tiles = line_scan[0].overrides
    assert (
        "input.scale=0.4375" in tiles and "input.tile_size=[112,448]" in tiles and "input.overlap=56" in tiles
    )
    portrait = candidates(_profile(h=4096, w=256, aspect=16.0), 224)[0].overrides
    assert "input.tile_size=[448,112]" in portrait
    by_label = {c.label: c for c in candidates(_profile(h=1024, w=1024, train_defects=4), 224)}
    big = by_label["patchcore-tiles"]
    assert (
        "input.tile_size=224" in big.overrides
        and "input.scale=0.4375" in big.overrides
        and "large" in big.reason
    )
    assert all(c.reason for c in line_scan + [big])


def test_the_native_candidate_keeps_the_photos_own_size_up_to_its_pixel_budget():
    # 1130 x 460 raceways: at native resolution (the elongated tile rule scaled them to 0.24)
    head = candidates(_profile(h=460, w=1130, aspect=2.46), 224, native_max_pixels=600_000)
    native = next(c for c in head if c.label == "patchhead-native")
    assert "data.image_size=[460,1130]" in native.overrides and "input=letterbox" in native.overrides
    assert "detector=patchhead" in native.overrides and "scale 1.00" in native.reason
    # 4096 x 256 line scans: scaled down, aspect kept, to the pixel budget
    scan = next(c for c in candidates(_profile(h=256, w=4096, aspect=16.0), 224, native_max_pixels=500_000)
                if c.label == "patchhead-native")
    h, w = (int(v) for v in scan.overrides[-1].split("=[")[1].rstrip("]").split(","))
    assert h * w <= 500_000 and abs(w / h - 16.0) < 0.1
    # photos about the working size: nothing to keep that squashing would lose
    assert "patchhead-native" not in [c.label for c in candidates(_profile(h=300, w=300), 224)]


def test_auto_only_runs_the_named_candidates_and_names_the_ones_it_lacks():
    chosen = candidates(_profile(), 224, only=["patchhead-native", "classifier-square"])
    assert [c.label for c in chosen] == ["patchhead-native", "classifier-square"]
    with pytest.raises(UserError, match=r"auto.only=\['classifier-tiles'\].*classifier-tiles.*not among"):
        candidates(_profile(), 224, only=["classifier-tiles"])


def _auto(tmp_path: Path, *extra: str):
    overrides = [
        f"paths.root_dir={tmp_path}",
        "debug=fast",
        "experiment=auto",
        "explain=none",
        "log_model=false",
        "log_data_summary=false",
        *extra,
    ]
    cfg = compose_train(tmp_path, *overrides[1:])
    result = run_auto_recipe(cfg, overrides)
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    parent = client.get_run(result["auto_parent_run_id"])
    table = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "auto/candidates.json")).read_text()
    )
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    return result, client, parent, rows


def test_auto_runs_every_candidate_under_one_parent_and_chooses_on_val(tmp_path):
    result, client, parent, rows = _auto(tmp_path)
    # synthetic parts have masks: segmenter, classifier, PatchCore, all square at 64 px
    assert [r["candidate"] for r in rows] == ["segmenter-square", "classifier-square", "patchcore-square"]
    assert all(r["status"] == "finished" for r in rows)
    winner = [r for r in rows if r["winner"]]
    assert len(winner) == 1 and parent.data.tags["winner_run_id"] == winner[0]["run_id"] == result["run_id"]
    # the winner is the first candidate, in the rules' order, tied with the best val AUROC
    best = max(r["val AUROC"] for r in rows)
    assert all(r["within noise of best"] for r in rows if r["val AUROC"] >= best - 1e-6)
    assert winner[0]["candidate"] == next(r for r in rows if r["within noise of best"])["candidate"]
    # test numbers: the winner's alone, once
    assert (
        all(r["test/auroc"] is None for r in rows if not r["winner"]) and winner[0]["test/auroc"] is not None
    )
    assert parent.data.metrics["winner_test/auroc"] == pytest.approx(float(result["test"]["test/auroc"]))
    for r in rows:
        child = client.get_run(r["run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id and child.info.status == "FINISHED"
    assert parent.info.status == "FINISHED"


def test_auto_skips_what_would_overrun_the_budget_and_says_so(tmp_path):
    _, _, parent, rows = _auto(tmp_path, "auto.budget_minutes=0.001")
    assert rows[0]["status"] == "finished"  # the likeliest candidate always runs
    assert [r["status"] for r in rows[1:]] == ["skipped", "skipped"]
    assert all("skipped: " in r["note"] and "min used" in r["note"] for r in rows[1:])
    assert parent.data.tags["winner"] == rows[0]["candidate"]


def test_the_budget_estimate_scales_patchcore_by_its_coreset_work_not_by_pixels():
    # bottle (900 px, 171 train goods): patchcore-square took 1.27-1.88 min over 5 split seeds and
    # patchcore-tiles (9 tiles of 224 px) 13.3-15.7 times as long; pixels alone predicted 9 times
    profile = DataProfile({**_profile().counts, "train": {"good": 171, "defect": 0}}, 0, 900, 900, 1.0, False)
    square, tiles = candidates(profile, 224, large_factor=3.0)
    assert (square.label, tiles.label) == ("patchcore-square", "patchcore-tiles")
    assert tiles.pixels == 9 * square.pixels
    detector = OmegaConf.load(Path(__file__).parents[1] / "conf/detector/patchcore.yaml")
    w_sq, w_tiles = (work_units(c, detector, 171) for c in (square, tiles))
    done = [Outcome(square, "finished", 90.0, work=w_sq)]
    assert 13.3 * 90 <= estimate_seconds(tiles, w_tiles, done) <= 1.3 * 15.7 * 90
    # another family has no work units of this one: pixels scale the first finished run
    classifier = Candidate("classifier-tiles", [], "why", "classifier", "tiles", tiles.pixels)
    assert estimate_seconds(classifier, work_units(classifier, detector, 171), done) == pytest.approx(9 * 90)
    assert estimate_seconds(tiles, w_tiles, []) is None


def test_the_native_head_is_estimated_by_timing_its_own_backbone_pass(tmp_path):
    from PIL import Image

    from defect_detection.data.records import ImageRecord
    from defect_detection.models.families.patchhead_family import FIXED_S

    # a fine-tuned run's seconds scaled by pixels put the native head at 10 x a square
    # classifier's time (it passes the backbone once per image, forward only): the budget skipped it
    profile = _profile(h=1000, w=1000)
    square, *_ = todo = candidates(profile, 224)
    native = next(c for c in todo if c.label == "patchhead-native")
    done = [Outcome(square, "finished", 120.0, work=float(square.pixels))]
    scaled = 120.0 * native.pixels / square.pixels
    assert estimate_seconds(native, native.pixels, done) == pytest.approx(scaled)
    assert estimate_seconds(native, native.pixels, done, probe=lambda: 42.0) == 42.0
    # once a run of its own family finished, that run scales
    done.append(Outcome(native, "finished", 60.0, work=float(native.pixels)))
    assert estimate_seconds(native, 2.0 * native.pixels, done, probe=lambda: 42.0) == pytest.approx(120.0)
    # the probe: the real backbone, timed at the candidate's input size, and its photos decoded
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(np.full((200, 320, 3), 40 * k, np.uint8)).save(paths[-1])
    records = [ImageRecord(str(p), 0, "part", "good") for p in paths]
    head_cfg = compose_train(tmp_path, "detector=patchhead", "input=letterbox", "data.image_size=[96,160]")
    seconds = family_probe(native, head_cfg, profile, records)()
    assert FIXED_S < seconds < FIXED_S + 600
    assert family_probe(square, compose_train(tmp_path), profile, records) is None  # classifier: no probe


def _outcome(label: str, auroc: float, margin: float = 0.0) -> Outcome:
    return Outcome(Candidate(label, [], "why"), "finished", 1.0, None,
                   {"val": {"val/auroc": auroc, "val/margin": margin}})


def test_a_later_candidate_must_beat_the_rules_first_choice_by_more_than_val_noise():
    outs = [_outcome("first", 0.84), _outcome("second", 0.87, margin=5.0), _outcome("third", 0.60)]
    # 9 good / 11 defect val images (AITEX): 0.03 apart is noise (SE ~0.08), 0.27 is not
    assert [o.candidate.label for o in rank(outs, 9, 11, tie_se=1.0)] == ["first", "second", "third"]
    assert rank(outs, 9, 11, tie_se=0.0)[0].candidate.label == "second"  # best on val
    assert rank(outs, 900, 1100, tie_se=1.0)[0].candidate.label == "second"  # a large val split decides
    # perfect val AUROCs (float32: 0.99999994) tie; the rules' first of them wins, not the margin
    outs = [_outcome("a", 0.9999999403953552, 3.4), _outcome("b", 1.0, 5.6)]
    assert rank(outs, 46, 13, tie_se=1.0)[0].candidate.label == "a"
    assert rank([_outcome("x", float("nan")), _outcome("y", 0.7)], 9, 11, 1.0)[0].candidate.label == "y"


def test_auroc_se_matches_the_spread_of_auroc_over_resampled_val_splits():
    rng = np.random.default_rng(0)
    n_good, n_defect = 9, 11
    aurocs = []
    for _ in range(4000):  # binormal scores, d' = 1.5 (AUROC ~0.86)
        good, defect = rng.normal(0, 1, n_good), rng.normal(1.5, 1, n_defect)
        aurocs.append((defect[:, None] > good[None, :]).mean())
    empirical = float(np.std(aurocs))
    assert auroc_se(float(np.mean(aurocs)), n_good, n_defect) == pytest.approx(empirical, rel=0.2)
    assert auroc_se(1.0, 46, 13) == 0.0 and auroc_se(0.9, 0, 10) != auroc_se(0.9, 0, 10)  # nan


def test_auto_trains_in_bf16_only_the_classifier_and_only_on_a_cpu_with_native_bfloat16(monkeypatch):
    from defect_detection import UserError
    from defect_detection.auto import precision

    cpu = OmegaConf.create({"accelerator": "cpu", "precision": "32-true"})
    monkeypatch.setattr(precision, "bf16_supported", lambda device: True)
    assert precision.precision_overrides("auto", cpu, "classifier") == ["trainer.precision=bf16-mixed"]
    # measured: the segmenter's decisions changed in bf16; PatchCore has nothing to train
    assert precision.precision_overrides("auto", cpu, "segmenter") == []
    assert precision.precision_overrides("auto", cpu, "patchcore") == []
    assert "bf16-mixed training for the classifier" in precision.describe("auto", cpu)
    monkeypatch.setattr(precision, "bf16_supported", lambda device: False)  # emulated bf16 is slower
    assert precision.precision_overrides("auto", cpu, "classifier") == []
    assert "no native bfloat16" in precision.describe("auto", cpu)
    assert precision.precision_overrides("bf16-mixed", cpu, "segmenter") == ["trainer.precision=bf16-mixed"]
    gpu = OmegaConf.create({"accelerator": "gpu", "precision": "32-true"})
    monkeypatch.setattr(precision, "bf16_supported", lambda device: True)
    assert precision.precision_overrides("auto", gpu, "classifier") == []  # the GPU trainer keeps its own
    with pytest.raises(UserError, match="auto.precision=bf16: use one of auto, 32-true, bf16-mixed"):
        precision.describe("bf16", cpu)


@pytest.mark.parametrize("typed, trained", [((), "bf16-mixed"), (("trainer.precision=32-true",), "32-true")])
def test_candidates_train_in_auto_precision_unless_the_user_set_one(tmp_path, monkeypatch, typed, trained):
    from defect_detection.auto import precision

    monkeypatch.setattr(precision, "bf16_supported", lambda device: True)
    # the synthetic parts have masks: segmenter first (fp32), then the classifier (bf16 on such a CPU)
    _, client, parent, rows = _auto(tmp_path, "auto.max_candidates=2", *typed)
    assert "bf16-mixed training for the classifier" in parent.data.tags["auto_precision"]
    params = {r["candidate"]: client.get_run(r["run_id"]).data.params["trainer.precision"] for r in rows}
    assert params == {"segmenter-square": "32-true", "classifier-square": trained}
