"""Hydra/OmegaConf glue: where the configs live and the resolvers they use."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from defect_detection import project_root

CONFIG_DIR = str(project_root() / "conf")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(project_root()))


def config_dir() -> Path:
    path = Path(CONFIG_DIR)
    if not (path / "train.yaml").is_file():
        raise RuntimeError(f"Config folder not found at {path}: install the package from its "
                           "checkout with `pip install -e .` so conf/ sits beside src/.")
    return path


register_resolvers()
