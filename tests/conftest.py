"""Shared fixtures: real configs composed against a temporary project root, tiny synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from defect_detection.config import CONFIG_DIR

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)


def compose_train(root: Path, *overrides: str, fast: bool = True) -> DictConfig:
    """The real train config, with paths under `root` and (by default) the tiny debug overlay."""
    base = [f"paths.root_dir={root}", f"paths.output_dir={root}/outputs"]
    if fast:
        base.append("debug=fast")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[*base, *overrides])


@pytest.fixture(autouse=True, scope="session")
def _nothing_written_into_the_checkout():
    """Tests keep their stores, logs and outputs under temporary folders: a stray file in the
    checkout (a prediction log or an MLflow database beside the current folder) fails the run."""
    root = Path(__file__).resolve().parents[1]
    strays = ("predictions.db", "mlflow.db")
    before = {name for name in strays if (root / name).exists()}
    yield
    after = {name for name in strays if (root / name).exists()}
    assert after <= before, f"tests wrote {sorted(after - before)} into {root}"


@pytest.fixture(autouse=True)
def _isolated_mlflow_state():
    """MLflow's fluent API keeps a process-wide active experiment/run: never leak it between tests."""
    import mlflow
    from mlflow.tracking import fluent
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils

    yield
    utils._tracking_uri = None
    registry_utils._registry_uri = None
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)
    while mlflow.active_run():
        mlflow.end_run()
    fluent._active_experiment_id = None
    for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
        os.environ.pop(var, None)


@pytest.fixture
def cfg_factory(tmp_path):
    def factory(*overrides: str, fast: bool = True) -> DictConfig:
        return compose_train(tmp_path, *overrides, fast=fast)

    return factory


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic MVTec tree shared by the read-only tests."""
    from defect_detection.data.synthetic import generate_synthetic

    root = tmp_path_factory.mktemp("data") / "synthetic"
    return generate_synthetic(root, n_train_good=6, n_test_good=4, n_per_defect=3, image_size=64)


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package)."""
    import importlib.util

    from defect_detection import project_root

    spec = importlib.util.spec_from_file_location(name, project_root() / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_for_ping(server, port: int, poll_s: float = 0.5, timeout_s: float = 240) -> None:
    """Until the MLflow scoring server started as `server` answers /ping on 127.0.0.1:`port`;
    fails with its output when it exits first."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        assert server.poll() is None, server.stdout.read()[-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        assert time.monotonic() < deadline, f"server did not answer /ping within {timeout_s:g} s"
        time.sleep(poll_s)
