"""`defect-monitor`: is the line still what the model was validated on? Exit 3 on an alarm.

What it checks and logs: pipeline/monitor.py; the checks: monitoring/checks.py."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from defect_detection.config import CONFIG_DIR, command, exit_on_user_error

ALARM_EXIT = 3


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="monitor")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from defect_detection.api import monitor

    if monitor(config=cfg).alarm:
        raise SystemExit(ALARM_EXIT)


cli = command(main)  # the console script (pyproject.toml): --version, else the Hydra app

if __name__ == "__main__":
    cli()
