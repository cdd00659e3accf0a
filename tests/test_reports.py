"""The test report: its files agree with each other, with the logged metrics and with the model."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from defect_detection.data.records import ImageRecord
from defect_detection.evaluation.calibration import calibrate, fit_temperature, nll
from defect_detection.evaluation.reports import prediction_table, threshold_sweep, write_report
from defect_detection.evaluation.thresholds import ThresholdChoice

# -- hand-made tables -----------------------------------------------------------------------------


def _records(tmp_path: Path, labels, categories=None, types=None) -> list[ImageRecord]:
    out = []
    for i, label in enumerate(labels):
        path = tmp_path / f"img{i:02d}.png"
        Image.fromarray(np.full((24, 24, 3), 40 * (i % 6), np.uint8)).save(path)
        category = categories[i] if categories else "part"
        dtype = types[i] if types else ("good" if label == 0 else "scratch")
        out.append(ImageRecord(str(path), int(label), category, dtype))
    return out


def _choice(value: float) -> ThresholdChoice:
    return ThresholdChoice(value, "fixed", "val")


@pytest.fixture
def mixed(tmp_path):
    labels = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    p = [0.05, 0.2, 0.45, 0.55, 0.7, 0.35, 0.52, 0.6, 0.8, 0.9, 0.95]  # 2 FP, 1 FN at 0.5
    cats = ["a", "b"] * 5 + ["a"]
    types = ["good"] * 5 + ["scratch", "spot", "scratch", "spot", "scratch", "spot"]
    return prediction_table(_records(tmp_path, labels, cats, types), p, 0.5)


def _read(folder: Path, name: str):
    path = folder / name
    return json.loads(path.read_text()) if name.endswith(".json") else pd.read_csv(path)


def test_report_files_exist_and_agree(mixed, tmp_path):
    out = tmp_path / "reports"
    summary = write_report(mixed, _choice(0.5), out_dir=out)
    for name in summary["files"]:
        assert (out / name).is_file(), name
    for name in ("confusion_matrix.png", "roc_curve.png", "pr_curve.png", "threshold_sweep.png",
                 "score_histogram.png", "reliability_diagram.png", "errors/gallery.png"):
        assert (out / name).stat().st_size > 1000, name
    preds = _read(out, "predictions.csv")
    assert list(preds.columns[:5]) == ["path", "category", "defect_type", "label", "p_defect"]
    assert {"decision", "split"} <= set(preds.columns)
    crosstab = pd.crosstab(preds.label, preds.pred).reindex(index=[0, 1], columns=[0, 1], fill_value=0)
    cm = _read(out, "confusion_matrix.json")
    assert cm["counts"] == crosstab.to_numpy().tolist() == [[3, 2], [1, 5]]
    assert cm["normalised"][0] == pytest.approx([0.6, 0.4])
    m = summary["metrics"]
    assert (m["tn"], m["fp"], m["fn"], m["tp"]) == (3, 2, 1, 5)
    assert m["recall"] == pytest.approx(5 / 6) and m["precision"] == pytest.approx(5 / 7)
    report = _read(out, "classification_report.json")
    assert report["defect"]["support"] == 6 and report["good"]["support"] == 5
    assert report["good"]["recall"] == pytest.approx(3 / 5) and report["accuracy"] == pytest.approx(8 / 11)
    assert "0.7143" in (out / "classification_report.txt").read_text()  # defect precision
    sweep = _read(out, "threshold_sweep.csv")
    assert np.allclose(sweep.threshold, np.arange(1, 20) * 0.05)
    at_half = sweep[np.isclose(sweep.threshold, 0.5)].iloc[0]
    assert (at_half.fp, at_half.fn, at_half.recall) == (2, 1, pytest.approx(5 / 6))
    by_type = _read(out, "recall_by_defect_type.csv").set_index(["category", "defect_type"])
    assert by_type.loc[("b", "scratch"), "recall"] == pytest.approx(2 / 3)  # 0.35 missed, 0.6 and 0.9 found
    assert by_type.loc[("b", "good"), "fp"] == 1 and by_type.n.sum() == len(preds)
    by_cat = _read(out, "recall_by_category.csv").set_index("category")
    assert by_cat.fp.sum() == m["fp"] and by_cat.fn.sum() == m["fn"]
    counts = _read(out, "errors/error_counts.json")
    assert counts["total"] == {"n": 11, "fp": 2, "fn": 1, "errors": 3}
    wrong = _read(out, "errors/misclassified.csv")
    assert set(wrong.outcome) == {"FP", "FN"} and len(wrong) == 3
    assert wrong.p_defect.iloc[0] == pytest.approx(0.7)  # most confidently wrong first
    assert summary["group_recall"]["recall_b_scratch"] == pytest.approx(2 / 3)
    assert summary["leaky_protocol"] is False


def test_sweep_counts_known_values(tmp_path):
    table = prediction_table(_records(tmp_path, [0, 1, 0, 1]), [0.1, 0.3, 0.6, 0.9], 0.5)
    sweep = threshold_sweep(table, [0.05, 0.25, 0.5, 0.95]).set_index("threshold")
    assert sweep.loc[0.05, ["tp", "fp", "fn", "tn"]].tolist() == [2, 2, 0, 0]
    assert sweep.loc[0.25, ["tp", "fp", "fn", "tn"]].tolist() == [2, 1, 0, 1]
    assert sweep.loc[0.5, ["tp", "fp", "fn", "tn"]].tolist() == [1, 1, 1, 1]
    assert sweep.loc[0.95, ["tp", "fp", "precision", "recall", "f1"]].tolist() == [0, 0, 0, 0, 0]


def test_no_errors_gives_an_empty_gallery_not_a_crash(tmp_path):
    table = prediction_table(_records(tmp_path, [0, 0, 1, 1]), [0.1, 0.2, 0.8, 0.9], 0.5)
    summary = write_report(table, _choice(0.5), out_dir=tmp_path / "r")
    assert summary["metrics"]["fp"] == summary["metrics"]["fn"] == 0
    assert (tmp_path / "r" / "errors" / "gallery.png").is_file()
    assert _read(tmp_path / "r", "errors/misclassified.csv").empty


def test_single_class_report_has_no_curves(tmp_path):
    table = prediction_table(_records(tmp_path, [0, 0, 0]), [0.1, 0.6, 0.2], 0.5)
    summary = write_report(table, _choice(0.5), out_dir=tmp_path / "r")
    assert np.isnan(summary["metrics"]["auroc"]) and summary["metrics"]["fp"] == 1
    assert not (tmp_path / "r" / "roc_curve.png").exists()


def test_leaky_report_says_so_everywhere(mixed, tmp_path):
    out = tmp_path / "leaky"
    summary = write_report(mixed, _choice(0.5), out_dir=out, leaky=True)
    assert summary["leaky_protocol"] is True and "LEAKY" in summary["warning"]
    assert _read(out, "threshold_sweep.csv").leaky_protocol.all()
    assert (out / "classification_report.txt").read_text().startswith("LEAKY PROTOCOL")
    assert _read(out, "confusion_matrix.json")["leaky_protocol"] is True


def test_decisions_must_be_made_at_the_reported_threshold(mixed):
    with pytest.raises(ValueError, match="threshold"):
        write_report(mixed, _choice(0.3))


# -- calibration ----------------------------------------------------------------------------------


def _overconfident(n: int = 400, scale: float = 8.0, seed: int = 0):
    """Logits whose margin is `scale` times the true log-odds: right in order, far too sure."""
    g = torch.Generator().manual_seed(seed)
    log_odds = torch.randn(n, generator=g) * 1.5
    labels = (torch.rand(n, generator=g) < torch.sigmoid(log_odds)).long()
    logits = torch.stack([torch.zeros(n), log_odds * scale], 1)
    return logits, labels


def test_temperature_scaling_lowers_nll_of_an_overconfident_model():
    logits, labels = _overconfident()
    result = calibrate("temperature", logits, labels)
    assert result.temperature == pytest.approx(8.0, rel=0.25)  # recovers the over-scaling
    assert result.after["nll"] < result.before["nll"] - 0.5
    assert result.after["ece"] < result.before["ece"]
    held_out, held_labels = _overconfident(seed=1)  # and it generalises to fresh data
    assert nll(held_out, held_labels, result.temperature) < nll(held_out, held_labels)
    assert calibrate("none", logits, labels).temperature == 1.0


def test_temperature_is_left_at_one_when_undefined():
    separated = torch.tensor([[0.0, -2.0], [0.0, -1.0], [0.0, 1.0], [0.0, 3.0]])
    t, warnings = fit_temperature(separated, torch.tensor([0, 0, 1, 1]))
    assert t == 1.0 and "separated" in warnings[0]
    t, warnings = fit_temperature(separated, torch.tensor([1, 1, 1, 1]))
    assert t == 1.0 and "single class" in warnings[0]


# -- a real (tiny) training run --------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from defect_detection.pipeline.fit import train
    from tests.conftest import compose_train

    root = tmp_path_factory.mktemp("reportproject")
    cfg = compose_train(root, "trainer.max_epochs=1", "calibration=temperature", "threshold=f1_max")
    result = train(cfg)
    client = MlflowClient(cfg.logger.tracking_uri)
    folder = Path(client.download_artifacts(result["run_id"], "reports", str(root / "downloaded")))
    return cfg, result, client, folder


def test_training_logs_a_consistent_report(trained):
    cfg, result, client, folder = trained
    run = client.get_run(result["run_id"])
    metrics = run.data.metrics
    preds = pd.read_csv(folder / "predictions.csv")
    cm = json.loads((folder / "confusion_matrix.json").read_text())
    (tn, fp), (fn, tp) = cm["counts"]
    assert (tn, fp, fn, tp) == tuple(int(metrics[f"test/{k}"]) for k in ("tn", "fp", "fn", "tp"))
    assert tp == ((preds.label == 1) & (preds.pred == 1)).sum()
    assert fp == ((preds.label == 0) & (preds.pred == 1)).sum()
    assert len(preds) == tn + fp + fn + tp
    summary = json.loads((folder / "summary.json").read_text())
    for name in ("auroc", "ap", "recall", "precision", "f1", "accuracy"):  # module and report agree
        assert summary["metrics"][name] == pytest.approx(metrics[f"test/{name}"], abs=1e-5), name
    assert len(client.get_metric_history(run.info.run_id, "test/auroc")) == 1  # logged once, not twice
    assert "test/ece" in metrics and "calibration/temperature" in metrics and "val/ece" in metrics
    assert any(k.startswith("test/recall_") for k in metrics)
    for name in ("threshold_sweep.csv", "roc_curve.png", "errors/gallery.png", "reliability_val.png",
                 "calibration_val.json", "threshold.json"):
        assert (folder / name).is_file(), name
    assert (Path(cfg.paths.output_dir) / "reports" / "summary.json").is_file()  # local copy too
    assert summary["leaky_protocol"] is False and run.data.tags["leaky_protocol"] == "False"


def test_model_carries_the_logged_threshold_and_temperature(trained):
    from defect_detection.models.loading import load_predictor

    cfg, result, client, folder = trained
    metrics = client.get_run(result["run_id"]).data.metrics
    mlflow.set_tracking_uri(cfg.logger.tracking_uri)
    predictor = load_predictor(f"runs:/{result['run_id']}/model")
    assert predictor.threshold == pytest.approx(metrics["test/threshold"], abs=1e-6)
    assert json.loads((folder / "threshold.json").read_text())["value"] == pytest.approx(predictor.threshold)
    assert predictor.meta["temperature"] == pytest.approx(metrics["calibration/temperature"], rel=1e-6)
    preds = pd.read_csv(folder / "predictions.csv")
    decided = predictor.predict(list(preds.path))
    assert np.allclose(decided.p_defect, preds.p_defect, atol=1e-5)  # same temperature, same scores
    assert (decided.is_defect.astype(int) == preds.pred).all()


def test_evaluate_reproduces_the_training_report(trained):
    from defect_detection.pipeline.evaluate import evaluate
    from tests.test_evaluate import compose_eval

    cfg, result, client, folder = trained
    ev = evaluate(compose_eval(Path(cfg.paths.root_dir), f"model=runs:/{result['run_id']}/model"))
    run = client.get_run(ev["run_id"])
    assert run.data.tags["source_run_id"] == result["run_id"]
    train_cm = json.loads((folder / "confusion_matrix.json").read_text())["counts"]
    eval_cm = json.loads((Path(ev["report_dir"]) / "confusion_matrix.json").read_text())["counts"]
    assert eval_cm == train_cm
    trained_auroc = client.get_run(result["run_id"]).data.metrics["test/auroc"]
    assert run.data.metrics["test/auroc"] == pytest.approx(trained_auroc, abs=1e-4)


def test_separation_margin_is_the_log_odds_gap_between_the_classes():
    import math

    import torch

    from defect_detection.evaluation.metrics import separation_margin

    labels = torch.tensor([0, 0, 1, 1])
    assert separation_margin(torch.tensor([-3.0, -1.0, 0.5, 4.0]), labels) == pytest.approx(1.5)
    assert separation_margin(torch.tensor([-3.0, 2.0, 0.5, 4.0]), labels) == pytest.approx(-1.5)  # overlap
    assert math.isnan(separation_margin(torch.tensor([1.0, 2.0]), torch.tensor([0, 0])))
