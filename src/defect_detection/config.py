"""Hydra/OmegaConf glue: where the configs live and the resolvers they use."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from defect_detection import project_root

CONFIG_DIR = str(project_root() / "conf")


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(project_root()))
    if not OmegaConf.has_resolver("auto_num_workers"):  # data.num_workers: 0 on CPU, more with a GPU
        OmegaConf.register_new_resolver("auto_num_workers", _auto_num_workers)
    if not OmegaConf.has_resolver("cuda_available"):  # data.pin_memory: only useful with a GPU
        OmegaConf.register_new_resolver("cuda_available", _cuda_available)


def _auto_num_workers() -> int:
    from defect_detection.data.datamodule import auto_num_workers

    return auto_num_workers()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def config_dir() -> Path:
    path = Path(CONFIG_DIR)
    if not (path / "train.yaml").is_file():
        raise RuntimeError(f"Config folder not found at {path}: install the package from its "
                           "checkout with `pip install -e .` so conf/ sits beside src/.")
    return path


register_resolvers()
