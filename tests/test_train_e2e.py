"""A real (tiny) training run leaves a complete MLflow run behind."""

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from defect_detection.pipeline.fit import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.conftest import compose_train

    root = tmp_path_factory.mktemp("project")
    cfg = compose_train(root, "trainer.max_epochs=2", "threshold=f1_max")
    result = train(cfg)
    return cfg, result


def test_run_is_finished_with_params_metrics_and_artifacts(trained):
    cfg, result = trained
    client = MlflowClient(cfg.logger.tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone.name"] == "efficientnet_lite0"
    assert run.data.params["optimizer.lr"] == "0.0003"  # the default recipe (conf/optimizer/adamw_3e4.yaml)
    assert run.data.tags["dataset"] == "synthetic" and run.data.tags["backbone"] == "efficientnet_lite0"
    assert run.data.tags["git_commit"]
    assert len(client.get_metric_history(run.info.run_id, "val/auroc")) >= 2  # per epoch
    assert "val/margin" in run.data.metrics  # the threshold's room on val (log-odds gap)
    for name in ("test/auroc", "test/recall", "test/fp", "test/threshold", "train/loss_epoch"):
        assert name in run.data.metrics, name
    assert run.data.metrics["test/threshold"] == pytest.approx(result["threshold"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "checkpoints", "reports"} <= artifacts
    ckpts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
    assert any(p.endswith(".ckpt") for p in ckpts)
    config_text = client.download_artifacts(run.info.run_id, "config.yaml")
    assert "efficientnet_lite0" in open(config_text).read()


def test_run_logs_a_self_contained_report_html(trained, tmp_path):
    import re

    cfg, result = trained
    client = MlflowClient(cfg.logger.tracking_uri)
    html = open(client.download_artifacts(result["run_id"], "report.html", str(tmp_path))).read()
    run = client.get_run(result["run_id"])
    assert result["run_id"] in html and run.data.tags["git_commit"] in html
    assert f'id="kpi-auroc"><b>{run.data.metrics["test/auroc"]:.4f}<' in html
    assert f'id="threshold">{result["threshold"]:.4f}<' in html
    for section in ('id="warnings"', 'id="decision"', 'id="curves"', 'id="sweep"', 'id="calibration"',
                    'id="groups"', 'id="data"', 'id="maps"', 'id="errors"', 'id="config"'):
        assert section in html, section
    assert "Not in this run" not in html  # a training run has every section
    assert "<script" not in html and not re.search(r'(src|href)="(https?:)?//', html)
    assert len(re.findall(r'src="data:image/', html)) >= 12  # reports, data previews, Grad-CAM galleries


def test_logged_model_predicts_any_batch_size_with_the_logged_threshold(trained, synthetic_root):
    cfg, result = trained
    mlflow.set_tracking_uri(cfg.logger.tracking_uri)
    model = mlflow.pyfunc.load_model(f"runs:/{result['run_id']}/model")
    paths = sorted(str(p) for p in synthetic_root.glob("disc/test/*/*.png"))[:5]
    out = model.predict(pd.DataFrame({"path": paths}))
    assert list(out["path"]) == paths and out["p_defect"].between(0, 1).all()
    assert np.allclose(out["threshold"], result["threshold"])
    assert (out["is_defect"] == (out["p_defect"] >= result["threshold"])).all()
    single = model.predict(np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8))
    assert len(single) == 1
    batch = model.predict([np.zeros((50, 60, 3), np.uint8)] * 3)
    assert len(batch) == 3


def test_checkpoint_and_logged_model_decide_identically(trained, synthetic_root):
    from defect_detection.models.loading import load_predictor

    cfg, result = trained
    mlflow.set_tracking_uri(cfg.logger.tracking_uri)
    paths = sorted(str(p) for p in synthetic_root.glob("plate/test/*/*.png"))
    from_model = load_predictor(f"runs:/{result['run_id']}/model")
    from_ckpt = load_predictor(result["best_checkpoint"])
    # the checkpoint was saved before the threshold was chosen; the weights are the same
    assert np.allclose(from_model.p_defect(paths), from_ckpt.p_defect(paths), atol=1e-6)
    assert from_model.threshold == pytest.approx(result["threshold"])


def test_run_logs_val_and_test_scores_and_the_threshold_diagnostics(trained):
    cfg, result = trained
    client = MlflowClient(cfg.logger.tracking_uri)
    run_id = result["run_id"]
    for split in ("val", "test"):
        frame = pd.read_csv(client.download_artifacts(run_id, f"scores/{split}_scores.csv"))
        assert len(frame) == len(result["scores"][split]) > 0
        assert set(frame.label) <= {0, 1} and frame.p_defect.between(0, 1).all()
        assert np.allclose(1 / (1 + np.exp(-frame.log_odds)), frame.p_defect, atol=1e-5)
    tags = client.get_run(run_id).data.tags
    assert tags["threshold_policy"] == "f1_max" and "threshold_fp_rate_upper_bound" in tags
    info = pd.read_json(client.download_artifacts(run_id, "reports/threshold.json"), typ="series")
    assert 0 < info["fp_rate_upper_bound"] <= 1 and "margin" in info and "fragile" in info


def test_cross_val_chooses_on_out_of_fold_scores_of_every_non_test_image(tmp_path):
    from defect_detection.evaluation.thresholds import choose_threshold
    from tests.conftest import compose_train

    cfg = compose_train(tmp_path, "threshold=cross_val", "threshold.folds=2", "explain=none",
                        "log_model=false", "log_data_summary=false")
    result = train(cfg)
    client = MlflowClient(cfg.logger.tracking_uri)
    oof = pd.read_csv(client.download_artifacts(result["run_id"], "scores/oof_scores.csv"))
    n_non_test = len(result["scores"]["val"]) + int(client.get_run(result["run_id"]).data.tags[
        "split_sizes"].split("'train': ")[1].split(",")[0])
    assert len(oof) == oof.path.nunique() == n_non_test and set(oof.fold) == {0, 1}
    test_paths = set(result["scores"]["test"].path)
    assert not test_paths & set(oof.path)
    expected = choose_threshold("fp_rate_bound", oof.p_defect.to_numpy(), oof.label.to_numpy())
    assert result["threshold"] == pytest.approx(expected.value)
    tags = client.get_run(result["run_id"]).data.tags
    assert tags["threshold_policy"] == "cross_val" and "out-of-fold" in tags["threshold_chosen_on"]


def test_fold_models_score_every_test_image_once_each_for_the_ensemble(tmp_path):
    from hydra.utils import instantiate

    from defect_detection.data.validate import screened_records
    from defect_detection.evaluation.cross_val import ensemble_scores
    from defect_detection.pipeline.cross_val import fold_scores
    from defect_detection.schema import data_settings
    from tests.conftest import compose_train

    cfg = compose_train(tmp_path, "threshold=cross_val", "threshold.folds=2", "explain=none",
                        "log_model=false", "log_data_summary=false", "trainer.max_epochs=1")
    oof, tests = fold_scores(cfg, score_test=True)
    split = instantiate(cfg.split.make)(screened_records(data_settings(cfg.data))[0])
    test_paths = sorted(r.path for r in split.test)
    assert set(tests.fold) == {0, 1}
    for _, g in tests.groupby("fold"):
        assert sorted(g.path) == test_paths
    assert not set(test_paths) & set(oof.path)
    ens = ensemble_scores(tests)
    assert sorted(ens.path) == test_paths and ens.p_defect.between(0, 1).all()
