"""Out-of-fold scores over train+val for threshold=cross_val: the fold models trained here.

With a 60/20/20 split the threshold is chosen on the 20 % val images only; k fold models, each
trained with the run's own recipe on the other k-1 folds of train+val, score the fold they did not
see, so the threshold is chosen on every non-test image. Test images are never touched. Each fold
model selects its checkpoint and stops early on its held-out fold, as the final model does on val
(a mild optimism, shared with the final model's val scores); temperature is 1 for fold models.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from defect_detection.data.splits import Split
from defect_detection.evaluation.cross_val import folds
from defect_detection.evaluation.scores import score_frame
from defect_detection.schema import data_settings

log = logging.getLogger(__name__)


def out_of_fold_scores(cfg: DictConfig, split: Split | None = None) -> pd.DataFrame:
    """Scores of every train+val image by the fold model that did not train on it (column `fold`)."""
    return fold_scores(cfg, split)[0]


def fold_scores(cfg: DictConfig, split: Split | None = None,
                score_test: bool = False) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Out-of-fold scores and, with score_test, every fold model's scores of the test split (one
    row per fold and test image), which an ensemble of the k fold models would average."""
    import pytorch_lightning as pl

    from defect_detection.data.validate import screened_records
    from defect_detection.models.checkpointing import AtomicCheckpointIO
    from defect_detection.models.families import family
    from defect_detection.pipeline.builders import build_datamodule, build_module, detector_name

    if split is None:
        records, _ = screened_records(data_settings(cfg.data))
        split = instantiate(cfg.split.make)(records)
    k = int(cfg.threshold.get("folds", 3))
    parts = folds(list(split.train) + list(split.val), k, int(cfg.seed))
    frames, tests = [], []
    for i, held_out in enumerate(parts):
        fold_cfg = cfg.copy()
        OmegaConf.update(fold_cfg, "paths.output_dir", str(Path(cfg.paths.output_dir) / "cv" / f"fold{i}"))
        train = [r for j, p in enumerate(parts) if j != i for r in p]
        fold_split = Split(train=train, val=held_out, test=list(split.test if score_test else held_out))
        pl.seed_everything(int(cfg.seed) + 1 + i, workers=True)
        datamodule = build_datamodule(fold_cfg, fold_split)
        module = build_module(fold_cfg, datamodule.class_counts("train"))
        callbacks = [instantiate(c) for name, c in fold_cfg.get("callbacks", {}).items()
                     if c and name != "progress_bar"]
        trainer = instantiate(fold_cfg.trainer, logger=False, callbacks=callbacks,
                              plugins=[AtomicCheckpointIO()], enable_progress_bar=False,
                              **family(detector_name(fold_cfg)).trainer_values(fold_cfg.detector))
        trainer.fit(module, datamodule=datamodule, weights_only=True)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.validate(module, datamodule=datamodule, ckpt_path=best or None, verbose=False,
                         weights_only=True)
        frames.append(score_frame(module.outputs["val"], datamodule.records("val")).assign(fold=i))
        if score_test:
            trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False,
                         weights_only=True)
            tests.append(score_frame(module.outputs["test"], datamodule.records("test")).assign(fold=i))
        log.info("cross_val: fold %d/%d scored %d held-out images", i + 1, k, len(held_out))
    return pd.concat(frames, ignore_index=True), (pd.concat(tests, ignore_index=True) if tests else None)
