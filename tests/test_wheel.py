"""The built package works anywhere: sdist + wheel from `python -m build`, installed into a fresh
venv, `defect-train` run from an empty folder (configs from inside the wheel, outputs and the
MLflow store in that folder), a user's own config folder beside ours, and `--version`.

The fresh venv gets the heavy dependencies (torch, MLflow, ...) from this environment through a
path file instead of installing them again (no network, minutes saved); the package itself comes
from the wheel alone: the checkout's src/ is on no path there.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from defect_detection.base import __version__

ROOT = Path(__file__).resolve().parents[1]


def _line(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for kind, n in (("good", 14), ("defect/scratch", 8)):
        for i in range(n):
            arr = (120 + rng.normal(0, 8, (40, 40, 3))).clip(0, 255).astype(np.uint8)
            if kind != "good":
                arr[18:21, 5:35] = 250
            (root / kind).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / kind / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the built wheel installed; returns its bin folder."""
    base = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "-o", str(base / "dist"),
                            str(ROOT)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    sdist = list((base / "dist").glob("*.tar.gz"))
    [wheel] = list((base / "dist").glob("*.whl"))
    assert sdist and wheel.name == f"defect_detection-{__version__}-py3-none-any.whl"
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index",
                           "-q", str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv / "bin"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}


@pytest.mark.slow
def test_the_wheel_trains_from_an_empty_folder_with_a_users_own_config(installed, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    data = _line(tmp_path / "line")
    where = subprocess.run([str(installed / "python"), "-c", "import defect_detection, sys; "
                            "print(defect_detection.__file__); print(defect_detection.project_root())"],
                           cwd=work, env=_env(), capture_output=True, text=True, check=True).stdout.split()
    assert "site-packages" in where[0] and str(ROOT) not in where[0] and where[1] == str(work)
    version = subprocess.run([str(installed / "defect-train"), "--version"], cwd=work, env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert version.stdout.startswith(f"defect-detection {__version__} (torch ")
    (work / "my_conf" / "data").mkdir(parents=True)
    (work / "my_conf" / "data" / "my_line.yaml").write_text(
        f"defaults:\n  - folder\n  - _self_\nroot: {data}\ncategory: my_line\nimage_size: 32\n"
        "batch_size: 8\n")
    run = subprocess.run([str(installed / "defect-train"), "--config-dir", "my_conf", "data=my_line",
                          "trainer.max_epochs=1", "explain=none", "callbacks.progress_bar=null",
                          "callbacks.early_stopping=null"], cwd=work, env=_env(), capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (work / "mlruns" / "mlflow.db").is_file() and (work / "outputs" / "train").is_dir()
    check = ("from mlflow import MlflowClient; from defect_detection import Inspector; "
             "c = MlflowClient('sqlite:///mlruns/mlflow.db'); "
             "[r] = c.search_runs([c.get_experiment_by_name('defect-detection').experiment_id]); "
             "print(r.info.status, r.data.params['data.category'], r.data.tags['dataset']); "
             f"print(Inspector.load(f'runs:/{{r.info.run_id}}/model').predict(['{data}/good/00.png'])"
             ".decision.iloc[0])")
    out = subprocess.run([str(installed / "python"), "-c", check], cwd=work, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    status, decision = out.stdout.split("\n")[:2]
    assert status == "FINISHED my_line folder" and decision in ("good", "defect")
