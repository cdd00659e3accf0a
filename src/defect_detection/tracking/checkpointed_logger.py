"""An MLFlowLogger whose metric history matches what the checkpoints hold.

Lightning finishes the batch in progress after SIGTERM and logs its step metrics; the resume then
reruns that batch from last.ckpt and logs the same step again, so the run showed two values at one
step. Metrics are held back and written when a checkpoint is saved; on a stop, those of steps the
last checkpoint has not reached (what the resume reruns) are dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only


class CheckpointedMLFlowLogger(MLFlowLogger):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._held: list[tuple[dict[str, float], int | None]] = []
        self._saved_step: int | None = None  # global step of the newest checkpoint

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self._held.append((dict(metrics), step))

    def _flush(self, below: int | None = None, drop_rest: bool = False) -> None:
        """Write the held metrics of steps below `below` (all when None); keep or drop the rest."""
        held, self._held = self._held, []
        for metrics, step in held:
            if below is None or step is None or step < below:
                super().log_metrics(metrics, step)
            elif not drop_rest:
                self._held.append((metrics, step))

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        self._saved_step = getattr(checkpoint_callback, "_last_global_step_saved", None)
        self._flush(self._saved_step)
        super().after_save_checkpoint(checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        # a stop after a checkpoint: steps from the checkpoint on are rerun by the resume
        self._flush(self._saved_step if status == "failed" else None, drop_rest=True)
        super().finalize(status)
