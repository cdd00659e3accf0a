"""OpenVINO and int8 beside ONNX Runtime: export formats, the int8 gate, runtime= in predict/pyfunc."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from defect_detection import UserError
from defect_detection.data.records import read_mvtec
from defect_detection.models.backbones import build_network
from defect_detection.models.inference import Predictor, save_bundle
from defect_detection.models.loading import load_predictor

pytest.importorskip("openvino")

SIZE = 32
BACKBONE = "resnet18"  # the quickest to export; pretrained=False: offline


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network(BACKBONE, pretrained=False)
    with torch.no_grad():  # spread the scores so a threshold in the middle splits the images
        net.fc.weight.mul_(40)
    return save_bundle(tmp_path_factory.mktemp("rt") / "bundle.pt", net, backbone=BACKBONE,
                       image_size=SIZE, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                       threshold=0.5, temperature=1.5)


@pytest.fixture(scope="module")
def split_images(synthetic_root):
    records = read_mvtec(synthetic_root, ["disc", "plate"])
    return [r.path for r in records][::2], [r.path for r in records][1::2]  # "val", "held"


@pytest.fixture(scope="module")
def openvino_fp32(bundle, split_images, tmp_path_factory):
    from defect_detection.pipeline.export import export

    out = tmp_path_factory.mktemp("ov") / "model.xml"
    report = export(str(bundle), out, images=split_images[1], fmt="openvino")
    return out, report


def test_openvino_export_writes_the_ir_with_the_meta_and_matches_eager(openvino_fp32, bundle, split_images):
    from defect_detection.models.openvino_predictor import OpenVinoPredictor

    out, report = openvino_fp32
    assert out.is_file() and out.with_suffix(".bin").is_file()
    assert not list(out.parent.glob(".*.tmp"))
    assert report["format"] == "openvino" and report["precision"] == "fp32"
    assert report["parity"]["max_abs_diff_p_defect"] <= 1e-4 and report["parity"]["decision_flips"] == 0
    ov = OpenVinoPredictor(out, batch_size=3)
    assert ov.meta["threshold"] == 0.5 and ov.meta["precision"] == "fp32"
    eager = Predictor(bundle).predict(split_images[1])
    got = ov.predict(split_images[1])  # batches of 3: the dynamic batch axis
    np.testing.assert_allclose(got["p_defect"], eager["p_defect"], atol=1e-4)
    assert (got["decision"] == eager["decision"]).all()
    assert eager["decision"].nunique() == 2  # both decisions occur, so the comparison means something


def test_openvino_reads_the_exported_onnx_too(bundle, split_images, tmp_path):
    from defect_detection.models.openvino_predictor import OpenVinoPredictor
    from defect_detection.pipeline.export import export

    onnx_file = tmp_path / "model.onnx"
    export(str(bundle), onnx_file, images=split_images[1][:4])
    ov = load_predictor(onnx_file, runtime="openvino")
    assert isinstance(ov, OpenVinoPredictor)
    np.testing.assert_allclose(ov.p_defect(split_images[1][:4]),
                               Predictor(bundle).p_defect(split_images[1][:4]), atol=1e-4)
    with pytest.raises(UserError, match="exported onnx model"):
        load_predictor(onnx_file, runtime="torch")


def test_int8_is_calibrated_on_the_given_validation_images_and_gated(bundle, split_images, tmp_path,
                                                                    openvino_fp32):
    from defect_detection.models.openvino_predictor import OpenVinoPredictor
    from defect_detection.pipeline.export import export

    val, held = split_images
    out = tmp_path / "model-int8.xml"
    report = export(str(bundle), out, images=held, fmt="openvino", quantize="int8", calibration=val,
                    force=True)  # a random-init net: int8 may flip; the figures are what is checked
    assert report["precision"] == "int8" and report["parity"]["tolerance"] is None
    pv = report["parity_val"]
    assert pv["n_images"] == len(val) and pv["images"].startswith("given")
    assert 0 <= pv["decision_flips"] <= len(val) and np.isfinite(pv["max_abs_diff_p_defect"])
    ov = OpenVinoPredictor(out)
    assert ov.meta["precision"] == "int8" and ov.meta["calibration"].startswith(f"{len(val)} images")
    p = ov.p_defect(held)
    eager = Predictor(bundle).p_defect(held)
    assert np.abs(p - eager).max() == pytest.approx(report["parity"]["max_abs_diff_p_defect"], abs=1e-5)
    fp32_bin = openvino_fp32[0].with_suffix(".bin")
    assert out.with_suffix(".bin").stat().st_size < 0.5 * fp32_bin.stat().st_size  # int8 weights


def test_int8_that_flips_a_validation_decision_is_refused_and_nothing_written(bundle, split_images,
                                                                             tmp_path, monkeypatch):
    from defect_detection.pipeline import export as export_mod

    real = export_mod.parity

    def flipping(reference, candidate, items, **kw):  # the gate's input, as a flipping int8 gives it
        return {**real(reference, candidate, items, **kw), "decision_flips": 2}

    monkeypatch.setattr(export_mod, "parity", flipping)
    out = tmp_path / "model-int8.onnx"
    with pytest.raises(UserError, match=r"int8 changes 2 of \d+ validation decisions.*--force"):
        export_mod.export(str(bundle), out, images=split_images[1][:4], quantize="int8",
                          calibration=split_images[0][:6])
    assert not out.exists() and not list(tmp_path.iterdir())
    report = export_mod.export(str(bundle), out, images=split_images[1][:4], quantize="int8",
                               calibration=split_images[0][:6], force=True)
    assert out.is_file() and report["parity_val"]["forced"] is True


def test_int8_needs_validation_images_and_a_matching_suffix(bundle, tmp_path):
    from defect_detection.export import main

    with pytest.raises(SystemExit, match="calibrates on the run's validation images.*--calibration"):
        main([str(bundle), "-o", str(tmp_path / "m.onnx"), "quantize=int8"])
    with pytest.raises(SystemExit, match=r"openvino model is written as \.xml"):
        main([str(bundle), "-o", str(tmp_path / "m.onnx"), "--format", "openvino"])
    assert not list(tmp_path.iterdir())


def test_a_missing_bin_or_foreign_ir_is_one_clear_error(openvino_fp32, tmp_path):
    import openvino as ov

    from defect_detection.models.openvino_predictor import OpenVinoPredictor

    out, _ = openvino_fp32
    lone = tmp_path / "lone.xml"
    lone.write_bytes(out.read_bytes())
    with pytest.raises(UserError, match=r"lone\.bin is missing"):
        OpenVinoPredictor(lone)
    model = ov.Core().read_model(str(out))
    bare = tmp_path / "bare.xml"
    ov.save_model(ov.Model(model.outputs, model.get_parameters(), "bare"), str(bare), compress_to_fp16=False)
    with pytest.raises(UserError, match="no 'defect_meta' metadata"):
        OpenVinoPredictor(bare)


def test_runtime_openvino_or_onnx_on_a_bundle_decides_as_eager(bundle, split_images):
    from defect_detection.models.onnx_predictor import OnnxPredictor
    from defect_detection.models.openvino_predictor import OpenVinoPredictor

    held = split_images[1]
    eager = Predictor(bundle).predict(held)
    for runtime, kind in (("openvino", OpenVinoPredictor), ("onnx", OnnxPredictor)):
        predictor = load_predictor(bundle, runtime=runtime)
        assert isinstance(predictor, kind)
        got = predictor.predict(held)
        np.testing.assert_allclose(got["p_defect"], eager["p_defect"], atol=1e-4)
        assert (got["decision"] == eager["decision"]).all()
    with pytest.raises(UserError, match="runtime=tensorrt"):
        load_predictor(bundle, runtime="tensorrt")


def test_predict_takes_the_exported_ir(openvino_fp32, bundle, split_images, tmp_path):
    import pandas as pd
    from hydra import compose, initialize_config_dir

    from defect_detection.config import CONFIG_DIR
    from defect_detection.pipeline.predict import predict

    out, _ = openvino_fp32
    folder = str(split_images[1][0].rsplit("/", 2)[0])
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("predict", overrides=[f"paths.root_dir={tmp_path}", f"model={out}",
                                            f"images={folder}", f"output={tmp_path}/p.csv",
                                            f"gradcam.dir={tmp_path}/g"])
    table = predict(cfg)
    eager = Predictor(bundle).predict(list(table["path"]))
    np.testing.assert_allclose(table["p_defect"], eager["p_defect"], atol=1e-4)
    assert (table["decision"].to_numpy() == eager["decision"].to_numpy()).all()
    assert pd.read_csv(f"{tmp_path}/p.csv").shape[0] == len(table)
    cfg.gradcam.enabled = True
    with pytest.raises(UserError, match="gradcam.enabled=true needs the PyTorch model"):
        predict(cfg)


def test_pyfunc_scores_with_the_runtime_asked_for(bundle, split_images, tmp_path, monkeypatch):
    import mlflow

    # the served model's prediction log goes beside this store (not into the current folder)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")

    from defect_detection.models.openvino_predictor import OpenVinoPredictor
    from defect_detection.tracking.pyfunc import MODEL_CONFIG, PIP_REQUIREMENTS, DefectPyfunc

    path = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(path, python_model=DefectPyfunc(), artifacts={"bundle": str(bundle)},
                             pip_requirements=PIP_REQUIREMENTS, model_config=MODEL_CONFIG)
    held = split_images[1][:5]
    torch_out = mlflow.pyfunc.load_model(str(path)).predict(held)
    model = mlflow.pyfunc.load_model(str(path), model_config={"runtime": "openvino"})
    assert isinstance(model.unwrap_python_model().predictor, OpenVinoPredictor)
    ov_out = model.predict(held)
    np.testing.assert_allclose(ov_out["p_defect"], torch_out["p_defect"], atol=1e-4)
    assert list(ov_out["decision"]) == list(torch_out["decision"])
    assert json.dumps(list(ov_out.columns)) == json.dumps(list(torch_out.columns))


def test_the_arithmetic_bound_counts_two_flops_per_multiply_add():
    from defect_detection.runtime_speed import best_batch, flops_per_input, gemm_peak_gflops, latency_ms

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 8 * 8, 2, bias=False))
    assert flops_per_input(net, (3, 8, 8)) == 2 * (4 * 3 * 9 * 64 + 256 * 2)
    assert gemm_peak_gflops(1, size=256, repeats=2) > 0
    x = torch.randn(6, 3, 8, 8)
    calls = []
    lat = latency_ms(lambda b: calls.append(len(b)), x, calls=4, warmup=1)
    assert set(calls) == {1} and len(calls) == 5 and lat["p99_ms"] >= lat["p50_ms"] >= 0
    best = best_batch(lambda b: net(b), x, batches=(1, 4), repeats=1)
    assert best["best_batch"] in (1, 4) and set(best["by_batch"]) == {"1", "4"}
