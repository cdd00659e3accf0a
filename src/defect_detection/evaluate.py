"""`defect-eval`: score a saved model on any data config and write the test report to a new run.

    defect-eval model=runs:/<run_id>/model                        the run's own test split
    defect-eval model=models:/defect-classifier@champion subset=new   images added since
    defect-eval model=runs:/<run_id>/model threshold=fp_rate_bound    re-pick on its saved val scores

What it scores and logs: pipeline/evaluate.py."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from defect_detection.config import CONFIG_DIR, command, exit_on_user_error


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from defect_detection.api import evaluate

    evaluate(config=cfg)


cli = command(main)  # the console script (pyproject.toml): --version, else the Hydra app

if __name__ == "__main__":
    cli()
