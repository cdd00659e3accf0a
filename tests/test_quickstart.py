"""examples/quickstart.py runs end to end (the API as a notebook user meets it), on tiny data."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_quickstart_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QUICKSTART_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    example = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
    runpy.run_path(str(example), run_name="__main__")
    said = capsys.readouterr().out
    assert "test AUROC" in said and "4 overlays;" in said and "evaluation run" in said
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert os.environ["MLFLOW_TRACKING_URI"].endswith("mlflow.db")
