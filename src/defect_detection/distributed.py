"""How a multi-process (DDP) run gets its processes, checked before it starts.

Lightning's `strategy=ddp` re-runs the *current command* once per extra device. From
`defect-train` that is right; from pytest, a notebook or a multirun trial (joblib, submitit
local) it would re-run the wrong thing, and `ddp_spawn` loses the per-sample outputs that the
threshold is chosen on. Processes started by torchrun or SLURM (one task per device) are fine.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.strategies import DDPStrategy

from defect_detection.base import UserError


def check_launch(trainer: pl.Trainer) -> None:
    """Raise a UserError when this trainer's DDP processes would be started the wrong way."""
    strategy = trainer.strategy
    if trainer.world_size <= 1 or not isinstance(strategy, DDPStrategy):
        return
    if getattr(strategy, "_start_method", "popen") != "popen":
        raise UserError("trainer.strategy=ddp_spawn: spawned processes do not hand the "
                        "per-image val scores back, so no threshold can be chosen. Use trainer=ddp "
                        "(or trainer.strategy=ddp).")
    if strategy.cluster_environment.creates_processes_externally:
        return  # torchrun, SLURM tasks, or the rank > 0 copies Lightning started
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        raise UserError("trainer.devices > 1 with strategy ddp re-runs the command line once per "
                        "device: start it with `defect-train trainer=... ` (or torchrun), not from "
                        "Python/a notebook.")
    if HydraConfig.get().mode.name == "MULTIRUN":
        raise UserError("DDP inside a multirun trial needs its processes from SLURM: use "
                        "hydra/launcher=slurm with hydra.launcher.gpus_per_node = trainer.devices; "
                        "with local launchers keep trainer.devices=1 per trial.")
