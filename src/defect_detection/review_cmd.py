"""`defect-review`: the review queue on a local web page, or the judged parts exported as a dataset.

What it serves and writes: pipeline/review.py, monitoring/review.py, monitoring/review_app.py."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from defect_detection.config import CONFIG_DIR, command, exit_on_user_error


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="review")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from defect_detection.api import review

    review(config=cfg)


cli = command(main)  # the console script (pyproject.toml): --version, else the Hydra app

if __name__ == "__main__":
    cli()
