"""scripts/compare_recipes.py: the table's statistics, and one tiny real comparison."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import load_script


def _script():
    return load_script("compare_recipes")


def _row(recipe, seed, auroc, recall, fp, fn):
    return {"recipe": recipe, "seed": seed, "test/auroc": auroc, "test/recall": recall, "test/fp": fp,
            "test/fn": fn, "val/auroc": 1.0, "val/margin": 1.5, "threshold": 0.5, "epochs": 3,
            "seconds": 10.0, "run_id": "r"}


def test_table_gives_mean_std_and_worst_case_per_recipe():
    cr = _script()
    args = cr.parse_args(["--seeds", "0", "1", "--recipes", "seed_recipe", "default"])
    rows = [_row("seed_recipe", 0, 0.9, 0.5, 2, 4), _row("seed_recipe", 1, 0.8, 0.7, 0, 3),
            _row("default", 0, 1.0, 1.0, 0, 0), _row("default", 1, 1.0, 1.0, 0, 0)]
    text = cr.markdown(args, rows, "python scripts/compare_recipes.py --seeds 0 1", 120.0)
    assert "`python scripts/compare_recipes.py --seeds 0 1`" in text and "2.0 min" in text
    seed_line = next(line for line in text.splitlines() if line.startswith("| seed_recipe | 0.850"))
    cells = [c.strip() for c in seed_line.split("|")[1:-1]]
    # auroc mean ± std, worst (min); recall; fp worst = max; fn worst = max
    assert cells[1:3] == ["0.850 ± 0.071", "0.800"]
    assert cells[3:5] == ["0.600 ± 0.141", "0.500"]
    assert cells[5:7] == ["1.0 ± 1.4", "2.0"] and cells[7:9] == ["3.5 ± 0.7", "4.0"]
    assert sum(line.startswith("| default | ") for line in text.splitlines()) == 3  # summary + 2 seeds


def test_flips_count_test_images_decided_otherwise_than_by_the_first_recipe():
    import pandas as pd

    cr = _script()
    scores = pd.DataFrame({"path": ["a", "b", "c"], "p_defect": [0.9, 0.4, 0.6]})
    first = cr.test_decisions({"scores": {"test": scores}, "threshold": 0.5})
    assert first == {"a": True, "b": False, "c": True}
    other = cr.test_decisions({"scores": {"test": scores}, "threshold": 0.65})
    assert cr.flips(other, first) == 1.0  # c: rejected at 0.5, passed at 0.65
    assert cr.flips(None, first) != cr.flips(None, first)  # unknown: NaN, shown as '-'
    args = cr.parse_args(["--seeds", "0", "--recipes", "default", "bf16:trainer.precision=bf16-mixed"])
    rows = [_row("default", 0, 1.0, 1.0, 0, 0), {**_row("bf16", 0, 1.0, 1.0, 0, 0), "test/flips": 2.0}]
    text = cr.markdown(args, rows, "cmd", 1.0)
    assert "test flips vs first recipe mean ± std" in text
    summary = next(line for line in text.splitlines() if line.startswith("| default | 1.000"))
    assert summary.endswith("| - | - | 10 |")
    assert "| bf16 | 0 | 1.0000 | 1.000 | 0 | 0 | 0.5000 | 1.0000 | 1.50 | 3 | 2 | 10 | r |" in text
    assert "| default | 0 | 1.0000 | 1.000 | 0 | 0 | 0.5000 | 1.0000 | 1.50 | 3 | - | 10 | r |" in text


@pytest.mark.slow
def test_tiny_comparison_runs_both_recipes_and_logs_them(tmp_path, synthetic_root):
    cr = _script()
    out = tmp_path / "cmp.md"
    cr.main(["--data-root", str(synthetic_root), "--categories", "disc", "--seeds", "0",
             "--recipes", "seed_recipe", "default", "--out", str(out),
             f"paths.root_dir={tmp_path}", "data.image_size=64", "data.batch_size=8", "trainer.max_epochs=1",
             "data.cache=memory"])
    text = out.read_text()
    assert "| seed_recipe | 0 |" in text and "| default | 0 |" in text
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("recipe-comparison")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("recipe")]
    assert {r.data.tags["recipe"] for r in children} == {"seed_recipe", "default"}
    assert all(r.info.status == "FINISHED" for r in runs)
    seed_run = next(r for r in children if r.data.tags["recipe"] == "seed_recipe")
    assert seed_run.data.params["optimizer.lr"] == "3e-05"
    assert Path(out).is_file()


def test_default_recipe_and_seed_overlays_pin_what_they_claim(cfg_factory):
    default = cfg_factory(fast=False)
    assert default.optimizer._target_ == "torch.optim.AdamW" and default.optimizer.lr == 3e-4
    assert default.scheduler._target_.endswith("CosineAnnealingLR") and default.trainer.max_epochs == 12
    assert default.callbacks.early_stopping.monitor == "val/loss" == default.monitor.metric
    assert default.augmentation.name == "minimal" and default.loss.name == "weighted_ce"
    for name in ("seed_recipe", "seed_protocol"):
        cfg = cfg_factory(f"experiment={name}", fast=False)
        assert cfg.optimizer._target_ == "torch.optim.Adam"
        assert cfg.optimizer.lr == 3e-5 and cfg.optimizer.weight_decay == 1e-4
        assert cfg.scheduler is None and cfg.trainer.max_epochs == 8 and cfg.callbacks.early_stopping is None
        assert list(cfg.freezing.trainable) == ["last_stage", "head"] and cfg.data.batch_size == 32
    honest = cfg_factory("experiment=seed_recipe", fast=False)
    assert honest.split.name == "stratified" and honest.backbone.name == "efficientnet_lite0"
    assert honest.threshold.policy == "max_recall_at_fp" and honest.threshold.max_fp == 0
