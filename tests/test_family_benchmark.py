"""scripts/family_benchmark.py measures every family through the real configs (tiny data)."""

from __future__ import annotations

import pytest

from tests.conftest import load_script


@pytest.mark.parametrize("family", ["patchcore", "segmenter"])
def test_measure_reports_rates_the_bank_and_memory_of_a_family(tmp_path, family):
    bench = load_script("family_benchmark")
    r = bench.measure([f"paths.root_dir={tmp_path}", "debug=fast", f"detector={family}"], epochs=1)
    assert r["epochs"] == 1 and r["train_images"] > 0 and r["train_images_per_s"] > 0
    assert r["score_images_per_s"] > 0 and r["map_images_per_s"] > 0 and r["peak_rss_mb"] > 0
    if family == "patchcore":
        assert r["bank_size"] >= 1 and r["bank_mb"] > 0 and r["bank_build_s"] >= 0
    else:
        assert r["bank_size"] is None
    assert bench.row(family, r).count("|") == len(bench.COLUMNS) + 1
