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
from defect_detection.models.loading import load_predictor
from defect_detection.pipeline.fit import train
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


def test_reweighting_scales_the_largest_distance_by_the_banks_density_at_its_neighbour():
    from defect_detection.models.families.patchcore import nearest, reweighted_scores

    g = torch.Generator().manual_seed(1)
    bank = torch.randn(40, 8, generator=g)
    emb = torch.randn(3, 25, 8, generator=g) * 2
    d, idx = nearest(emb.reshape(-1, 8), bank)
    d, idx = d.view(3, 25), idx.view(3, 25)
    got = reweighted_scores(d, idx, emb, bank, neighbours=4)
    for n in range(3):  # eq. 7 written out: s* (1 - exp(|q - m*|) / sum over N_b(m*) of exp(|q - m|))
        j = int(d[n].argmax())
        q, m_star = emb[n, j], bank[idx[n, j]]
        support = torch.cdist(m_star[None], bank)[0].argsort()[:4]
        dist = (q[None] - bank[support]).norm(dim=1)
        assert torch.isclose(got[n], d[n, j] * (1 - dist[0].exp() / dist.exp().sum()), rtol=1e-4)
    # the same distance counts for more where m* is a rare good look (far from the rest of the bank)
    dense = torch.cat([torch.zeros(1, 2), torch.full((3, 2), 0.1)])
    sparse = torch.cat([torch.zeros(1, 2), torch.full((3, 2), 5.0)])
    q, s_star, m_star = torch.tensor([[[3.0, 0.0]]]), torch.tensor([[3.0]]), torch.tensor([[0]])
    in_dense, in_sparse = (reweighted_scores(s_star, m_star, q, b, 4) for b in (dense, sparse))
    assert in_sparse > in_dense and in_sparse <= 3.0


def test_a_reweighting_neighbourhood_of_one_is_refused_with_the_range(tmp_path):
    from defect_detection.models.families.patchcore_family import build_module
    from defect_detection.pipeline.builders import model_settings

    cfg = compose_train(tmp_path, "detector=patchcore", "detector.reweight=1")
    with pytest.raises(UserError, match="detector.reweight=1: give 0 .* >= 2"):
        build_module(model_settings(cfg), (10, 10), {})


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
    ("detector=segmenter",),
    ("detector=segmenter", "input=tiles", "input.tile_size=32", "input.overlap=8"),
    # trained in bf16-mixed: val/test still score in fp32, as the logged model does
    ("trainer.precision=bf16-mixed",),
    ("detector=patchcore", "trainer.precision=bf16-mixed"),
    ("detector=patchhead", "detector.steps=4", "input=tiles", "input.tile_size=32", "input.overlap=8"),
], ids=["tiles", "letterbox", "patchcore", "patchcore-tiles", "segmenter", "segmenter-tiles", "bf16",
        "patchcore-bf16", "patchhead-tiles"])
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
    assert ("gradcam" if cfg.detector.name == "classifier" else "anomaly_map") in Path(summary).read_text()


def test_patchcore_without_good_train_images_says_what_fits(tmp_path, monkeypatch):
    from defect_detection.data import splits

    real = splits.Split

    def no_train_goods(train, val, test, *args, **kwargs):
        return real([r for r in train if r.label != 0], val, test, *args, **kwargs)

    monkeypatch.setattr(splits, "Split", no_train_goods)
    cfg = compose_train(tmp_path, "detector=patchcore", "logger=none")
    with pytest.raises(UserError, match="needs at least 10 good images in the train split and it has 0.*"
                                        "detector=classifier"):
        train(cfg)


def test_good_only_train_split_trains_patchcore_and_the_classifier_says_what_fits(tmp_path):
    cfg = compose_train(tmp_path, "split.make.max_train_defects=0", "logger=none", "explain=none")
    fits = "train split has no defect image.*max_train_defects=0.*detector=patchcore"
    with pytest.raises(UserError, match=fits):
        train(cfg)
    cfg = compose_train(tmp_path, "split.make.max_train_defects=0", "detector=patchcore", "logger=none",
                        "explain=none")
    result = train(cfg)
    assert result["test"]["test/auroc"] >= 0.9  # learnt from good parts alone (1.0 on this data)


@pytest.mark.parametrize("overrides", [("input=tiles", "input.tile_size=32", "input.overlap=8"),
                                       ("detector=patchcore", "detector.reweight=3"),
                                       ("detector=segmenter",), ("detector=patchhead", "detector.steps=4")],
                         ids=["tiles", "patchcore-reweighted", "segmenter", "patchhead"])
def test_every_family_and_tiles_export_to_onnx_with_parity(tmp_path, overrides):
    from defect_detection.pipeline.export import export

    cfg, result, table, predictor = _train_and_reload(tmp_path, *overrides)
    report = export(f"runs:/{result['run_id']}/model", tmp_path / "m.onnx", images=list(table.path[:4]))
    assert report["parity"]["max_abs_diff_p_defect"] <= 1e-4
    onnx = load_predictor(tmp_path / "m.onnx")
    assert np.allclose(onnx.p_defect(list(table.path)), table.p_defect.to_numpy(), atol=1e-4)
    openvino = load_predictor(tmp_path / "m.onnx", runtime="openvino")  # every op in OpenVINO too
    assert np.allclose(openvino.p_defect(list(table.path)), table.p_defect.to_numpy(), atol=1e-4)


def test_patchcore_builds_its_bank_from_the_frozen_eval_mode_backbone(tmp_path, monkeypatch):
    """Bank patches and test patches must come from the same network: BatchNorm left in train
    mode during the bank pass normalised bank patches with batch statistics and drifted the
    running ones (bottle test AUROC 0.74 instead of 1.00), and augmented goods blurred the bank."""
    import defect_detection.pipeline.fit as train_mod
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


def _without_train_masks(monkeypatch):
    import dataclasses

    from defect_detection.data import splits

    real = splits.Split

    def strip(train, val, test, *args, **kwargs):
        return real([dataclasses.replace(r, mask_path=None) for r in train], val, test, *args, **kwargs)

    monkeypatch.setattr(splits, "Split", strip)


def test_segmenter_without_train_masks_says_which_family_fits(tmp_path, monkeypatch):
    _without_train_masks(monkeypatch)
    cfg = compose_train(tmp_path, "detector=segmenter", "logger=none")
    fits = "no train defect image has one.*detector=classifier.*detector=patchcore"
    with pytest.raises(UserError, match=fits):
        train(cfg)


@pytest.mark.parametrize("damage", ["resized", "corrupt"])
def test_segmenter_names_a_bad_mask_file_and_the_fix(tmp_path, damage):
    from PIL import Image

    cfg = compose_train(tmp_path, "detector=segmenter", "logger=none")
    train_records = __import__("hydra").utils.instantiate(cfg.data.records)  # writes the synthetic set
    mask = next(r.mask_path for r in train_records if r.mask_path)
    if damage == "resized":
        Image.new("L", (17, 9)).save(mask)
        expected = "is 17 x 9 px but its image is .*Re-export the mask"
    else:
        Path(mask).write_bytes(b"not a png")
        expected = "not an image PIL can identify.*\\(mask\\)\nFix or remove them"
    with pytest.raises(UserError, match=expected) as err:
        train(cfg)
    assert Path(mask).name in str(err.value)


def test_mask_fraction_keeps_a_seeded_share_of_the_masks():
    from defect_detection.models.families.segmenter import choose_masks

    has = [True] * 8 + [False] * 4
    kept = choose_masks(has, 0.25, seed=3)
    assert int(kept.sum()) == 2 and not kept[8:].any()
    assert torch.equal(kept, choose_masks(has, 0.25, seed=3))
    assert not torch.equal(kept, choose_masks(has, 0.25, seed=4)) or not torch.equal(
        kept, choose_masks(has, 0.25, seed=5))
    assert int(choose_masks(has, 0.01, seed=0).sum()) == 1  # at least one mask when any exists
    assert torch.equal(choose_masks(has, 1.0, seed=0), torch.tensor(has))


@pytest.mark.parametrize("backbone, frozen, trained", [
    ("efficientnet_lite0", "blocks.2", "blocks.3"), ("resnet18", "layer2", "layer3")])
def test_segmenter_freezes_the_backbone_through_its_frozen_stride(backbone, frozen, trained):
    from defect_detection.models.families.segmenter import SegmenterNet

    net = SegmenterNet(backbone, pretrained=False)
    names = {id(m): n for n, m in net.features.body.named_modules()}
    chosen = [names[id(m)] for m in net.frozen_modules(8)]
    assert frozen in chosen and trained not in chosen
    assert not net.frozen_modules(0)


def _backbone_images(monkeypatch) -> list[int]:
    """Images the patch head's frozen backbone has seen, counted per call."""
    from defect_detection.models.families.patchhead import PatchHeadNet

    seen: list[int] = []
    real = PatchHeadNet.levels

    def counting(self, x, features=None):
        seen.append(len(x))
        return real(self, x, features)

    monkeypatch.setattr(PatchHeadNet, "levels", counting)
    return seen


def test_the_patch_head_runs_the_backbone_once_per_image_in_any_epochs(tmp_path, monkeypatch):
    """Epochs after the first train the head on cached features (here tiles: a ragged bag per
    image): three times the steps (a few epochs against many), no more backbone passes."""
    counts = {}
    for steps in (15, 45):
        seen = _backbone_images(monkeypatch)
        cfg = compose_train(tmp_path / str(steps), "detector=patchhead", f"detector.steps={steps}",
                            "logger=none", "explain=none", "input=tiles", "input.tile_size=32",
                            "input.overlap=8", "input.images_per_batch=8")  # a few batches an epoch
        train(cfg)
        counts[steps] = sum(seen)
    assert counts[15] == counts[45] > 0


def test_the_cache_fills_with_the_same_features_as_the_network_scores_with():
    """BatchNorm folded into a copy of the extractor (and bfloat16, where used) changes how the
    cache is filled, not what it holds: the head trains on what scoring later computes."""
    from defect_detection.models.batchnorm_folding import fold_batchnorm
    from defect_detection.models.families.patchhead import PatchHeadNet

    torch.manual_seed(0)
    net = PatchHeadNet("efficientnet_lite0", (8, 16), pretrained=False, download=False).eval()
    for m in net.features.modules():  # statistics that make folding do something
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 96, 160)
    plain = net.levels(x)
    folded = net.levels(x, fold_batchnorm(net.features))
    for a, b in zip(plain, folded):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4 * float(a.abs().max()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net.levels(x, fold_batchnorm(net.features))
    for a, b in zip(plain, low):  # bfloat16 keeps ~3 significant digits
        assert b.dtype == torch.float32 and float((a - b).abs().max()) <= 0.1 * float(a.abs().max())


def test_the_feature_cache_is_sized_up_front_and_keeps_each_images_tiles_together():
    from defect_detection.models.families.patchhead import FeatureCache

    levels = [torch.randn(5, 4, 6, 6), torch.randn(5, 8, 3, 3)]  # 5 tiles of 2 images (2 + 3)
    counts, index = torch.tensor([2, 3]), torch.tensor([7, 1])
    cache = FeatureCache(max_gb=1.0, n_images=10)
    assert cache.get("train", index) is None
    cache.put("train", index, levels, counts)
    got = cache.get("train", torch.tensor([1, 7]))
    assert [tuple(t.shape) for t in got[0].levels] == [(3, 4, 6, 6), (3, 8, 3, 3)]
    assert torch.allclose(got[1].levels[0].float(), levels[0][:2], atol=1e-2)  # float16 in memory
    assert cache.complete("train", 2) is False and FeatureCache(1.0, 1).complete("train", 0) is False
    assert cache.get("val", index) is None  # val and train indices are different images
    # 2 images of (2*4*36 + 2*8*9 + 3*...) float16 values, times 10 images, over a tiny limit: off
    small = FeatureCache(max_gb=1e-6, n_images=10)
    small.put("train", index, levels, counts)
    assert small.enabled is False and small.get("train", index) is None


def test_the_patch_head_learns_small_defects_and_its_map_points_at_them(tmp_path):
    cfg = compose_train(tmp_path, "detector=patchhead", "data.image_size=128", "data.records.image_size=128",
                        "data.records.n_per_defect=6", "data.records.n_train_good=12", "explain.max_images=6")
    result = train(cfg)
    assert result["test"]["test/auroc"] >= 0.9
    client = mlflow.MlflowClient(cfg.logger.tracking_uri)
    summary = Path(client.download_artifacts(result["run_id"], "gradcam/summary.json")).read_text()
    assert "anomaly_map" in summary
    pointing = client.get_run(result["run_id"]).data.metrics["test/cam_pointing_game"]
    assert pointing >= 0.5  # its own map, no Grad-CAM: the top patch lies on the masked defect


def test_patchcore_neighbourhood_average_counts_the_zero_padding_and_old_banks_keep_theirs():
    # anomalib's and the paper's 3 x 3 average counts the zero padding at the border; averaging over
    # the inside neighbours only scored lower on identical features (docs/results/patchcore_reference.md)
    from defect_detection.models.families.patchcore import PatchCoreNet
    from defect_detection.models.families.patchcore_family import build_net

    net = PatchCoreNet("resnet18", (8, 16), pretrained=False)
    assert net.zero_pad

    class Constant(torch.nn.Module):  # a constant map: only the border handling changes its average
        def forward(self, x):
            return [torch.ones(1, 2, 4, 4)]

    net.features = Constant()
    emb = net.embed(torch.zeros(1, 3, 32, 32))[0, 0]
    assert torch.isclose(emb[1, 1], torch.tensor(1.0)) and torch.isclose(emb[0, 0], torch.tensor(4 / 9))
    assert torch.isclose(emb[0, 1], torch.tensor(6 / 9))
    net.zero_pad = False
    assert torch.allclose(net.embed(torch.zeros(1, 3, 32, 32)), torch.ones(1, 2, 4, 4))
    meta = {"backbone": "resnet18", "strides": [8, 16], "bank_size": 4}
    assert not build_net(meta).zero_pad  # a checkpoint from before the key: its bank was built so
    assert build_net({**meta, "neighbourhood_zero_pad": True}).zero_pad
