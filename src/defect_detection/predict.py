"""`defect-predict`: score a folder or glob with a checkpoint, bundle or MLflow model; write a CSV.

The decision uses the threshold that travels with the model (chosen on validation at training
time), so predict decides exactly as evaluation and serving do (pipeline/predict.py)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from defect_detection.config import CONFIG_DIR, command, exit_on_user_error


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="predict")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from defect_detection.api import predict

    predict(config=cfg)


cli = command(main)  # the console script (pyproject.toml): --version, else the Hydra app

if __name__ == "__main__":
    cli()
