"""Every option of every config group composes, and its objects instantiate."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from defect_detection.config import CONFIG_DIR
from defect_detection.data.transforms import build_train_transform
from defect_detection.models.losses import build_loss
from defect_detection.pipeline.builders import build_module

GROUPS = ["data", "split", "backbone", "freezing", "loss", "threshold", "augmentation", "optimizer",
          "scheduler", "trainer", "logger", "callbacks", "calibration", "explain", "experiment", "debug"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


CASES = [(g, o) for g in GROUPS for o in _options(g)]


def test_every_group_has_options():
    for group in GROUPS:
        assert _options(group), group


@pytest.mark.parametrize("group, option", CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_instantiates(cfg_factory, group, option, tmp_path):
    extra = {("data", "folder"): ["data.root=/tmp/folder"],
             ("backbone", "timm"): ["backbone.name=resnet10t", "freezing=none"]}.get((group, option), [])
    cfg = cfg_factory(f"{group}={option}", *extra)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    if not cfg.backbone.name.startswith("efficientnet_lite"):
        cfg.backbone.pretrained = False  # only the Lites' ImageNet weights ship offline; tested elsewhere
    module = build_module(cfg, (10, 5))
    optimizer = module.configure_optimizers()
    assert optimizer or cfg.detector.name == "patchcore"  # PatchCore trains by no gradient
    image = torch.randint(0, 255, (3, 80, 80), dtype=torch.uint8)
    out = build_train_transform(cfg.augmentation, cfg.data.image_size, cfg.backbone.mean,
                                cfg.backbone.std)(image)
    assert out.shape == (3, cfg.data.image_size, cfg.data.image_size) and out.dtype == torch.float32
    build_loss(cfg.loss.name, (10, 5), cfg.loss.get("weights"))
    assert callable(instantiate(cfg.split.make))
    for callback in cfg.callbacks.values():
        if callback:
            instantiate(callback)
    if cfg.get("logger"):
        assert instantiate(cfg.logger, _partial_=True)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_cfg["accelerator"] == "gpu" and not torch.cuda.is_available():
        return
    instantiate(trainer_cfg, logger=False, enable_progress_bar=False)


def test_seed_protocol_overlay_states_the_seed(cfg_factory):
    cfg = cfg_factory("experiment=seed_protocol", fast=False)
    assert cfg.split.name == "seed" and cfg.backbone.name == "resnet18"
    assert cfg.threshold.policy == "fixed" and cfg.threshold.value == 0.2
    assert cfg.optimizer.lr == 3e-5 and cfg.optimizer.weight_decay == 1e-4
    assert cfg.trainer.max_epochs == 8 and cfg.data.batch_size == 32
    assert list(cfg.freezing.trainable) == ["last_stage", "head"]
    # the overlay's own top-level keys win over train.yaml's (its _self_ comes before the overlays)
    assert cfg.experiment_name == "seed-protocol"
    assert cfg_factory("experiment=demo", fast=False).experiment_name == "demo"


def test_tracking_uri_is_absolute_and_env_overridable(cfg_factory, monkeypatch, tmp_path):
    cfg = cfg_factory()
    assert cfg.logger.tracking_uri == f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert cfg_factory().logger.tracking_uri == "http://127.0.0.1:5999"


def test_entry_points_turn_user_errors_into_one_line_and_keep_other_errors():
    from defect_detection import UserError
    from defect_detection.config import exit_on_user_error

    @exit_on_user_error
    def task(value: str) -> str:
        if value == "bad":
            raise UserError("data.root=/nowhere does not exist; point it at your images.")
        if value == "bug":
            raise KeyError(value)
        return value

    assert task("ok") == "ok" and task.__wrapped__.__name__ == "task"  # Hydra unwraps to find the module
    with pytest.raises(SystemExit) as exit_info:
        task("bad")
    assert exit_info.value.code == "error: data.root=/nowhere does not exist; point it at your images."
    with pytest.raises(KeyError):  # a bug keeps its traceback
        task("bug")
