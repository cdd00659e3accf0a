"""`defect-promote`: register the best finished run's model and move the `champion` alias to it."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from defect_detection.config import CONFIG_DIR, command, exit_on_user_error


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="promote")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from defect_detection.api import promote

    promote(config=cfg)


cli = command(main)  # the console script (pyproject.toml): --version, else the Hydra app

if __name__ == "__main__":
    cli()
