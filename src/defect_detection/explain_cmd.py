"""`defect-explain`: Grad-CAM overlays for a folder, glob or list of images with a trained model."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from defect_detection.config import CONFIG_DIR, command, exit_on_user_error


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="explain_cmd")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from defect_detection.api import explain

    explain(config=cfg)


cli = command(main)  # the console script (pyproject.toml): --version, else the Hydra app

if __name__ == "__main__":
    cli()
