"""`defect-eval`: scores a saved model with its own threshold and logs a run tagged with the source."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from omegaconf import DictConfig

from defect_detection import UserError
from defect_detection.config import CONFIG_DIR
from defect_detection.models.backbones import build_network
from defect_detection.models.inference import Predictor, save_bundle
from defect_detection.pipeline.evaluate import evaluate

# The data of the `debug=fast` train overlay, so an eval composes the same images and split.
FAST_DATA = ("data.image_size=64", "data.batch_size=8", "data.records.n_train_good=6",
             "data.records.n_test_good=4", "data.records.n_per_defect=3", "data.records.image_size=64")


def compose_eval(root: Path, *overrides: str, out: str = "eval") -> DictConfig:
    """The real eval config with paths under `root`, the report under root/<out>."""
    base = [f"paths.root_dir={root}", f"paths.output_dir={root}/{out}", *FAST_DATA]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("eval", overrides=[*base, *overrides])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> tuple[Path, Path]:
    """(project root, an untrained Lite0 bundle with a distinctive threshold and temperature)."""
    root = tmp_path_factory.mktemp("evalproject")
    net = build_network("efficientnet_lite0", pretrained=False)
    path = save_bundle(root / "bundle.pt", net, backbone="efficientnet_lite0", image_size=64,
                       mean=[0.498] * 3, std=[0.502] * 3, threshold=0.37, threshold_policy="f1_max",
                       temperature=2.0)
    return root, path


def _tracking(cfg: DictConfig) -> MlflowClient:
    return MlflowClient(cfg.logger.tracking_uri)


def test_evaluate_bundle_writes_tagged_run_and_local_report(bundle):
    root, path = bundle
    cfg = compose_eval(root, f"model={path}")
    result = evaluate(cfg)
    run = _tracking(cfg).get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["source_model_uri"] == str(path.resolve()) and tags["source_kind"] == "bundle"
    assert tags["task"] == "evaluate" and tags["subset"] == "test" and tags["leaky_protocol"] == "False"
    assert metrics["test/threshold"] == pytest.approx(0.37)
    for name in ("test/auroc", "test/ap", "test/f1", "test/accuracy", "test/precision", "test/recall",
                 "test/fp", "test/fn"):
        assert name in metrics, name
    local = Path(result["report_dir"])
    table = pd.read_csv(local / "predictions.csv")
    assert (table.split == "test").all() and len(table) == metrics["test/n"]
    assert ((table.p_defect >= 0.37).astype(int) == table.pred).all()
    # the temperature stored with the model is applied, as Predictor applies it everywhere
    assert np.allclose(Predictor(path).p_defect(list(table.path[:4])), table.p_defect[:4], atol=1e-6)
    logged = {a.path for a in _tracking(cfg).list_artifacts(run.info.run_id, "reports")}
    assert {f"reports/{f}" for f in ("predictions.csv", "summary.json", "confusion_matrix.png")} <= logged
    assert (cfg.model in run.data.params["model"]) and "config.yaml" in {
        a.path for a in _tracking(cfg).list_artifacts(run.info.run_id)}
    page = Path(_tracking(cfg).download_artifacts(run.info.run_id, "report.html", str(root / "page")))
    html = page.read_text()
    assert result["report_uri"].endswith("/report.html")
    assert "Evaluation" in html and 'id="threshold">0.3700<' in html and str(path.resolve()) in html
    assert "Not in this run: data/" in html  # defect-eval logs no data summary: a note, not an error


def test_evaluate_mlflow_model_uri_is_tagged_with_its_run(bundle):
    from defect_detection.tracking.pyfunc import log_pyfunc

    root, path = bundle
    cfg = compose_eval(root, "model=placeholder", "subset=all", "override_threshold=0.5")
    mlflow.set_tracking_uri(cfg.logger.tracking_uri)
    mlflow.set_experiment("source-models")
    with mlflow.start_run() as source:
        log_pyfunc(path)
    cfg.model = f"runs:/{source.info.run_id}/model"
    result = evaluate(cfg)
    run = _tracking(cfg).get_run(result["run_id"])
    assert run.data.tags["source_run_id"] == source.info.run_id
    assert run.data.tags["source_model_uri"] == cfg.model
    assert run.data.tags["threshold_source"] == "command line"
    assert run.data.metrics["all/threshold"] == pytest.approx(0.5)
    summary = result["summary"]
    assert summary["n_images"]["total"] == 6 * 3 + 4 * 3 + 3 * 3 * 3  # every synthetic image
    assert summary["threshold"]["policy"] == "override"


def test_evaluate_seed_split_is_flagged_leaky(bundle):
    root, path = bundle
    cfg = compose_eval(root, f"model={path}", "split=seed", "logger=none", out="eval-seed")
    result = evaluate(cfg)
    assert result["run_id"] is None and result["summary"]["leaky_protocol"] is True
    sweep = pd.read_csv(Path(result["report_dir"]) / "threshold_sweep.csv")
    assert sweep.leaky_protocol.all()


def test_evaluate_user_errors(bundle, tmp_path):
    root, path = bundle
    with pytest.raises(UserError, match="Name the model"):
        evaluate(compose_eval(root, "logger=none"))
    with pytest.raises(UserError, match="subset="):
        evaluate(compose_eval(root, f"model={path}", "subset=holdout", "logger=none"))
    with pytest.raises(UserError, match="not found"):
        evaluate(compose_eval(root, f"model={tmp_path / 'missing.pt'}", "logger=none"))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """(project root, a tiny finished training run) with the k=0 default policy."""
    from defect_detection.pipeline.fit import train
    from tests.conftest import compose_train

    root = tmp_path_factory.mktemp("repickproject")
    cfg = compose_train(root, "explain=none", "log_data_summary=false")
    return root, cfg, train(cfg)


def test_repick_threshold_on_saved_val_scores_logs_a_new_run_and_model(trained_run, synthetic_root):
    from defect_detection.evaluation.thresholds import choose_threshold
    from defect_detection.models.loading import load_predictor

    root, train_cfg, result = trained_run
    uri = f"runs:/{result['run_id']}/model"
    cfg = compose_eval(root, f"model={uri}", "threshold=fp_rate_bound", "threshold.max_fp_rate=0.2",
                       "threshold.estimator=exp_tail", f"seed={train_cfg.seed}")
    out = evaluate(cfg)
    client = _tracking(cfg)
    val = pd.read_csv(client.download_artifacts(result["run_id"], "scores/val_scores.csv"))
    expected = choose_threshold("fp_rate_bound", val.p_defect.to_numpy(), val.label.to_numpy(),
                                max_fp_rate=0.2, estimator="exp_tail")
    assert expected.value != pytest.approx(result["threshold"])  # a different operating point
    run = client.get_run(out["run_id"])
    assert run.info.run_id != result["run_id"] and run.data.tags["source_run_id"] == result["run_id"]
    assert run.data.metrics["test/threshold"] == pytest.approx(expected.value)
    assert run.data.tags["threshold_policy"] == "fp_rate_bound"
    assert "val scores of run" in run.data.tags["threshold_source"]
    assert "threshold/fp_rate_upper_bound" in run.data.metrics
    mlflow.set_tracking_uri(cfg.logger.tracking_uri)
    repicked = load_predictor(f"runs:/{out['run_id']}/model")
    original = load_predictor(uri)
    assert repicked.threshold == pytest.approx(expected.value)
    assert original.threshold == pytest.approx(result["threshold"])  # the training run is untouched
    image = next(Path(synthetic_root).rglob("*.png"))
    assert repicked.p_defect([image])[0] == pytest.approx(original.p_defect([image])[0], abs=1e-6)


def test_repick_errors_name_the_fix(trained_run, bundle):
    root, train_cfg, result = trained_run
    _, path = bundle
    with pytest.raises(UserError, match="names no MLflow run"):
        evaluate(compose_eval(root, f"model={path}", "threshold=fp_rate_bound"))
    with pytest.raises(UserError, match="only a run trained with threshold=cross_val"):
        evaluate(compose_eval(root, f"model=runs:/{result['run_id']}/model", "threshold=cross_val"))
    with pytest.raises(UserError, match="not both"):
        evaluate(compose_eval(root, f"model={path}", "threshold=fixed", "override_threshold=0.3"))
