"""The whole loop after deployment on a small simulated line (scripts/loop_simulation.py --small):
the monitor notices the dimmed lamp, the operator's verdicts become a dataset, a challenger is
trained on it and compared with the champion on the same parts."""

from __future__ import annotations

import pytest

from tests.conftest import load_script


@pytest.mark.slow
def test_the_loop_runs_end_to_end_on_a_small_simulated_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    [row] = load_script("loop_simulation").main(["--small", "--seeds", "0", "--work", str(tmp_path)])
    assert row["alarm_at_part"] is not None and row["parts_after_drift"] >= 0  # after the drift, not before
    assert "lighting changed" in row["alarm_causes"]
    assert not [c for c in row["alarm_causes"] if c.startswith("false alarm")]
    assert row["reviewed"] > 0 and row["exported"] > 0
    assert 0.0 <= row["new_type_recall_before"] <= 1.0 and 0.0 <= row["new_type_recall_after"] <= 1.0
