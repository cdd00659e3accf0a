"""Ctrl-C leaves a resumable last.ckpt; resuming continues the same MLflow run and ends with exactly
the weights and metrics of an uninterrupted run; checkpoints are atomic and loaded weights_only."""

from __future__ import annotations

import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from pytorch_lightning.callbacks import Callback

from defect_detection import UserError
from defect_detection.models.checkpointing import AtomicCheckpointIO
from defect_detection.pipeline.fit import train
from defect_detection.pipeline.resume import prepare_resume
from defect_detection.tracking.resume import check_checkpoint
from tests.conftest import compose_train

FAST = ("log_model=false", "explain=none", "log_data_summary=false", "data.categories=[disc]",
        "callbacks.early_stopping=null")


class SignalAt(Callback):
    """Sends this process a real signal at the first batch of `epoch`: SIGINT (what Ctrl-C does)
    by default, SIGTERM (what timeout, SLURM and Kubernetes send) with name=SIGTERM. With `once`
    (a file path) it fires only while that file is missing and creates it: a resume with the very
    same config then runs to the end."""

    def __init__(self, epoch: int, name: str = "SIGINT", once: str | None = None) -> None:
        self.epoch, self.signum, self.once = epoch, getattr(signal, name), once

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 0:
            if self.once:
                if Path(self.once).exists():
                    return
                Path(self.once).touch()
            os.kill(os.getpid(), self.signum)


@pytest.fixture
def restore_sigint():
    """Lightning ignores SIGINT after handling one (to finish its shutdown); undo that for pytest.
    Also start from Python's Ctrl-C handler: a shell starts background jobs with SIGINT ignored."""
    handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, handler)


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """One MLflow store and one synthetic dataset for every run of this module."""
    base = tmp_path_factory.mktemp("resume")
    return {"mlruns": base / "mlruns", "data": base / "data", "base": base}


def _cfg(shared, name: str, *overrides: str):
    root = shared["base"] / name
    return compose_train(root, f"paths.mlruns_dir={shared['mlruns']}", f"paths.data_dir={shared['data']}",
                         *FAST, *overrides)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def uninterrupted(shared):
    cfg = _cfg(shared, "straight", "trainer.max_epochs=2")
    return cfg, train(cfg)


@pytest.mark.slow
def test_ctrl_c_then_resume_matches_an_uninterrupted_run(shared, uninterrupted, restore_sigint):
    cfg_a, result_a = uninterrupted
    fired = shared["base"] / "interrupt-fired"
    cfg_b = _cfg(shared, "interrupted", "trainer.max_epochs=2",
                 f"+callbacks.interrupt={{_target_:tests.test_resume.SignalAt,epoch:1,once:{fired}}}")
    with pytest.raises(SystemExit):  # Lightning's graceful Ctrl-C ends in sys.exit(1)
        train(cfg_b)
    client = MlflowClient(cfg_b.logger.tracking_uri)
    [stopped] = client.search_runs([client.get_experiment_by_name(cfg_b.experiment_name).experiment_id],
                                   "attributes.status = 'KILLED'")
    run_id = stopped.info.run_id
    last = Path(stopped.data.tags["checkpoint_dir"]) / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0  # epoch 0 completed and saved
    assert stopped.data.tags["resume_with"] == f"defect-train ckpt_path=last resume_run_id={run_id}"

    # every way of naming the checkpoint finds the same run and file
    same = ("trainer.max_epochs=2", f"+callbacks.interrupt={{_target_:tests.test_resume.SignalAt,epoch:1,"
            f"once:{fired}}}")
    for how in ("ckpt_path=last", f"resume_run_id={run_id}", f"ckpt_path={last}"):
        resume = prepare_resume(_cfg(shared, "interrupted", *same, how))
        assert (resume.run_id, resume.ckpt_path) == (run_id, str(last)), how

    cfg_c = _cfg(shared, "interrupted", "trainer.max_epochs=2", "ckpt_path=last",
                 f"+callbacks.interrupt={{_target_:tests.test_resume.SignalAt,epoch:1,once:{fired}}}")
    result_c = train(cfg_c)
    assert result_c["run_id"] == run_id  # the same MLflow run continued
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resume_count"] == "1"
    assert "resume_with" not in run.data.tags  # the hint is gone once acted on
    assert "ckpt_path: None -> last" in run.data.tags["resume.1.changed"]
    history = {r: [(m.step, m.value) for m in client.get_metric_history(r, "val/loss")]
               for r in (run_id, result_a["run_id"])}
    assert history[run_id] == history[result_a["run_id"]]  # same steps and values, no repeats

    straight = _weights(Path(cfg_a.paths.output_dir) / "checkpoints" / "last.ckpt")
    resumed = _weights(last)
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert result_c["val"] == pytest.approx(result_a["val"], abs=1e-6)
    assert result_c["test"] == pytest.approx(result_a["test"], abs=1e-6)


@pytest.mark.slow
def test_ctrl_c_in_the_first_epoch_says_there_is_nothing_to_resume(shared, restore_sigint, caplog):
    cfg = _cfg(shared, "early", "trainer.max_epochs=2", "experiment_name=early-stop",
               "+callbacks.interrupt={_target_:tests.test_resume.SignalAt,epoch:0}")
    with pytest.raises(SystemExit):
        train(cfg)
    assert "before its first epoch ended" in caplog.text
    with pytest.raises(UserError, match="no unfinished run of experiment 'early-stop'.*has a last.ckpt"):
        prepare_resume(_cfg(shared, "early2", "experiment_name=early-stop", "ckpt_path=last"))


def test_resume_errors_name_the_culprit(shared, tmp_path):
    with pytest.raises(UserError, match="Checkpoint not found: .*nope.ckpt"):
        prepare_resume(_cfg(shared, "x", "ckpt_path=" + str(tmp_path / "nope.ckpt")))
    with pytest.raises(UserError, match="resume_run_id=0123abc: no such run"):
        prepare_resume(_cfg(shared, "x", "resume_run_id=0123abc"))
    with pytest.raises(UserError, match="with logger=none pass ckpt_path=/path/to/last.ckpt"):
        prepare_resume(_cfg(shared, "x", "logger=none", "ckpt_path=last"))


def test_half_written_or_weights_only_checkpoint_is_refused(tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"loops": {}, "optimizer_states": [], "state_dict": {"w": torch.randn(64, 64)}}, good)
    assert check_checkpoint(good) == good
    half = tmp_path / "last.ckpt"
    half.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match=f"Checkpoint {half} cannot be loaded safely.*incomplete"):
        check_checkpoint(half)
    weights_only = tmp_path / "bundle.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, weights_only)
    with pytest.raises(UserError, match="holds weights only"):
        check_checkpoint(weights_only)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_pickle_payload_in_a_checkpoint_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.ckpt"
    torch.save({"loops": {}, "optimizer_states": [], "x": _Payload()}, evil, pickle_module=pickle)
    with pytest.raises(UserError, match="cannot be loaded safely"):
        check_checkpoint(evil)
    with pytest.raises(pickle.UnpicklingError):
        AtomicCheckpointIO().load_checkpoint(evil)  # what trainer.fit(ckpt_path=...) uses
    assert not (tmp_path / "PWNED").exists()


def test_atomic_save_keeps_the_old_checkpoint_when_killed_mid_write(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 0, "w": torch.ones(3)}, target)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"epoch": 1, "w": torch.zeros(3)}, target)
    monkeypatch.undo()
    assert io.load_checkpoint(target)["epoch"] == 0  # the previous complete checkpoint
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]  # no temp file left
