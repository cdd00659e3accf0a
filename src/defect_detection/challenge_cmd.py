"""`defect-challenge`: a retrained model against the champion on the same parts (pipeline/challenge.py)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from defect_detection.config import CONFIG_DIR, command, exit_on_user_error


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="challenge")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from defect_detection.api import challenge

    result = challenge(config=cfg)
    print(result.table.to_string(index=False))
    print(f"page: {result.page}")


cli = command(main)  # the console script (pyproject.toml): --version, else the Hydra app

if __name__ == "__main__":
    cli()
