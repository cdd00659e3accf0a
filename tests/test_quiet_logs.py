"""Quiet logs: three known third-party messages are filtered by message and module, nothing else is;
a training ends with a summary block."""

from __future__ import annotations

import logging
import warnings

import pytest

from defect_detection.quiet import quiet_third_party
from defect_detection.tracking.mlflow_run import RunTracker
from defect_detection.tracking.summary import default_store_uri, log_run_summary, summary_lines, ui_command


def _caught(fn, quiet: bool) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        if quiet:
            quiet_third_party()
        fn()
    return [str(w.message) for w in caught]


def _lightning_leafspec():
    from pytorch_lightning.utilities._pytree import _tree_flatten

    _tree_flatten({"a": 1.0})  # builds a LeafSpec, as every training step does


def _mlflow_untyped_model():
    import mlflow

    class Untyped(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    return Untyped


def test_leafspec_deprecation_is_silenced_only_from_lightning():
    loud = _caught(_lightning_leafspec, quiet=False)
    if not any("LeafSpec" in m for m in loud):
        pytest.skip("this torch does not deprecate LeafSpec")
    assert not any("LeafSpec" in m for m in _caught(_lightning_leafspec, quiet=True))

    def same_text_elsewhere():
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)

    assert _caught(same_text_elsewhere, quiet=True)  # our own module: still shown


def test_mlflow_type_hint_warning_is_silenced_and_other_mlflow_warnings_are_not():
    assert any("Add type hints" in m for m in _caught(_mlflow_untyped_model, quiet=False))
    assert not any("Add type hints" in m for m in _caught(_mlflow_untyped_model, quiet=True))

    def other_warning_same_module():
        warnings.warn_explicit("Type hint used in the model's predict function is not supported", UserWarning,
                               "data_validation.py", 1, module="mlflow.pyfunc.utils.data_validation")

    assert _caught(other_warning_same_module, quiet=True)


def test_litlogger_tip_is_dropped_and_lightning_info_lines_stay(caplog):
    import pytorch_lightning as pl

    quiet_third_party()
    with caplog.at_level(logging.INFO):
        pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False)
        logging.getLogger("pytorch_lightning.utilities.rank_zero").info("💡 Tip: try litlogger")
    text = caplog.text
    assert "GPU available" in text
    assert "litlogger" not in text


def test_summary_block_names_run_ui_numbers_and_report(caplog, tmp_path):
    from mlflow import MlflowClient

    metrics = {"test/auroc": 0.98765, "test/recall": 0.9, "test/fp": 1.0, "test/fn": 2.0}
    lines = summary_lines(metrics, 0.4321, "max_recall_at_fp", "val", run_id="abc123", experiment_id="7",
                          tracking_uri=default_store_uri(), report_uri="file:///x/report.html")
    text = "\n".join(lines)
    assert "run: abc123 (experiment 7)" in text
    assert "make ui" in text and "http://127.0.0.1:5000/#/experiments/7/runs/abc123" in text
    assert "AUROC 0.9877  recall 0.9000  FP 1  FN 2  at threshold 0.4321 (max_recall_at_fp, chosen on val)" \
        in text
    assert "report: file:///x/report.html" in text
    other = f"sqlite:///{tmp_path}/mlflow.db"
    assert ui_command(other)[0] == f"mlflow ui --backend-store-uri {other} --host 127.0.0.1 --port 5000"
    assert ui_command("http://mlflow:5000/") == ("", "http://mlflow:5000")

    client = MlflowClient(other)
    exp = client.create_experiment("e")
    run = client.create_run(exp)

    class Choice:
        value, policy, chosen_on = 0.5, "f1_max", "val"

    with caplog.at_level(logging.INFO):
        log_run_summary(RunTracker(client, run.info.run_id, other), metrics, Choice())
        log_run_summary(RunTracker(), metrics, Choice())
    assert f"run: {run.info.run_id} (experiment {exp})" in caplog.text
    assert "not tracked (logger=none)" in caplog.text


def test_patchcore_trains_without_lightnings_no_optimizer_warnings(tmp_path, caplog):
    """PatchCore does not train by gradient, so it says so (manual optimisation, no optimizer)
    instead of making Lightning warn at every run that configure_optimizers and training_step
    returned None."""
    from defect_detection.pipeline.fit import train
    from tests.conftest import compose_train

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        train(compose_train(tmp_path, "detector=patchcore", "logger=none", "explain=none"))
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "configure_optimizers" in m or "training_step` returned" in m]
