"""Multirun sweeps, the Optuna search, parallel trials and the run comparison.

The end-to-end sweeps run `defect-train -m` in a subprocess against a temporary project root (its
own sqlite store, tiny synthetic data, Grad-CAM off) and then count what the MLflow store holds.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient

from defect_detection.config import CONFIG_DIR
from defect_detection.tracking.comparison import ROLE_TAG, comparison_table, rank_runs

FAST = ("debug=fast", "explain=none")


def multirun(root: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_ENABLE_ASYNC_LOGGING"] = "false"
    proc = subprocess.run([sys.executable, "-m", "defect_detection.train", "-m", f"paths.root_dir={root}",
                           *overrides], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def store(root: Path) -> tuple[MlflowClient, str]:
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    return client, client.get_experiment_by_name("defect-detection").experiment_id


def trials_and_parent(root: Path):
    client, exp = store(root)
    runs = client.search_runs([exp], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    trials = [r for r in runs if r.data.tags.get(ROLE_TAG) is None]
    assert len(parents) == 1
    return client, trials, parents[0]


# -- fast: configs, plugin discovery, search space, comparison ---------------------------------------

def test_search_space_from_hydra_sweep_grammar():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from hydra_plugins.defect_optuna_sweeper.optuna_sweeper import search_space

    space, fixed = search_space([
        "optimizer.lr=tag(log, interval(1e-5, 1e-2))", "x=interval(0.1, 0.5)",
        "freezing=choice(head_only, layer4, none)", "loss.weights=choice(auto,[1,5])",
        "trainer.max_epochs=range(2, 10, 2)", "debug=fast"])
    assert space["optimizer.lr"] == FloatDistribution(1e-5, 1e-2, log=True)
    assert space["x"] == FloatDistribution(0.1, 0.5)
    assert space["freezing"] == CategoricalDistribution(["head_only", "layer4", "none"])
    assert space["loss.weights"] == CategoricalDistribution(["auto", "[1,5]"])
    assert space["trainer.max_epochs"] == IntDistribution(2, 8, step=2)
    assert fixed == ["debug=fast"]


def test_hparams_search_config_composes_to_the_plugin_sweeper(tmp_path):
    from hydra.core.plugins import Plugins

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root_dir={tmp_path}", "hparams_search=optuna",
                                          "hydra/launcher=parallel"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ in Plugins.instance().class_name_to_class  # discovered under hydra_plugins
    assert sweeper.storage == f"sqlite:///{tmp_path}/mlruns/optuna.db"
    assert sweeper.n_jobs == cfg.hydra.launcher.n_jobs == 2
    assert set(sweeper.params) == {"optimizer.lr", "optimizer.weight_decay", "search.defect_weight",
                                   "freezing"}
    assert list(cfg.loss.weights) == [1.0, 5.0]  # the sampled defect weight feeds the loss
    assert [c._target_ for c in cfg.hydra.callbacks.values()] == [
        "defect_detection.tracking.sweeps.PrepareData", "defect_detection.tracking.sweeps.SweepTracking"]


@pytest.fixture
def fake_sweep(tmp_path):
    """A sweep parent with four trials (one failed) written straight to a store: no training."""
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.create_experiment("defect-detection")
    parent = client.create_run(exp, tags={ROLE_TAG: "sweep", "sweep_id": "S1"})
    runs = []
    for job, (lr, auroc, status) in enumerate([(1e-4, 0.80, "FINISHED"), (3e-4, 0.95, "FINISHED"),
                                               (1e-3, None, "FAILED"), (3e-3, 0.90, "FINISHED")]):
        run = client.create_run(exp, run_name=f"{job}: optimizer.lr={lr}", tags={
            "sweep_id": "S1", "sweep_job": str(job), "mlflow.parentRunId": parent.info.run_id})
        for key, value in {"optimizer.lr": lr, "backbone.name": "efficientnet_lite0", "paths.root_dir": job,
                           "seed": 42}.items():
            client.log_param(run.info.run_id, key, value)
        if auroc is not None:
            client.log_metric(run.info.run_id, "val/auroc", auroc)
            client.log_metric(run.info.run_id, "test/recall", auroc - 0.1)
        else:
            client.set_tag(run.info.run_id, "error", "RuntimeError: boom")
        client.set_terminated(run.info.run_id, status)
        runs.append(client.get_run(run.info.run_id))
    client.create_run(exp, tags={"sweep_id": "other"})  # another sweep's trial
    return client, exp, parent, runs


def test_comparison_ranks_finished_runs_and_shows_what_varies(fake_sweep):
    client, exp, parent, runs = fake_sweep
    assert [r.data.tags["sweep_job"] for r in rank_runs(runs, "val/auroc", "max")] == ["1", "3", "0", "2"]
    assert [r.data.tags["sweep_job"] for r in rank_runs(runs, "val/auroc", "min")][:3] == ["0", "3", "1"]
    table = comparison_table(runs, "val/auroc", "max")
    assert list(table["rank"].astype(object).where(table["rank"].notna(), None)) == [1, 2, 3, None]
    assert list(table["status"]) == ["FINISHED", "FINISHED", "FINISHED", "FAILED"]
    assert "optimizer.lr" in table.columns and "backbone.name" in table.columns
    assert "paths.root_dir" not in table.columns  # varies, but says nothing about the model
    assert "seed" not in table.columns  # constant and not a key param
    assert table.iloc[-1]["error"] == "RuntimeError: boom"


def test_compare_command_saves_csv_and_figure_and_logs_them_to_the_sweep(fake_sweep, tmp_path, capsys):
    from defect_detection.pipeline.compare import compare

    client, exp, parent, runs = fake_sweep
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("compare", overrides=[f"paths.root_dir={tmp_path}", f"out_dir={tmp_path}/cmp",
                                            "metric=test/recall"])
    table = compare(cfg)  # sweep=latest finds S1 through its parent run
    assert len(table) == 4 and table.iloc[0]["run_id"] == runs[1].info.run_id
    assert (tmp_path / "cmp" / "comparison.csv").is_file()
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 1000
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert logged == {"comparison/comparison.csv", "comparison/comparison.png", "comparison/comparison.html"}
    page = (tmp_path / "cmp" / "comparison.html").read_text()
    assert runs[1].info.run_id in page and "test/recall" in page and "data:image/png;base64," in page
    assert "test/recall" in capsys.readouterr().out

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("compare", overrides=[f"paths.root_dir={tmp_path}", f"out_dir={tmp_path}/all",
                                            "sweep=null", "include_failed=false"])
    table = compare(cfg)  # the whole experiment, into a new 'comparison' run
    assert len(table) == 3
    comparison_runs = client.search_runs([exp], f"tags.{ROLE_TAG} = 'comparison'")
    assert len(comparison_runs) == 1 and comparison_runs[0].info.status == "FINISHED"


def test_compare_names_a_missing_experiment_and_sweep(fake_sweep, tmp_path):
    from defect_detection import UserError
    from defect_detection.pipeline.compare import compare

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        base = [f"paths.root_dir={tmp_path}", f"out_dir={tmp_path}/x"]
        missing_exp = compose("compare", overrides=[*base, "experiment_name=nope"])
        missing_sweep = compose("compare", overrides=[*base, "sweep=2020-01-01_00-00-00"])
    with pytest.raises(UserError, match="No MLflow experiment 'nope'.*defect-detection"):
        compare(missing_exp)
    with pytest.raises(UserError, match="sweep_id='2020-01-01_00-00-00'"):
        compare(missing_sweep)


def test_a_sweep_that_dies_leaves_its_parent_run_killed_not_running(tmp_path):
    """A launcher error (here: a swept key that does not exist) ends the sweep without Hydra's end
    callback; the parent run must not stay RUNNING."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "defect_detection.train", "-m", f"paths.root_dir={tmp_path}",
                           *FAST, "no_such_key=1,2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "no_such_key" in proc.stderr
    client, trials, parent = trials_and_parent(tmp_path)
    assert trials == [] and parent.info.status == "KILLED" and "sweep ended" in parent.data.tags["error"]


# -- slow: real multiruns ---------------------------------------------------------------------------

@pytest.mark.slow
def test_grid_multirun_eight_trials_grouped_under_one_sweep(tmp_path):
    multirun(tmp_path, *FAST, "backbone.pretrained=false", "backbone=resnet18,efficientnet_lite0",
             "freezing=layer4,none", "loss.weights=auto,[1,5]")
    client, trials, parent = trials_and_parent(tmp_path)
    assert len(trials) == 8 and {r.info.status for r in trials} == {"FINISHED"}
    combos = {(r.data.params["backbone.name"], r.data.params["freezing.name"], r.data.params["loss.weights"])
              for r in trials}
    assert len(combos) == 8
    sweep_id = parent.data.tags["sweep_id"]
    assert {r.data.tags["sweep_id"] for r in trials} == {sweep_id}
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert sorted(int(r.data.tags["sweep_job"]) for r in trials) == list(range(8))
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/n_finished"] == 8
    assert parent.data.tags["best_run_id"] in {r.info.run_id for r in trials}
    assert (tmp_path / "outputs" / "train-multirun" / sweep_id / "comparison.csv").is_file()


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tmp_path):
    # resnet18 with pretrained weights cannot load offline: that trial fails before training starts
    multirun(tmp_path, *FAST, "backbone=resnet18,efficientnet_lite0")
    client, trials, parent = trials_and_parent(tmp_path)
    by_backbone = {r.data.params["backbone.name"]: r for r in trials}
    failed, ok = by_backbone["resnet18"], by_backbone["efficientnet_lite0"]
    assert failed.info.status == "FAILED" and "No ImageNet weights for resnet18" in failed.data.tags["error"]
    assert failed.data.tags["mlflow.parentRunId"] == parent.info.run_id
    traceback_file = client.download_artifacts(failed.info.run_id, "error/traceback.txt", str(tmp_path))
    assert "UserError" in Path(traceback_file).read_text()
    assert ok.info.status == "FINISHED" and "val/auroc" in ok.data.metrics
    assert parent.data.metrics["sweep/n_failed"] == 1 and parent.data.metrics["sweep/n_finished"] == 1


@pytest.mark.slow
def test_optuna_search_runs_three_trials_and_resumes_an_interrupted_study(tmp_path):
    import optuna

    search = ("hparams_search=optuna", "hydra.sweeper.sampler.n_startup_trials=2", *FAST)
    multirun(tmp_path, *search, "hydra.sweeper.n_trials=3")
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    study = optuna.load_study(study_name="defect-detection-synthetic-search", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    client, trials, parent = trials_and_parent(tmp_path)
    assert len(trials) == 3 and {r.info.status for r in trials} == {"FINISHED"}
    assert {r.data.tags["optuna_study"] for r in trials} == {study.study_name}
    values = sorted(t.value for t in study.trials)
    assert sorted(r.data.metrics["val/auroc"] for r in trials) == pytest.approx(values)
    for r in trials:  # the sampled values reached the config
        assert float(r.data.params["optimizer.lr"]) in {t.params["optimizer.lr"] for t in study.trials}
        assert r.data.params["freezing.name"] in {"head_only", "layer4", "none"}
    sweep_dir = tmp_path / "outputs" / "train-multirun" / parent.data.tags["sweep_id"]
    assert "best_params" in (sweep_dir / "optimization_results.yaml").read_text()

    # an interruption leaves a trial RUNNING; the next invocation re-runs its parameters first
    stale = study.ask({"optimizer.lr": optuna.distributions.FloatDistribution(1e-5, 3e-3, log=True)})
    multirun(tmp_path, *search, "hydra.sweeper.n_trials=4")
    study = optuna.load_study(study_name=study.study_name, storage=storage)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * 3 + ["FAIL", "COMPLETE"]
    assert study.trials[4].user_attrs["retry_of"] == stale.number
    assert study.trials[4].params["optimizer.lr"] == stale.params["optimizer.lr"]


@pytest.mark.slow
def test_two_parallel_jobs_four_trials_lose_no_run(tmp_path):
    multirun(tmp_path, *FAST, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
             "optimizer.lr=1e-4,3e-4", "freezing=layer4,none")
    client, trials, parent = trials_and_parent(tmp_path)
    finished = [r for r in trials if r.info.status == "FINISHED"]
    assert len(trials) == 4 and len(finished) == 4
    assert parent.data.tags["launcher"] == "JoblibLauncher"
    for run in finished:  # complete runs: metrics, the model, the config artifact
        assert {"val/auroc", "test/auroc", "test/threshold"} <= set(run.data.metrics)
        assert client.search_logged_models([run.info.experiment_id],
                                           filter_string=f"source_run_id = '{run.info.run_id}'")
    with sqlite3.connect(tmp_path / "mlruns" / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'").fetchone()[0] == 5
