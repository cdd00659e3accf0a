"""The auto recipe's entry from `defect-train`: candidates composed from the real configs with
the user's own overrides, each trained by the real train()."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from defect_detection.auto.runner import run_auto
from defect_detection.config import CONFIG_DIR


def compose_train(overrides: Sequence[str]) -> DictConfig:
    if GlobalHydra.instance().is_initialized():  # inside defect-train's @hydra.main
        return compose("train", overrides=list(overrides))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def run_auto_recipe(cfg: DictConfig, user_overrides: Sequence[str]) -> dict:
    """`user_overrides`: what the user typed (Hydra's task overrides); each candidate adds its own
    and writes under <output_dir>/<candidate>."""
    from defect_detection.pipeline.fit import train
    from defect_detection.schema import validate_train_config

    validate_train_config(cfg)  # e.g. auto.budget_minutes <= 0, before any candidate
    out = Path(cfg.paths.output_dir)
    base = [o for o in user_overrides if not o.startswith("paths.output_dir=")]

    def compose_one(label: str, overrides: list[str]) -> DictConfig:
        return compose_train([*overrides, f"run_name={label}", f"paths.output_dir={out / label}"])

    return run_auto(cfg, base, lambda c_cfg: train(c_cfg, base), compose_one)
