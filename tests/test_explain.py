"""Grad-CAM: localisation metrics on known maps, maps that find a known defect, logged galleries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from defect_detection import UserError
from defect_detection.explain.gradcam import compute_cams, gradcam_layer_for, load_mask, resolve_layer
from defect_detection.explain.localisation import (
    energy_in_mask,
    localisation_scores,
    pixel_auroc,
    pointing_hit,
)
from defect_detection.explain.overlay import denormalise, gallery, overlay

SIZE, SQUARE = 48, 8


# -- localisation metrics on hand-made maps ---------------------------------------------------
def _square_mask(size: int = 8, top: int = 2, left: int = 3, side: int = 3) -> torch.Tensor:
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[top:top + side, left:left + side] = True
    return mask


def test_pointing_game_hits_inside_misses_outside_and_flat_maps_point_nowhere():
    mask = _square_mask()
    cam = torch.zeros(8, 8)
    cam[3, 4] = 1.0
    assert pointing_hit(cam, mask)
    cam = torch.zeros(8, 8)
    cam[7, 7] = 1.0
    assert not pointing_hit(cam, mask)
    assert not pointing_hit(torch.ones(8, 8), mask)


def test_pixel_auroc_and_energy_have_their_known_values():
    mask = _square_mask()
    share = 9 / 64
    assert pixel_auroc(mask.float(), mask) == pytest.approx(1.0)
    assert pixel_auroc(1 - mask.float(), mask) == pytest.approx(0.0)
    assert pixel_auroc(torch.full((8, 8), 0.3), mask) == pytest.approx(0.5)  # all ties
    assert energy_in_mask(mask.float(), mask) == pytest.approx(1.0)
    assert energy_in_mask(torch.ones(8, 8), mask) == pytest.approx(share)
    assert energy_in_mask(torch.zeros(8, 8), mask) == 0.0
    # 4 pixels, 2 positive: scores rank 3 of the 4 (positive, negative) pairs correctly -> 0.75
    cam = torch.tensor([[0.1, 0.4], [0.35, 0.8]])
    small = torch.tensor([[False, False], [True, True]])
    assert pixel_auroc(cam, small) == pytest.approx(0.75)
    # half the mass inside: a map of 1 on the mask and 9/55 on the rest
    cam = torch.where(mask, 1.0, 9 / 55)
    assert energy_in_mask(cam, mask) == pytest.approx(0.5)


def test_localisation_scores_average_and_skip_empty_masks():
    mask = _square_mask()
    hit = mask.float()
    miss = torch.zeros(8, 8)
    miss[7, 7] = 1.0
    scores, rows = localisation_scores(torch.stack([hit, miss, hit]),
                                       torch.stack([mask, mask, torch.zeros(8, 8, dtype=torch.bool)]))
    assert scores.n_images == 2 and rows[2] is None
    assert scores.pointing_game == pytest.approx(0.5)
    assert scores.energy_in_mask == pytest.approx(0.5)
    assert scores.mask_area_share == pytest.approx(9 / 64)
    # the miss map: 1 at a negative pixel, ties elsewhere -> AUROC just below 0.5
    assert scores.pixel_auroc == pytest.approx((1.0 + pixel_auroc(miss, mask)) / 2)
    assert set(scores.metrics("test/")) >= {"test/cam_pointing_game", "test/cam_pixel_auroc",
                                            "test/cam_energy_in_mask"}


def test_masks_are_resized_like_images_and_thin_defects_survive(tmp_path):
    from PIL import Image

    big = np.zeros((200, 200), np.uint8)
    big[50:150, 100:200] = 255
    Image.fromarray(big).save(tmp_path / "m.png")
    mask = load_mask(tmp_path / "m.png", 20)
    assert mask.shape == (20, 20) and mask.dtype == torch.bool
    assert mask[5:15, 10:20].all() and not mask[:, :9].any()
    thin = np.zeros((200, 200), np.uint8)
    thin[100, :] = 255  # a 1-pixel line: below half intensity after the 10x bilinear shrink
    Image.fromarray(thin).save(tmp_path / "t.png")
    assert load_mask(tmp_path / "t.png", 20).any()


# -- Grad-CAM mechanics ------------------------------------------------------------------------
def test_layer_paths_resolve_on_the_net_and_bad_ones_name_the_fix():
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    assert resolve_layer(net, "net.layer4") is net.layer4
    assert resolve_layer(net, "layer4.1") is net.layer4[1]
    with pytest.raises(UserError, match="net.layer9"):
        resolve_layer(net, "net.layer9")
    assert gradcam_layer_for("efficientnet_lite0") == ["net.blocks.4", "net.blocks.5"]
    assert gradcam_layer_for("resnet18") == ["net.layer3", "net.layer4"]


def test_batched_maps_equal_single_image_maps_and_leave_the_net_as_it_was():
    torch.manual_seed(0)
    net = _TinyCNN()
    net.train()
    net.head.weight.requires_grad_(False)
    x = torch.randn(5, 3, 32, 32)
    batched = compute_cams(net, "net.features", x, target="defect", batch_size=5)
    single = torch.cat([compute_cams(net, "net.features", x[i:i + 1]).maps for i in range(5)])
    assert batched.maps.shape == (5, 32, 32)
    assert torch.allclose(batched.maps, single, atol=1e-5)
    assert batched.maps.min() >= 0 and torch.allclose(batched.maps.flatten(1).amax(1), torch.ones(5))
    assert net.training and not net.head.weight.requires_grad and net.head.bias.requires_grad
    assert all(p.grad is None for p in net.parameters())
    predicted = compute_cams(net, "net.features", x, target="predicted", threshold=0.0)
    assert (predicted.target == 1).all()  # every p_defect >= 0
    predicted = compute_cams(net, "net.features", x, target="predicted", threshold=1.01)
    assert (predicted.target == 0).all()
    with pytest.raises(UserError, match="explain.target"):
        compute_cams(net, "net.features", x, target="crack")


def test_overlay_denormalises_and_galleries_render():
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    image = torch.rand(2, 3, 16, 16)
    normalised = (image - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    back = denormalise(normalised, mean, std)
    assert back.shape == (2, 16, 16, 3) and back.dtype == np.uint8
    assert np.abs(back.astype(int) - (image.permute(0, 2, 3, 1).numpy() * 255).round()).max() <= 1
    cam = torch.zeros(16, 16)
    cam[4:8, 4:8] = 1
    out = overlay(back[0], cam.numpy(), alpha=0.5, cmap="jet", mask=cam.bool().numpy())
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    assert (out[4, 4:8] == 255).all()  # the mask outline
    fig = gallery([out, None, out], ["a", "", "b"], ncols=2, title="t")
    assert len(fig.axes) == 4
    with pytest.raises(UserError, match="colormap"):
        overlay(back[0], cam.numpy(), cmap="no-such-map")


# -- a tiny trained model looks at the defect --------------------------------------------------
class _TinyCNN(nn.Module):
    """conv features -> global average pool -> linear: Grad-CAM on `features` is its CAM."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _square_data(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Textured noisy backgrounds; half the images carry a bright SQUARE x SQUARE square (the defect)."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    images, labels, masks = [], [], []
    for i in range(n):
        phase = rng.uniform(0, 6.3)
        base = 0.45 + 0.12 * np.sin(xx * 25 + phase) * np.cos(yy * 17 + phase)
        img = np.clip(base[None] + rng.normal(0, 0.08, (3, SIZE, SIZE)), 0, 1)
        mask = np.zeros((SIZE, SIZE), bool)
        if i % 2:
            top, left = rng.integers(2, SIZE - SQUARE - 2, 2)
            mask[top:top + SQUARE, left:left + SQUARE] = True
            img[:, mask] = np.clip(0.9 + rng.normal(0, 0.03, (3, int(mask.sum()))), 0, 1)
        images.append(img)
        labels.append(i % 2)
        masks.append(mask)
    x = (torch.tensor(np.stack(images), dtype=torch.float32) - 0.5) / 0.5
    return x, torch.tensor(labels), torch.tensor(np.stack(masks))


def test_a_trained_tiny_model_points_at_the_square_far_above_chance():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x, y, _ = _square_data(128, rng)
    net = _TinyCNN()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(30):
        batch = torch.from_numpy(rng.choice(len(y), 32, replace=False))
        loss = nn.functional.cross_entropy(net(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt, mt = _square_data(40, np.random.default_rng(1))
    defects = yt == 1
    result = compute_cams(net, "net.features", xt[defects], target="defect", batch_size=8)
    assert (result.p_defect > 0.5).float().mean() > 0.9  # it learnt the task
    scores, _ = localisation_scores(result.maps, mt[defects])
    chance = scores.mask_area_share
    assert chance == pytest.approx(SQUARE**2 / SIZE**2)
    assert scores.pointing_game >= 0.8 > 10 * chance
    assert scores.pixel_auroc > 0.9
    assert scores.energy_in_mask > 3 * chance
    torch.manual_seed(0)
    untrained, _ = localisation_scores(compute_cams(_TinyCNN(), "net.features", xt[defects]).maps,
                                       mt[defects])
    assert scores.energy_in_mask > 2 * untrained.energy_in_mask  # training moved the evidence onto it


# -- logged after training, and written by defect-explain ---------------------------------------
def test_log_gradcam_logs_galleries_overlays_and_scores(tmp_path):
    """The training hook on the real configs and data layer, without the fit (fast)."""
    import json

    import pytorch_lightning as pl
    from mlflow import MlflowClient

    from defect_detection.explain.report import log_gradcam
    from defect_detection.pipeline.builders import build_datamodule, build_module
    from defect_detection.pipeline.fit import build_logger
    from defect_detection.tracking.mlflow_run import RunTracker
    from tests.conftest import compose_train

    cfg = compose_train(tmp_path, "explain.n_per_group=2", "explain.max_images=5")
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule.class_counts("train"))
    module.set_threshold(0.0)  # everything called a defect: every good test image is misclassified
    pl.Trainer(logger=False, accelerator="cpu", enable_progress_bar=False, enable_checkpointing=False,
               enable_model_summary=False).test(module, datamodule=datamodule, verbose=False)
    tracker = RunTracker.from_lightning_logger(build_logger(cfg))
    from defect_detection.schema import validate_train_config

    settings = validate_train_config(cfg)
    metrics = log_gradcam(tracker, settings.explain, settings.backbone, module, datamodule)
    tracker.finish()

    client = MlflowClient(cfg.logger.tracking_uri)
    run_id = tracker.run_id
    files = {a.path for a in client.list_artifacts(run_id, "gradcam")}
    assert {"gradcam/gallery_defects.png", "gradcam/gallery_misclassified.png", "gradcam/images",
            "gradcam/localisation.csv", "gradcam/summary.json"} <= files
    summary = json.load(open(client.download_artifacts(run_id, "gradcam/summary.json")))
    n_good = sum(r.label == 0 for r in datamodule.records("test"))
    assert summary["layer"] == "net.blocks.4, net.blocks.5" and summary["n_misclassified"] == min(5, n_good)
    assert summary["resolution"] == "original" and summary["pointing_radius_px"] == 15
    assert summary["n_masked"] == sum(r.mask_path is not None for r in datamodule.records("test")) > 0
    logged = client.get_run(run_id).data.metrics
    for name in ("test/cam_pointing_game", "test/cam_pixel_auroc", "test/cam_energy_in_mask", "test/cam_pro"):
        assert 0 <= logged[name] <= 1 and logged[name] == pytest.approx(metrics[name])
    assert logged["test/cam_n_regions"] >= logged["test/cam_n_masked"]
    assert 0 < logged["test/cam_mask_area_share"] < 0.2 and logged["test/cam_ms_per_image"] > 0
    overlays = [a.path for c in client.list_artifacts(run_id, "gradcam/images")
                for t in client.list_artifacts(run_id, c.path) for a in client.list_artifacts(run_id, t.path)]
    assert len(overlays) == 5 and all(p.endswith(".png") for p in overlays)  # capped by max_images
    import pandas as pd

    table = pd.read_csv(client.download_artifacts(run_id, "gradcam/localisation.csv"))
    assert len(table) == summary["n_masked"] and table["pointing_hit"].isin([0, 1]).all()


@pytest.mark.slow
def test_a_real_training_run_ends_finished_with_the_gradcam_outputs(tmp_path):
    from mlflow import MlflowClient

    from defect_detection.pipeline.fit import train
    from tests.conftest import compose_train

    cfg = compose_train(tmp_path, "trainer.max_epochs=1", "explain.target=predicted")
    result = train(cfg)
    client = MlflowClient(cfg.logger.tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "gradcam")}
    assert {"gradcam/gallery_defects.png", "gradcam/images", "gradcam/summary.json"} <= files
    assert {"test/cam_pointing_game", "test/cam_pixel_auroc", "test/cam_energy_in_mask",
            "test/cam_ms_per_image"} <= set(run.data.metrics)


def test_explain_config_group_swaps_off(cfg_factory):
    assert cfg_factory().explain.enabled is True
    assert cfg_factory("explain=none").explain is None


def test_defect_explain_writes_one_overlay_per_image_from_a_bundle(tmp_path, synthetic_root):
    from hydra import compose, initialize_config_dir

    from defect_detection.config import CONFIG_DIR
    from defect_detection.models.backbones import build_network
    from defect_detection.models.inference import save_bundle
    from defect_detection.pipeline.explain import explain

    torch.manual_seed(0)
    bundle = save_bundle(tmp_path / "bundle.pt", build_network("resnet18", pretrained=False),
                         backbone="resnet18", image_size=32, mean=[0.485, 0.456, 0.406],
                         std=[0.229, 0.224, 0.225], threshold=0.5)
    out = tmp_path / "overlays"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("explain_cmd", overrides=[f"paths.root_dir={tmp_path}", f"model={bundle}",
                                                f"inputs={synthetic_root}/disc/test", f"output_dir={out}"])
    written = explain(cfg)
    images = sorted((synthetic_root / "disc" / "test").rglob("*.png"))
    assert len(written) == len(images) and all(p.is_file() for p in written)
    assert (out / "good" / "000_gradcam.png").is_file() and (out / "scratch" / "000_gradcam.png").is_file()
    import pandas as pd
    from PIL import Image

    assert Image.open(written[0]).size == (32, 32)
    table = pd.read_csv(out / "overlays.csv")
    assert len(table) == len(images) and set(table["decision"]) <= {"good", "defect"}
    assert (table["explained_class"] == table["decision"]).all()  # target=predicted by default
    with pytest.raises(UserError, match="no-such"):
        explain(OmegaConf.merge(cfg, {"inputs": str(tmp_path / "no-such" / "*.png")}))


# -- issue 18: tolerant pointing game, PRO, original resolution, fused layers -------------------
def test_pointing_game_tolerates_a_peak_within_the_radius_only():
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[30:34, 30:34] = True
    near = torch.zeros(64, 64)
    near[30, 43] = 1.0  # 10 px right of the mask's edge (column 33)
    far = torch.zeros(64, 64)
    far[30, 53] = 1.0  # 20 px
    assert not pointing_hit(near, mask) and pointing_hit(near, mask, radius_px=15)
    assert not pointing_hit(far, mask, radius_px=15) and pointing_hit(far, mask, radius_px=20)
    assert not pointing_hit(torch.ones(64, 64), mask, radius_px=15)  # a flat map still points nowhere
    scores, _ = localisation_scores([near, far], [mask, mask], radius_px=15)
    assert scores.pointing_game == pytest.approx(0.5)


def test_pro_averages_regions_so_one_large_defect_does_not_dominate():
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[0:32, 0:32] = True  # large region: 1024 px
    mask[50:52, 50:52] = True  # small region: 4 px
    perfect, _ = localisation_scores([mask.float()], [mask])
    assert perfect.pro == pytest.approx(1.0) and perfect.n_regions == 2
    large_only = torch.where(mask & (torch.arange(64)[:, None] < 40), 1.0, 0.0)
    large_only[50:52, 50:52] = 0.0
    scores, _ = localisation_scores([large_only], [mask])
    # pixel-wise the map finds 1024 / 1028 of the defect; per region it finds one of two: the
    # small region's overlap rises only with the FPR (linearly from 0 to 1), so the normalised
    # area to FPR 0.3 is the mean of 1 and (0 + 0.3) / 2
    assert scores.pro == pytest.approx((1.0 + 0.15) / 2, abs=0.01)
    assert scores.pixel_auroc > 0.99
    grid = torch.zeros(64, 64, dtype=torch.bool)
    for top in range(2, 64, 8):
        for left in range(2, 64, 8):
            grid[top:top + 4, left:left + 4] = True  # 64 regions of 16 px
    torch.manual_seed(0)
    random, _ = localisation_scores([torch.rand(64, 64)], [grid], fpr_limit=0.3)
    assert random.n_regions == 64 and random.pro == pytest.approx(0.15, abs=0.02)  # chance: fpr_limit / 2


def test_scores_are_computed_at_the_original_resolution(tmp_path):
    """A 120 px photo seen at 24 px: the thin defect keeps its 1-px width (area share 1/120) and
    the pointing radius is in the photo's pixels."""
    from PIL import Image

    from defect_detection.data.geometry import Square
    from defect_detection.data.records import ImageRecord
    from defect_detection.explain.report import original_resolution_scores

    mask = np.zeros((120, 120), np.uint8)
    mask[60, :] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    record = ImageRecord(path=str(tmp_path / "img.png"), label=1, category="c", defect_type="line",
                         mask_path=str(tmp_path / "m.png"))
    prepared = torch.zeros(24, 24)
    prepared[15, 10] = 1.0  # ~ row 77 of the photo: 17 px from the line (3 prepared px)
    kwargs = {"records": [record], "geometry": Square(size=(24, 24)), "hw_of": lambda i: (120, 120)}
    scores, _ = original_resolution_scores({0: prepared}, radius_px=15, **kwargs)
    assert scores.mask_area_share == pytest.approx(1 / 120)
    assert scores.pointing_game == 0.0
    assert original_resolution_scores({0: prepared}, radius_px=20, **kwargs)[0].pointing_game == 1.0
    Image.fromarray(mask[:60]).save(tmp_path / "m.png")
    with pytest.raises(UserError, match="m.png is 120 x 60 px"):
        original_resolution_scores({0: prepared}, **kwargs)


def test_fused_layers_share_one_forward_pass_and_fuse_each_layers_map():
    from defect_detection.explain.gradcam import fuse_maps

    torch.manual_seed(0)
    net = _TinyCNN()
    x = torch.randn(6, 3, 32, 32)
    coarse = compute_cams(net, "net.features.4", x).maps
    fine = compute_cams(net, "net.features.1", x).maps
    calls = []
    hook = net.features[0].register_forward_hook(lambda *_: calls.append(1))
    fused = compute_cams(net, ["net.features.1", "net.features.4"], x, batch_size=3)
    hook.remove()
    assert len(calls) == 2  # one forward per batch of 3, for both layers
    assert torch.allclose(fused.maps, fuse_maps([fine, coarse], "mean"), atol=1e-5)
    product = compute_cams(net, ["net.features.1", "net.features.4"], x, fusion="product").maps
    assert torch.allclose(product, fuse_maps([fine, coarse], "product"), atol=1e-5)
    assert torch.allclose(product.flatten(1).amax(1), torch.ones(6))
    with pytest.raises(UserError, match="explain.fusion"):
        compute_cams(net, ["net.features.1", "net.features.4"], x, fusion="max")


def test_every_backbone_config_names_grad_cam_layers_of_its_network():
    from defect_detection.config import config_dir
    from defect_detection.explain.gradcam import layer_names
    from defect_detection.models.backbones import build_network

    for path in sorted((config_dir() / "backbone").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        if OmegaConf.is_missing(cfg, "name"):  # the timm template: the user names model and layer
            continue
        layers = layer_names(OmegaConf.to_container(cfg, resolve=True)["gradcam_layer"])
        assert layers, path
        net = build_network(cfg.name, pretrained=False)
        for layer in layers:
            resolve_layer(net, layer)
