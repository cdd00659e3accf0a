"""scripts/line_bench.py: the lines compose, the tables average lines honestly, and a tiny bench
runs, logs and resumes."""

from __future__ import annotations

import json
import math

import pytest
from mlflow import MlflowClient

from tests.conftest import load_script

TINY = ["data.records.n_train_good=6", "data.records.n_test_good=4", "data.records.n_per_defect=3",
        "data.records.image_size=64", "data.image_size=64", "data.batch_size=8", "trainer.max_epochs=1",
        "data.cache=memory"]


@pytest.fixture(scope="module")
def lb():
    return load_script("line_bench")


def _row(line, recipe, seed, auroc, recall, fp, good=20, seconds=10.0, status="ok"):
    row = {"line": line, "recipe": recipe, "seed": seed, "overrides": [], "status": status,
           "seconds": seconds}
    if status != "ok":
        return {**row, "error": "UserError: refused"}
    return {**row, "test/auroc": auroc, "test/recall": recall, "test/fp": fp, "test/tn": good - fp,
            "test/fp_rate": fp / good, "threshold": 0.5, "run_id": "r"}


def test_every_line_and_recipe_composes_with_the_real_configs(lb, cfg_factory, tmp_path):
    shared = tmp_path / "shared"
    for line in lb.LINES:
        cfg = cfg_factory(*lb.line_overrides(line, shared), fast=False)
        assert cfg.split.name == "stratified"
        if line in lb.SYNTHETIC:
            assert cfg.data.name == "synthetic" and cfg.data.root.endswith(f"/data/lines/{line}")
    bs = cfg_factory(*lb.line_overrides("bsdata", shared), fast=False)
    assert bs.data.root == str(shared / "bsdata_pitting")
    assert bs.split.make.groups.csv == "groups.csv" and bs.split.make.groups.column == "part_position"
    portrait = cfg_factory(*lb.line_overrides("portrait_jitter", shared), fast=False).data.records
    assert (portrait.height, portrait.height_jitter, list(portrait.defect_types)) == (400, 6, ["crack"])
    few = cfg_factory(*lb.line_overrides("masks_on_few", shared), fast=False).data.records
    assert few.mask_fraction == 0.25 and few.image_size == 512
    auto = cfg_factory(*lb.recipe_overrides("auto"), fast=False)
    assert auto.auto.enabled and auto.auto.budget_minutes == 10
    assert lb.recipe_overrides("default") == [] and lb.recipe_overrides("lr:optimizer=adamw_1e3") == [
        "optimizer=adamw_1e3"]


def test_small_line_has_the_val_counts_it_mimics(lb, cfg_factory, tmp_path):
    from hydra.utils import instantiate

    from defect_detection.data.records import records_from_config

    cfg = cfg_factory(*lb.line_overrides("small", tmp_path), f"paths.root_dir={tmp_path}", fast=False)
    records = records_from_config(cfg.data.records)
    split = instantiate(cfg.split.make)(records)
    assert len(records) == 100
    assert (sum(r.label == 0 for r in split.val), sum(r.label == 1 for r in split.val)) == (15, 5)


def test_summary_averages_line_means_and_names_the_worst_line(lb):
    rows = [_row("a", "default", 0, 1.0, 1.0, 0), _row("a", "default", 1, 0.9, 0.5, 2),
            _row("b", "default", 0, 0.7, 0.4, 4), _row("b", "default", 1, 0.5, 0.2, 0),
            _row("b", "default", 2, 0, 0, 0, status="failed")]
    a = lb.line_stats(rows, "a", "default")
    assert a["runs"] == "2/2" and a["test/auroc"] == pytest.approx((0.95, 0.9))
    assert a["test/fp_rate"] == pytest.approx((0.05, 0.1))  # worst FP rate is the highest
    b = lb.line_stats(rows, "b", "default")
    assert b["runs"] == "2/3" and b["test/auroc"] == pytest.approx((0.6, 0.5))
    s = lb.summary(rows, ["a", "b"], "default")
    assert s["lines"] == "2/2"
    assert s["test/auroc"][:2] == pytest.approx((0.775, 0.6)) and s["test/auroc"][2] == "b"
    assert s["test/recall"][:2] == pytest.approx((0.525, 0.3)) and s["test/recall"][2] == "b"
    assert s["test/fp_rate"][:2] == pytest.approx((0.075, 0.1)) and s["test/fp_rate"][2] == "b"
    empty = lb.summary(rows, ["a", "b", "c"], "auto")
    assert empty["lines"] == "0/3" and math.isnan(empty["test/auroc"][0])


def test_markdown_starts_with_the_command_and_has_one_table_per_line(lb):
    args = lb.parse_args(["--lines", "small", "bottle", "--recipes", "default", "auto", "--seeds", "0", "1"])
    state = {"rows": [_row("small", "default", 0, 0.8, 0.6, 1), _row("bottle", "default", 0, 1.0, 1.0, 0),
                      _row("bottle", "auto", 0, 0, 0, 0, status="failed")], "parent_run_id": "p"}
    text = lb.markdown(args, state, "python scripts/line_bench.py --lines small bottle")
    lines = text.splitlines()
    assert lines[2] == "Command: `python scripts/line_bench.py --lines small bottle`"
    assert "## small: " in text and "## bottle: " in text
    summary_row = ("| default | 2/2 | 0.900 | 0.800 (small) | 0.800 | 0.600 (small) | 0.025 | 0.050 (small) "
                   "| 10 |")
    assert summary_row in lines
    assert "| auto | 0/1 | - | - | - | - | - | - | - |" in lines
    assert any(line.startswith("| bottle | auto | 0 | - |") and "failed: UserError" in line for line in lines)


def test_a_recipe_is_paired_with_the_first_on_the_same_seeds_only(lb):
    rows = [_row("a", "default", 0, 0.8, 0.5, 0), _row("a", "default", 1, 0.9, 0.6, 0),
            _row("a", "native", 0, 0.9, 0.7, 0), _row("a", "native", 1, 0.85, 0.6, 0),
            _row("a", "native", 2, 1.0, 1.0, 0)]  # seed 2 has no default run: not paired
    table = lb.paired(rows, ["a", "b"], ["default", "native"])
    assert "| native | a | 2 | +0.025 | -0.050 | +0.100 | 1 / 1 |" in table
    assert not any("| native | b |" in line for line in table)  # no runs on b: no row
    assert lb.paired(rows, ["a"], ["default"]) == []


def test_report_writes_the_tables_from_saved_runs_and_merged_benches(lb, tmp_path):
    import json

    mine, other = tmp_path / "native.json", tmp_path / "default.json"
    mine.write_text(json.dumps({"rows": [_row("small", "native", 0, 0.9, 0.8, 0)], "starts": [
        {"at": "t1", "command": "python scripts/line_bench.py --recipes native"}]}))
    other.write_text(json.dumps({"rows": [_row("small", "default", 0, 0.8, 0.6, 1)], "starts": [
        {"at": "t0", "command": "python scripts/line_bench.py --recipes default"}]}))
    lb.main(["--report", "--lines", "small", "--recipes", "default", "native", "--seeds", "0",
             "--out", str(tmp_path / "native.md"), "--merge", str(other)])
    text = (tmp_path / "native.md").read_text()
    assert "| native | small | 1 | +0.100 |" in text
    assert "`python scripts/line_bench.py --recipes native`" in text and "--recipes default`" in text


def test_a_finished_cell_is_reused_only_with_the_same_overrides(lb, tmp_path):
    args = lb.parse_args(["--lines", "small", "--seeds", "0", "--recipes", "default"])
    row = {**_row("small", "default", 0, 1, 1, 0), "overrides": lb.cell_overrides(args, "small", "default")}
    state = {"rows": [row]}
    assert lb.finished(args, state, 0, "small", "default")
    assert not lb.finished(args, state, 1, "small", "default")
    changed = lb.parse_args(["--lines", "small", "--seeds", "0", "--recipes", "default", "--",
                             "trainer.max_epochs=3"])
    assert not lb.finished(changed, state, 0, "small", "default")
    assert not lb.finished(args, {"rows": [{**row, "status": "failed"}]}, 0, "small", "default")


def test_tiny_bench_runs_logs_nested_runs_and_resumes(lb, tmp_path, caplog):
    out = tmp_path / "bench.md"
    argv = ["--lines", "small", "--seeds", "0", "--recipes", "default", "--out", str(out),
            f"paths.root_dir={tmp_path}", *TINY]
    state = lb.main(argv)
    assert [r["status"] for r in state["rows"]] == ["ok"]
    row = state["rows"][0]
    assert 0 <= row["test/auroc"] <= 1
    assert row["test/fp_rate"] == row["test/fp"] / (row["test/fp"] + row["test/tn"])
    text = out.read_text()
    assert text.splitlines()[2].startswith("Command: `python scripts/line_bench.py --lines small")
    assert "## small: " in text and "| small | default | 0 | " in text
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["rows"][0]["run_id"] == row["run_id"]

    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("line-bench")
    parent = client.get_run(saved["parent_run_id"])
    assert parent.info.status == "FINISHED" and "summary/default/auroc_mean" in parent.data.metrics
    child = client.get_run(row["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (child.data.tags["line"], child.data.tags["recipe"], child.data.tags["split_seed"]) == (
        "small", "default", "0")

    with caplog.at_level("INFO"):
        again = lb.main(argv)  # resumed: nothing left to run
    assert "finished earlier, skipped" in caplog.text
    assert again["rows"] == state["rows"] and again["parent_run_id"] == saved["parent_run_id"]
    assert len(client.search_runs([exp.experiment_id])) == 2  # the parent and the one run
