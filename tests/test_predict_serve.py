"""`defect-predict` on bundles, checkpoints' sibling formats and registry URIs, and `mlflow models serve`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from defect_detection import UserError
from defect_detection.config import CONFIG_DIR
from defect_detection.pipeline.predict import predict
from defect_detection.tracking.registry import find_candidates, promote
from tests.conftest import wait_for_ping
from tests.test_promote import make_bundle, make_run, tracking_uri

NAME = "defect-classifier"


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A project root whose registry has a champion (an untrained Lite0 at 32 px, threshold 0.45)."""
    root = tmp_path_factory.mktemp("project")
    bundle = make_bundle(root / "bundle.pt", threshold=0.45)
    make_run(root, {"val/auroc": 0.9, "test/threshold": 0.45}, bundle=bundle)
    client = MlflowClient(tracking_uri(root))
    exp = client.get_experiment_by_name("defect-detection").experiment_id
    promote(client, find_candidates(client, [exp], "val/auroc")[0], name=NAME, metric="val/auroc")
    return root, bundle


def predict_cfg(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("predict", overrides=[f"paths.root_dir={root}", f"output={root}/out/predictions.csv",
                                             f"gradcam.dir={root}/out/gradcam", *overrides])


def test_predict_folder_with_a_bundle_writes_the_csv(champion, synthetic_root, tmp_path):
    root, bundle = champion
    table = predict(predict_cfg(tmp_path, f"model={bundle}", f"images={synthetic_root}/disc/test"))
    csv = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert list(csv.columns) == ["path", "p_defect", "decision", "threshold"]
    assert len(csv) == len(list((synthetic_root / "disc" / "test").rglob("*.png"))) == len(table)
    assert csv["p_defect"].between(0, 1).all() and np.allclose(csv["threshold"], 0.45)
    assert (csv["decision"].eq("defect") == (csv["p_defect"] >= 0.45)).all()


def test_predict_glob_with_the_champion_uri_matches_the_bundle(champion, synthetic_root, tmp_path):
    root, bundle = champion
    pattern = f"{synthetic_root}/plate/test/*/00[01].png"
    from_uri = predict(predict_cfg(root, f"model=models:/{NAME}@champion", f"images='{pattern}'"))
    from_bundle = predict(predict_cfg(tmp_path, f"model={bundle}", f"images='{pattern}'"))
    assert len(from_uri) == 8  # good, crack, scratch, spot x 2
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the fluent URI did not leak into later runs
    assert np.allclose(from_uri["p_defect"], from_bundle["p_defect"], atol=1e-6)
    assert list(from_uri["path"]) == list(from_bundle["path"])


def test_unreadable_images_are_skipped_or_fail_by_choice(champion, synthetic_root, tmp_path):
    root, bundle = champion
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in sorted((synthetic_root / "mesh" / "test" / "good").glob("*.png"))[:2]:
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(b"not a png")
    table = predict(predict_cfg(tmp_path, f"model={bundle}", f"images={folder}"))
    broken = table[table["path"].str.endswith("broken.png")].iloc[0]
    assert broken["decision"] == "error" and "broken.png" in broken["error"]
    assert (table["decision"] != "error").sum() == 2
    with pytest.raises(UserError, match="broken.png"):
        predict(predict_cfg(tmp_path, f"model={bundle}", f"images={folder}", "on_error=fail"))


def test_predict_names_a_missing_input_and_model(champion, synthetic_root, tmp_path):
    root, bundle = champion
    with pytest.raises(UserError, match="nowhere"):
        predict(predict_cfg(tmp_path, f"model={bundle}", f"images={tmp_path}/nowhere"))
    with pytest.raises(UserError, match="models:/no-such-model@champion"):
        predict(predict_cfg(root, "model=models:/no-such-model@champion", f"images={synthetic_root}/disc"))


def test_predict_writes_gradcam_overlays_when_asked(champion, synthetic_root, tmp_path):
    pytest.importorskip("defect_detection.explain.writer")
    root, bundle = champion
    predict(predict_cfg(tmp_path, f"model={bundle}", f"images={synthetic_root}/disc/test/crack",
                        "gradcam.enabled=true"))
    overlays = sorted((tmp_path / "out" / "gradcam").rglob("*_gradcam.png"))
    assert len(overlays) == len(list((synthetic_root / "disc" / "test" / "crack").glob("*.png")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_serves_the_champion_on_localhost(champion, synthetic_root):
    root, _ = champion
    port = _free_port()
    # a served model reads paths only under its allowed roots (none by default)
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(root), "DEFECT_SERVE_ROOTS": str(synthetic_root),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}  # uvicorn
    mlflow_cli = [sys.executable, "-m", "mlflow"]
    server = subprocess.Popen([*mlflow_cli, "models", "serve", "-m", f"models:/{NAME}@champion",
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        wait_for_ping(server, port, poll_s=1)
        paths = sorted(str(p) for p in synthetic_root.glob("disc/test/*/000.png"))
        body = json.dumps({"dataframe_split": {"columns": ["path"], "data": [[p] for p in paths]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            predictions = pd.DataFrame(json.loads(r.read())["predictions"])
        assert list(predictions["path"]) == paths
        assert predictions["p_defect"].between(0, 1).all()
        assert (predictions["decision"].eq("defect") == (predictions["p_defect"] >= 0.45)).all()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)


@pytest.mark.slow
def test_predict_command_line(champion, synthetic_root, tmp_path):
    root, _ = champion
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "defect_detection.predict", f"paths.root_dir={root}",
                           f"images={synthetic_root}/disc/test/good", f"output={tmp_path}/p.csv"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_images = len(list((synthetic_root / "disc/test/good").glob("*.png")))
    assert len(pd.read_csv(tmp_path / "p.csv")) == n_images
    proc = subprocess.run([sys.executable, "-m", "defect_detection.predict", f"paths.root_dir={root}",
                           f"images={tmp_path}/nowhere"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: Input")
