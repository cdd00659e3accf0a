"""Detector families and input geometries end to end: train on tiny data, then the logged model
decides every test image exactly as the run's evaluation did (predict / serve / export path)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from defect_detection import UserError
from defect_detection.models.families.patchcore import greedy_coreset, nearest_distances
from defect_detection.models.inference import load_predictor
from defect_detection.train import train
from tests.conftest import compose_train


def test_nearest_distances_match_cdist_and_the_coreset_covers_the_pool():
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(500, 16, generator=g)
    bank = torch.randn(37, 16, generator=g)
    expected = torch.cdist(pool, bank).amin(1)
    assert torch.allclose(nearest_distances(pool, bank, chunk=64), expected, atol=1e-4)
    chosen, covered = greedy_coreset(pool, 50, projection_dim=16)
    assert len(set(chosen.tolist())) == 50
    assert torch.allclose(covered, torch.cdist(pool, pool[chosen]).amin(1), atol=1e-2)
    # greedy k-center beats a random subset of the same size on the worst-covered point
    random = pool[torch.randperm(500, generator=g)[:50]]
    assert covered.max() < torch.cdist(pool, random).amin(1).max()


def _train_and_reload(root: Path, *overrides: str):
    cfg = compose_train(root, "explain.max_images=4", *overrides)
    result = train(cfg)
    table = pd.read_csv(Path(cfg.paths.output_dir) / "reports" / "predictions.csv")
    mlflow.set_tracking_uri(cfg.logger.tracking_uri)
    predictor = load_predictor(f"runs:/{result['run_id']}/model")
    return cfg, result, table, predictor


@pytest.mark.parametrize("overrides", [
    ("input=tiles", "input.tile_size=32", "input.overlap=8", "input.aggregate.how=topk_mean",
     "input.aggregate.k=2"),
    ("input=letterbox", "data.image_size=[48,64]"),
    ("detector=patchcore",),
    ("detector=patchcore", "input=tiles", "input.tile_size=32", "input.overlap=0"),
], ids=["tiles", "letterbox", "patchcore", "patchcore-tiles"])
def test_the_logged_model_decides_test_images_as_evaluation_did(tmp_path, overrides):
    cfg, result, table, predictor = _train_and_reload(tmp_path, *overrides)
    p = predictor.p_defect(list(table.path))
    assert np.allclose(p, table.p_defect.to_numpy(), atol=1e-4)
    decided = predictor.predict(list(table.path))
    assert (decided.is_defect.to_numpy() == (table.p_defect.to_numpy() >= result["threshold"])).all()
    meta = predictor.meta
    assert meta["input"]["name"] == cfg.input.name and meta["family"] == cfg.detector.name
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    summary = client.download_artifacts(result["run_id"], "gradcam/summary.json")
    assert ("anomaly_map" if cfg.detector.name == "patchcore" else "gradcam") in Path(summary).read_text()


def test_patchcore_without_good_train_images_says_what_fits(tmp_path, monkeypatch):
    from defect_detection.data import splits

    real = splits.Split

    def no_train_goods(train, val, test, *args, **kwargs):
        return real([r for r in train if r.label != 0], val, test, *args, **kwargs)

    monkeypatch.setattr(splits, "Split", no_train_goods)
    cfg = compose_train(tmp_path, "detector=patchcore", "logger=none")
    with pytest.raises(UserError, match="no good images in the train split.*detector=classifier"):
        train(cfg)


def test_tiles_export_to_onnx_with_parity(tmp_path):
    from defect_detection.export import export

    cfg, result, table, predictor = _train_and_reload(tmp_path, "input=tiles", "input.tile_size=32",
                                                      "input.overlap=8")
    report = export(f"runs:/{result['run_id']}/model", tmp_path / "m.onnx", images=list(table.path[:4]))
    assert report["parity"]["max_abs_diff_p_defect"] <= 1e-4
    onnx = load_predictor(tmp_path / "m.onnx")
    assert np.allclose(onnx.p_defect(list(table.path)), table.p_defect.to_numpy(), atol=1e-4)


def test_patchcore_builds_its_bank_from_the_frozen_eval_mode_backbone(tmp_path, monkeypatch):
    """Bank patches and test patches must come from the same network: BatchNorm left in train
    mode during the bank pass normalised bank patches with batch statistics and drifted the
    running ones (bottle test AUROC 0.74 instead of 1.00), and augmented goods blurred the bank."""
    import defect_detection.train as train_mod
    from defect_detection.models.features import FeatureExtractor

    built = {}

    def keeping(name: str) -> None:  # train as usual, but keep what train_mod.<name> built
        real = getattr(train_mod, name)
        monkeypatch.setattr(train_mod, name, lambda *a, **k: built.setdefault(name, real(*a, **k)))

    keeping("build_module")
    keeping("build_datamodule")
    cfg = compose_train(tmp_path, "detector=patchcore", "logger=none", "augmentation=seed_strong")
    train(cfg)
    net, dm = built["build_module"].net, built["build_datamodule"]
    fresh = FeatureExtractor(cfg.backbone.name, list(cfg.detector.strides), cfg.backbone.pretrained,
                             cfg.backbone.weights_path).state_dict()
    stats = {k: v for k, v in net.features.state_dict().items() if "running_" in k}
    assert stats and all(torch.equal(v, fresh[k]) for k, v in stats.items())
    assert dm.train_transform is dm.eval_transform  # the bank sees the goods as test will
