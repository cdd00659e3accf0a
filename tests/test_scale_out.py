"""Scale-out on standard engines: DDP (simulated on CPU with gloo), the submitit launcher with its
local executor, and a real `mlflow server` over HTTP (sqlite, and PostgreSQL: a throwaway cluster
from the system's initdb/pg_ctl, or the server in DEFECT_TEST_POSTGRES_URI).

The slow tests start real processes through the same command a user types (`defect-train`):
Lightning's DDP re-runs that command for rank 1, so it cannot be exercised from inside pytest.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path

import pytest
import sqlalchemy
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from mlflow import MlflowClient

from defect_detection import UserError
from defect_detection.config import CONFIG_DIR
from defect_detection.distributed import check_launch
from tests.postgres_cluster import ClusterUnavailable, postgres_cluster

# Tiny, untrained-from-ImageNet runs: what differs between the runs compared here is only how
# they are launched. No augmentation (its random draws differ per rank), frozen BatchNorm
# (batch statistics would differ per shard) and a plain mean loss.
TINY = ("debug=fast", "backbone=resnet18", "backbone.pretrained=false", "explain=none",
        "log_data_summary=false", "augmentation=none", "freezing=head_only", "loss=ce")


def cli(root: Path, *args: str, timeout: int = 420, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    base["MLFLOW_ENABLE_ASYNC_LOGGING"] = "false"
    flags = [a for a in args if a.startswith("-")]  # -m before the overrides (argparse)
    args = tuple(a for a in args if not a.startswith("-"))
    proc = subprocess.run([sys.executable, "-m", "defect_detection.train", *flags, f"paths.root_dir={root}",
                           *args],
                          cwd=root, env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def compose_config(root: Path, name: str, *overrides: str):
    base = [f"paths.root_dir={root}", f"paths.output_dir={root}/outputs"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=[*base, *overrides])


def local_store(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")


def runs_of(client: MlflowClient, experiment: str = "defect-detection", query: str = ""):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=query, max_results=100) if exp else []


# -- fast: configs and guards ------------------------------------------------------------------------

@pytest.mark.parametrize("trainer, expected", [
    ("ddp", {"accelerator": "gpu", "devices": -1, "strategy": "ddp"}),
    ("ddp_multinode", {"accelerator": "gpu", "strategy": "ddp", "num_nodes": 2}),
    ("gpu_bf16", {"accelerator": "gpu", "precision": "bf16-mixed"}),
    ("ddp_sim", {"accelerator": "cpu", "devices": 2}),
])
def test_trainer_configs_compose(cfg_factory, trainer, expected):
    cfg = cfg_factory(f"trainer={trainer}")
    assert {k: cfg.trainer[k] for k in expected} == expected
    assert cfg.trainer.max_epochs == 1  # the debug overlay still applies on top


def test_ddp_sim_is_a_two_process_gloo_trainer_that_refuses_to_start_inside_python(cfg_factory):
    cfg = cfg_factory("trainer=ddp_sim")
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    assert trainer.world_size == 2 and trainer.strategy._process_group_backend == "gloo"
    assert not trainer.is_global_zero or trainer.global_rank == 0
    with pytest.raises(UserError, match="re-runs the command line"):
        check_launch(trainer)  # from pytest, Lightning would re-run pytest for rank 1


def test_ddp_spawn_is_refused_with_the_fix(cfg_factory):
    cfg = cfg_factory("trainer=ddp_sim", "~trainer.strategy", "+trainer.strategy=ddp_spawn")
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False)
    with pytest.raises(UserError, match="trainer=ddp"):
        check_launch(trainer)


def test_launcher_configs_compose(tmp_path):
    base = [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/out"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        slurm = compose("train", overrides=[*base, "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                            "hydra.launcher.gpus_per_node=4"], return_hydra_config=True)
        local = compose("train", overrides=[*base, "hydra/launcher=slurm_local"], return_hydra_config=True)
    launcher = slurm.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.partition == "gpu"
    assert launcher.tasks_per_node == 4 and launcher.timeout_min > 0 and launcher.array_parallelism > 0
    assert local.hydra.launcher._target_.endswith("LocalLauncher")


def test_mlflow_server_logger_takes_the_uri_from_config_or_environment(cfg_factory, monkeypatch):
    cfg = cfg_factory("logger=mlflow_server", "logger.tracking_uri=http://mlflow.example:5000")
    assert cfg.logger.tracking_uri == "http://mlflow.example:5000"
    assert cfg.logger.artifact_location is None  # the server decides where artifacts go
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team-mlflow:8080")
    assert cfg_factory("logger=mlflow_server").logger.tracking_uri == "http://team-mlflow:8080"


def test_gathered_outputs_drop_the_sampler_padding(cfg_factory):
    """A DistributedSampler repeats samples to even out the shards: each index counts once."""
    from defect_detection.models.module import DefectClassifier

    module = DefectClassifier(torch.nn.Linear(2, 2), torch.nn.CrossEntropyLoss(), None, None)
    p = torch.tensor([0.1, 0.9, 0.4, 0.1])
    module._collect["val"] = [(p[:2], torch.tensor([0, 1]), torch.tensor([2, 0]), torch.zeros(2, 2)),
                              (p[2:], torch.tensor([1, 0]), torch.tensor([1, 2]), torch.zeros(2, 2))]
    module._gather("val")
    out = module.outputs["val"]
    assert out["index"].tolist() == [0, 1, 2]
    assert out["p_defect"].tolist() == pytest.approx([0.9, 0.4, 0.1]) and out["label"].tolist() == [1, 1, 0]


# -- slow: real processes -------------------------------------------------------------------------------

DDP_COMPARE = (*TINY, "data.records.n_train_good=7", "optimizer=sgd", "optimizer.lr=0.01",
               "trainer.max_epochs=2")


@pytest.mark.slow
def test_ddp_sim_logs_once_and_scores_every_image_once(tmp_path):
    """Two gloo processes: one MLflow run (rank 0), one model, every test image scored once, and
    the confusion counts reduced over both ranks add up to the whole test split."""
    cli(tmp_path, *DDP_COMPARE, "trainer=ddp_sim", "data.batch_size=18", "run_name=ddp")
    client = local_store(tmp_path)
    runs = runs_of(client)
    assert [r.info.run_name for r in runs] == ["ddp"]  # rank 1 created no run of its own
    ddp = runs[0]
    assert ddp.info.status == "FINISHED" and ddp.data.params["trainer.devices"] == "2"
    counts = sum(ddp.data.metrics[k] for k in ("test/tp", "test/fp", "test/tn", "test/fn"))
    assert counts == ddp.data.metrics["test/n"] == 12  # both ranks' halves, no sampler padding
    models = client.search_logged_models([ddp.info.experiment_id],
                                         filter_string=f"source_run_id = '{ddp.info.run_id}'")
    assert len(models) == 1
    predictions = Path(client.download_artifacts(ddp.info.run_id, "reports/predictions.csv", str(tmp_path)))
    lines = predictions.read_text().strip().splitlines()
    assert len(lines) - 1 == 12 and len(set(lines)) == len(lines)


@pytest.mark.slow
def test_ddp_sim_matches_a_single_process_run(tmp_path):
    """Two gloo processes with 18 images each per step vs one process with all 36 in one step.

    With nothing random per rank (no augmentation, frozen BatchNorm, unweighted mean loss), DDP's
    gradient all-reduce averages two 18-image means, which is the 36-image mean: the weights after
    each step, and so every score, agree up to float summation order. Tolerance 1e-4 on AUROC/AP
    and the threshold (a p_defect value) leaves room for that and for nothing else: a lost or
    duplicated val sample, an un-synced metric or a per-rank threshold moves them by >= 1/36.
    SGD, not Adam: Adam's first step divides each gradient component by its own magnitude, so
    float-rounding noise in near-zero components becomes a full-size step.
    Frozen BatchNorm left in training mode (each rank's running statistics from its own 18 images)
    put them up to 0.08 AUROC apart: see test_frozen_batchnorm_stays_in_eval_mode_while_training.
    """
    cli(tmp_path, *DDP_COMPARE, "trainer=ddp_sim", "data.batch_size=18", "run_name=ddp", "log_model=false")
    cli(tmp_path, *DDP_COMPARE, "trainer=cpu", "data.batch_size=36", "run_name=single", "log_model=false")
    runs = {r.info.run_name: r for r in runs_of(local_store(tmp_path))}
    ddp, single = runs["ddp"], runs["single"]
    for key in ("val/auroc", "val/ap", "test/auroc", "test/ap", "test/threshold", "val/loss", "test/loss"):
        assert ddp.data.metrics[key] == pytest.approx(single.data.metrics[key], abs=1e-4), key
    for key in ("test/tp", "test/fp", "test/tn", "test/fn", "test/n"):
        assert ddp.data.metrics[key] == single.data.metrics[key], key


@pytest.mark.slow
def test_submitit_local_launcher_runs_two_trials(tmp_path):
    cli(tmp_path, "-m", "hydra/launcher=slurm_local", *TINY, "log_model=false", "seed=1,2")
    runs = runs_of(local_store(tmp_path), query="metrics.`val/auroc` >= 0")
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.data.params["seed"] for r in runs) == ["1", "2"]
    assert list(tmp_path.glob("outputs/train-multirun/*/.submitit/*/*_result.pkl"))  # submitit did it


# -- a real tracking server: sqlite, and PostgreSQL when initdb/pg_ctl are on PATH ----------------------

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {timeout}s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def postgres_uri():
    """DEFECT_TEST_POSTGRES_URI (an external server), else a throwaway cluster from the system's
    initdb/pg_ctl, started once per session and always stopped and removed; skipped with the
    reason when neither is possible."""
    pytest.importorskip("psycopg", reason="PostgreSQL needs psycopg[binary]: pip install -e '.[dev]'")
    uri = os.environ.get("DEFECT_TEST_POSTGRES_URI")
    if uri:
        yield uri
        return
    with ExitStack() as stack:
        try:
            cluster = stack.enter_context(postgres_cluster())
        except ClusterUnavailable as err:
            pytest.skip(f"no PostgreSQL cluster could start ({err}); an external server: "
                        "DEFECT_TEST_POSTGRES_URI=postgresql://user:pass@host:5432/db")
        yield cluster.uri


@pytest.fixture(params=["sqlite", "postgresql"])
def mlflow_backend(request, tmp_path) -> str:
    """The server's backend store URI."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/server/mlflow.db"
    return request.getfixturevalue("postgres_uri")  # started only when a PostgreSQL case runs


@pytest.fixture
def mlflow_server(mlflow_backend, tmp_path):
    """`mlflow server` on 127.0.0.1 with --serve-artifacts; always terminated."""
    backend = mlflow_backend
    (tmp_path / "server").mkdir(exist_ok=True)
    port, log = _free_port(), tmp_path / "server" / "server.log"
    url = f"http://127.0.0.1:{port}"
    mlflow_bin = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    with open(log, "w") as out:
        proc = subprocess.Popen([mlflow_bin, "server", "--backend-store-uri", backend,
                                 "--artifacts-destination", str(tmp_path / "server" / "artifacts"),
                                 "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port),
                                 "--workers", "1"], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # its own session: only the server and its workers
            proc.wait(timeout=10)


def test_train_and_promote_against_a_tracking_server(mlflow_server, mlflow_backend, tmp_path):
    import mlflow

    from defect_detection.pipeline.fit import train
    from defect_detection.pipeline.promote import run_promotion

    experiment, model_name = f"scale-{uuid.uuid4().hex[:8]}", f"defect-{uuid.uuid4().hex[:8]}"
    server = ("logger=mlflow_server", f"logger.tracking_uri={mlflow_server}", f"experiment_name={experiment}")
    # the pretrained default backbone: a random-init one ranks at chance, and promotion refuses that
    tiny = [o for o in TINY if not o.startswith(("backbone", "freezing"))] + ["trainer.max_epochs=3"]
    result = train(compose_config(tmp_path, "train", *tiny, *server))
    client = MlflowClient(mlflow_server)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and "val/auroc" in run.data.metrics
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # stored by the server, sent over HTTP
    assert (tmp_path / "server" / "artifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()  # nothing went to a local store

    promote_cfg = compose_config(tmp_path, "promote", *server, f"registered_model_name={model_name}")
    promotion = run_promotion(promote_cfg)
    assert promotion.action == "promoted" and promotion.run_id == result["run_id"]
    champion = client.get_model_version_by_alias(model_name, "champion")
    assert champion.run_id == result["run_id"]
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")  # downloaded over HTTP
    assert model.metadata.run_id == result["run_id"]

    engine = sqlalchemy.create_engine(mlflow_backend)  # the server wrote to the backend under test
    try:
        with engine.connect() as conn:
            stored = conn.execute(sqlalchemy.text("SELECT status FROM runs WHERE run_uuid = :id"),
                                  {"id": result["run_id"]}).scalar_one()
            alias = conn.execute(sqlalchemy.text("SELECT alias FROM registered_model_aliases "
                                                 "WHERE name = :n"), {"n": model_name}).scalar_one()
    finally:
        engine.dispose()
    assert (stored, alias) == ("FINISHED", "champion")


def test_frozen_batchnorm_stays_in_eval_mode_while_training(cfg_factory):
    """Lightning >= 2.2 never calls module.train() in fit: the module re-applies its frozen BN
    eval mode itself, else frozen BN normalises with per-batch (per-rank under DDP) statistics."""
    import pytorch_lightning as pl

    from defect_detection.pipeline.builders import build_datamodule, build_module

    cfg = cfg_factory("backbone=resnet18", "backbone.pretrained=false", "freezing=head_only")
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule.class_counts("train"))
    seen: list[bool] = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.extend(bn.training for bn in pl_module._frozen_bn)

    trainer = pl.Trainer(accelerator="cpu", max_epochs=2, limit_train_batches=1, limit_val_batches=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[Probe()])
    trainer.fit(module, datamodule=datamodule)
    assert seen and not any(seen)
