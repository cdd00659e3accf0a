"""The probe of issue 17 (bad inputs and misuses a new user tried), one test per case, on tiny data.

Each test failed before its fix; together they keep the README's reliability table true.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from PIL import Image

from defect_detection import UserError
from defect_detection.config import CONFIG_DIR
from defect_detection.pipeline.fit import train
from defect_detection.pipeline.predict import predict
from defect_detection.tracking.pyfunc import ROOTS_ENV
from tests.conftest import compose_train, wait_for_ping
from tests.test_predict_serve import predict_cfg
from tests.test_promote import make_bundle, make_run, tracking_uri
from tests.test_resume import _cfg


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """One MLflow store and one synthetic dataset for the training runs of this module (test_resume._cfg)."""
    base = tmp_path_factory.mktemp("probe")
    return {"mlruns": base / "mlruns", "data": base / "data", "base": base}


def _promote_cfg(root: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("promote", overrides=[f"paths.root_dir={root}", *overrides])


# -- 1. promotion knows which way is better ---------------------------------------------------------

@pytest.fixture(scope="module")
def loss_store(tmp_path_factory):
    """Two finished runs with models: `good` has the lower val/loss, `bad` the higher one."""
    root = tmp_path_factory.mktemp("probe_promote")
    bundle = make_bundle(root / "bundle.pt")
    good = make_run(root, {"val/auroc": 0.9, "val/loss": 0.2, "test/threshold": 0.4}, bundle=bundle)
    bad = make_run(root, {"val/auroc": 0.8, "val/loss": 0.9, "test/threshold": 0.6}, bundle=bundle)
    return root, good, bad


def test_promote_on_a_loss_picks_the_lowest_and_refuses_a_higher_one(loss_store):
    from defect_detection.pipeline.promote import run_promotion
    from defect_detection.tracking.registry import PromotionRefused

    root, good, bad = loss_store
    result = run_promotion(_promote_cfg(root, "metric=val/loss", "registered_model_name=loss-line"))
    assert result.run_id == good and result.tags["direction"] == "min"
    with pytest.raises(PromotionRefused, match="worse than the current champion"):
        run_promotion(_promote_cfg(root, "metric=val/loss", "registered_model_name=loss-line",
                                   f"run_id={bad}"))
    client = MlflowClient(tracking_uri(root))
    champion = client.get_model_version_by_alias("loss-line", "champion")
    assert champion.run_id == good and champion.tags["forced"] == "false"
    # a metric without a better side needs direction=; a contradicting direction is refused
    with pytest.raises(UserError, match=r"metric=test/threshold: its better side is not known.*direction="):
        run_promotion(_promote_cfg(root, "metric=test/threshold", "registered_model_name=t-line"))
    with pytest.raises(UserError, match="direction=max contradicts metric=val/loss: lower is better"):
        run_promotion(_promote_cfg(root, "metric=val/loss", "direction=max", "registered_model_name=x"))
    explicit = run_promotion(_promote_cfg(root, "metric=test/threshold", "direction=max",
                                          "registered_model_name=t-line"))
    assert explicit.run_id == bad


# -- 3. SIGTERM ends training non-zero, KILLED, with the signal named and the resume hint -----------

STOP = "+callbacks.stop={_target_:tests.test_resume.SignalAt,epoch:1,name:SIGTERM,once:%s}"


@pytest.fixture(scope="module")
def sigterm_stop(shared):
    """A run stopped by SIGTERM at its second epoch (the signal fires once: a resume runs through)."""
    handler = signal.getsignal(signal.SIGTERM)
    same = ("trainer.max_epochs=2", "experiment_name=probe-sigterm", STOP % (shared["base"] / "fired"))
    cfg = _cfg(shared, "sigterm", *same)
    try:
        with pytest.raises(SystemExit) as stop:
            train(cfg)
    finally:
        signal.signal(signal.SIGTERM, handler)
    client = MlflowClient(cfg.logger.tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name("probe-sigterm").experiment_id])
    return cfg, same, stop.value.code, run


def test_sigterm_exits_143_kills_the_run_and_keeps_the_resume_hint(sigterm_stop):
    cfg, _, code, run = sigterm_stop
    assert code == 143
    assert run.info.status == "KILLED" and run.data.tags["error"] == "stopped by SIGTERM"
    assert (Path(run.data.tags["checkpoint_dir"]) / "last.ckpt").is_file()
    assert run.data.tags["resume_with"].startswith("defect-train ckpt_path=last resume_run_id=")


# -- 10. a resumed run drops the stale error and logs each result once ------------------------------

def test_resumed_run_drops_the_stale_error_and_logs_no_step_twice(shared, sigterm_stop):
    cfg, same, _, stopped = sigterm_stop
    client = MlflowClient(cfg.logger.tracking_uri)
    run_id = stopped.info.run_id
    assert [a.path for a in client.list_artifacts(run_id, "error")] == ["error/traceback.txt"]
    train(_cfg(shared, "sigterm", *same, f"resume_run_id={run_id}"))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags  # was the stale SIGTERM
    assert run.data.tags["resume.1.after_error"] == "stopped by SIGTERM"
    assert not client.list_artifacts(run_id, "error")
    moved = [a.path for a in client.list_artifacts(run_id, "resume/1/error")]
    assert moved == ["resume/1/error/traceback.txt"]
    for key in sorted(run.data.metrics):
        if key == "epoch":  # Lightning logs `epoch` beside every metric, several at one step
            continue
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)  # test/* and val/margin were twice at step 0
    assert [m.step for m in client.get_metric_history(run_id, "test/ece")] == [1]  # resume 1
    # issue 33: continuing the FINISHED run never rewrites it: a new run names it as its parent
    before = client.get_run(run_id)
    again = train(_cfg(shared, "sigterm", *[o.replace("max_epochs=2", "max_epochs=3") for o in same],
                       f"resume_run_id={run_id}"))
    assert again["run_id"] != run_id
    child = client.get_run(again["run_id"])
    assert child.data.tags["resumed_from"] == run_id and child.data.tags["mlflow.parentRunId"] == run_id
    after = client.get_run(run_id)
    assert after.data.metrics == before.data.metrics and after.data.tags == before.data.tags
    assert [m.step for m in client.get_metric_history(run_id, "test/ece")] == [1]


# -- 2. the resume hint works when pasted; another config is refused --------------------------------

def test_resume_hint_repeats_the_overrides_and_another_config_is_refused(tmp_path):
    import json
    import shlex

    from defect_detection import project_root
    from defect_detection.pipeline.resume import prepare_resume

    data = _one_class_folder(tmp_path / "parts")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join([str(project_root()), env.get("PYTHONPATH", "")])
    args = [f"paths.root_dir={tmp_path}", "data=folder", f"data.root={data}", "data.image_size=32",
            "data.batch_size=8", "threshold=fixed", "trainer.max_epochs=2", "callbacks.progress_bar=null",
            "callbacks.early_stopping=null", "explain=none", "log_data_summary=false", "log_model=false",
            STOP % (tmp_path / "fired")]
    first = subprocess.run([sys.executable, "-m", "defect_detection.train", *args], env=env,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 143, first.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("defect-detection").experiment_id])
    hint = run.data.tags["resume_with"]
    assert json.loads(run.data.tags["command_overrides"]) == args
    said = first.stdout + first.stderr
    assert f"Training stopped (SIGTERM). Resume with: {hint}" in said and "Ctrl-C" not in said
    assert shlex.split(hint) == ["defect-train", *args, "ckpt_path=last", f"resume_run_id={run.info.run_id}"]

    # the old hint (no overrides) would continue on the synthetic data at 128 px: refused, naming keys
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        bare = compose("train", overrides=[f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/o",
                                           "ckpt_path=last",
                                           f"resume_run_id={run.info.run_id}"])
    with pytest.raises(UserError, match=r"started with a different config; these keys differ: .*"
                                        r"data.image_size: 32 -> 128.*data.name: folder -> synthetic.*"
                                        r"Resume it with its own overrides: defect-train paths.root_dir="):
        prepare_resume(bare)

    pasted = subprocess.run([sys.executable, "-m", "defect_detection.train", *shlex.split(hint)[1:]],
                            env=env, capture_output=True, text=True, timeout=600)
    assert pasted.returncode == 0, pasted.stderr[-3000:]
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resume_count"] == "1"
    assert run.data.params["data.name"] == "folder" and "resume_with" not in run.data.tags


# -- 4. defect-predict refuses symlinks per input, names every input, fails when all fail -------------

@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("probe_bundle") / "bundle.pt", threshold=0.45)


def _png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(path)
    return path


def test_predict_gives_every_input_a_row_and_refuses_links_out_of_the_folder(bundle, tmp_path):
    folder = tmp_path / "parts"
    _png(folder / "a.png")
    _png(folder / "sub" / "b.png", 30)
    secret = _png(tmp_path / "elsewhere" / "secret.png")
    (folder / "leak.png").symlink_to(secret)
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "gone.png").symlink_to(folder / "missing.png")
    table = predict(predict_cfg(tmp_path, f"model={bundle}", f"images={folder}"))
    by_name = {Path(p).name: row for p, row in zip(table["path"], table.itertuples())}
    assert sorted(by_name) == ["a.png", "b.png", "gone.png", "leak.png", "loop.png"]
    assert str(secret) not in set(table["path"]) and str(folder / "leak.png") in set(table["path"])
    assert by_name["a.png"].decision in ("good", "defect") and by_name["b.png"].decision in ("good", "defect")
    assert by_name["leak.png"].decision == "error" and "outside the input root" in by_name["leak.png"].error
    for name in ("loop.png", "gone.png"):
        assert by_name[name].decision == "error" and "broken symlink or a symlink loop" in by_name[name].error
    assert len(pd.read_csv(tmp_path / "out" / "predictions.csv")) == 5
    with pytest.raises(UserError, match="gone.png is a broken symlink"):  # the first refused
        predict(predict_cfg(tmp_path, f"model={bundle}", f"images={folder}", "on_error=fail"))


def test_predict_fails_when_every_input_failed(bundle, tmp_path):
    folder = tmp_path / "links"
    folder.mkdir()
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UserError, match=r"All 3 input\(s\) failed"):
        predict(predict_cfg(tmp_path, f"model={bundle}",
                            f"images=[{folder},{tmp_path}/text.png,{tmp_path}/nowhere]"))
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert list(table["path"]) == [str(folder / "loop.png"), str(tmp_path / "text.png"),
                                   str(tmp_path / "nowhere")]
    assert (table["decision"] == "error").all() and table["error"].notna().all()


# -- 8. a split with one class: stop up front, or NaN metrics, a tag and no promotion -----------------

def _one_class_folder(root: Path, n_good: int = 10, n_defect: int = 2) -> Path:
    """good/ and defect/crack/ with so few defects that none reaches val or test."""
    for i in range(n_good):
        _png(root / "good" / f"{i}.png", 40 + 10 * i)
    for i in range(n_defect):
        _png(root / "defect" / "crack" / f"{i}.png", 250 - 5 * i)
    return root


def _folder_cfg(tmp_path: Path, *overrides: str):
    data = _one_class_folder(tmp_path / "parts")
    return compose_train(tmp_path, "data=folder", f"data.root={data}", "data.image_size=32",
                         "data.batch_size=8", "trainer.max_epochs=1", "callbacks.progress_bar=null",
                         "explain=none", "log_data_summary=false", *overrides, fast=False)


def test_val_without_defects_stops_before_training_saying_how_many_are_needed(tmp_path):
    cfg = _folder_cfg(tmp_path)  # threshold: max_recall_at_fp, chosen on val
    with pytest.raises(UserError, match=r"The val split has 2 good and 0 defect images: threshold.policy="
                                        r"max_recall_at_fp .* at least 3 defect images.*threshold=fixed"):
        train(cfg)
    assert not (tmp_path / "outputs" / "checkpoints").exists()  # nothing was trained


def test_one_class_splits_log_nan_metrics_with_a_tag_and_are_not_promoted(tmp_path):
    from defect_detection.pipeline.promote import run_promotion
    from defect_detection.tracking.registry import PromotionRefused

    cfg = _folder_cfg(tmp_path, "threshold=fixed")
    result = train(cfg)
    client = MlflowClient(cfg.logger.tracking_uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    for name in ("val/auroc", "val/ap", "test/auroc", "test/ap"):
        assert np.isnan(run.data.metrics[name]), name  # was 0.0
    assert "test/auroc" in run.data.tags["undefined_metrics"]
    promote = (f"paths.root_dir={tmp_path}", f"tracking_uri={cfg.logger.tracking_uri}", "metric=val/loss")
    with pytest.raises(PromotionRefused, match=f"Run {result['run_id']} has undefined metrics"):
        run_promotion(_promote_cfg(tmp_path, *promote, f"run_id={result['run_id']}"))
    with pytest.raises(UserError, match="No candidate"):
        run_promotion(_promote_cfg(tmp_path, *promote))


# -- 9. one line, not a traceback (and never torch's weights_only=False advice) ----------------------

def test_predict_batch_size_zero_is_one_line(bundle, tmp_path):
    _png(tmp_path / "a.png")
    with pytest.raises(UserError, match="batch_size=0: use a whole number of images per batch, >= 1"):
        predict(predict_cfg(tmp_path, f"model={bundle}", f"images={tmp_path / 'a.png'}", "batch_size=0"))


def test_weights_path_at_a_non_weights_file_or_another_architecture(tmp_path):
    import torch

    from defect_detection.models.backbones import build_network

    png = _png(tmp_path / "weights.png")
    with pytest.raises(UserError, match="weights.png cannot be loaded as a resnet18 weights file .*: "
                                        "it is not a PyTorch file"):
        build_network("resnet18", pretrained=True, weights_path=str(png))
    lite = tmp_path / "lite0.pth"
    torch.save(build_network("efficientnet_lite0", pretrained=False).state_dict(), lite)
    with pytest.raises(UserError, match=r"lite0.pth does not hold resnet18 weights: \d+ of its 122 "
                                        r"tensors missing, \d+ unexpected"):
        build_network("resnet18", pretrained=True, weights_path=str(lite))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(UserError, match="holds a list, not efficientnet_lite0 weights"):
        build_network("efficientnet_lite0", pretrained=True, weights_path=str(tmp_path / "list.pth"))


def test_export_checks_the_destination_before_loading_anything(tmp_path):
    from defect_detection.pipeline.export import export

    (tmp_path / "file.txt").write_text("a file")
    missing_model = tmp_path / "not-loaded.pt"  # never opened: the destination is checked first
    with pytest.raises(UserError, match=r"file.txt is a file, not a folder"):
        export(str(missing_model), tmp_path / "file.txt" / "sub" / "model.onnx")
    with pytest.raises(UserError, match=r"-o .*model.onnx cannot be written"):
        export(str(missing_model), "/proc/defect-probe/model.onnx")
    with pytest.raises(UserError, match="is a folder"):
        export(str(missing_model), tmp_path)


def test_a_png_as_model_is_one_line_without_unsafe_advice(tmp_path):
    png = _png(tmp_path / "model.png")
    message = "model.png cannot be loaded as a model .*: it is not a PyTorch file"
    with pytest.raises(UserError, match=message) as err:
        predict(predict_cfg(tmp_path, f"model={png}", f"images={png}"))
    assert "weights_only" not in str(err.value)
    proc = subprocess.run([sys.executable, "-m", "defect_detection.predict", f"paths.root_dir={tmp_path}",
                           f"model={png}", f"images={png}", f"output={tmp_path}/p.csv"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "weights_only" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {png} cannot be loaded as a model")


@pytest.mark.parametrize("layers", ["net.nope", "[net.blocks.4,net.nope]"])
def test_bad_gradcam_layer_fails_before_training(tmp_path, layers):
    cfg = compose_train(tmp_path, f"backbone.gradcam_layer={layers}", "data.categories=[disc]",
                        "log_model=false", "log_data_summary=false")
    with pytest.raises(UserError, match="Grad-CAM layer net.nope"):
        train(cfg)
    assert not list((tmp_path / "outputs").rglob("*.ckpt"))  # stopped before the first epoch


# -- 10. smaller ones -----------------------------------------------------------------------------

def test_misplaced_split_fraction_is_an_error_naming_the_right_key(cfg_factory):
    from defect_detection.schema import validate_train_config

    with pytest.raises(UserError, match=r"split.val_fraction is not read.*set split.make.val_fraction=0.9"):
        validate_train_config(cfg_factory("+split.val_fraction=0.9"))
    validate_train_config(cfg_factory("split.make.val_fraction=0.3"))  # the right spelling passes


def test_predict_can_raise_the_pixel_limit_its_message_names(bundle, tmp_path):
    from PIL import Image as PILImage

    saved = PILImage.MAX_IMAGE_PIXELS
    big = _png(tmp_path / "big.png")  # 40 x 40 = 1,600 pixels
    try:
        with pytest.raises(UserError, match="All 1 input"):
            predict(predict_cfg(tmp_path, f"model={bundle}", f"images={big}", "max_image_pixels=1000"))
        table = pd.read_csv(tmp_path / "out" / "predictions.csv")
        assert len(table) == 1 and (table["decision"] == "error").all()
        assert table["error"].str.contains("raise max_image_pixels if the image is genuine").all()
        table = predict(predict_cfg(tmp_path, f"model={bundle}", f"images={big}", "max_image_pixels=2000"))
        assert table["decision"].iloc[0] in ("good", "defect")
        with pytest.raises(UserError, match="max_image_pixels='many': use a whole number of pixels"):
            predict(predict_cfg(tmp_path, f"model={bundle}", f"images={big}", "max_image_pixels=many"))
    finally:
        PILImage.MAX_IMAGE_PIXELS = saved


def test_run_names_differ_although_every_run_is_seeded(cfg_factory):
    import random

    import pytorch_lightning as pl

    from defect_detection.pipeline.fit import build_logger

    names, draws = [], []
    for _ in range(3):
        pl.seed_everything(42)
        logger = build_logger(cfg_factory())
        names.append(logger.experiment.get_run(logger.run_id).info.run_name)
        draws.append(random.random())
    assert len(set(names)) == 3, names  # was the same name every time
    assert len(set(draws)) == 1  # the seeded `random` stream is left as seeding made it


def test_a_tracking_uri_from_the_environment_moves_the_artifacts_too(tmp_path, monkeypatch):
    from defect_detection.tracking.mlflow_run import store_artifact_location

    other = tmp_path / "other-store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other}/mlflow.db")
    cfg = compose_train(tmp_path / "checkout", "data.categories=[disc]", "log_model=false", "explain=none",
                        "log_data_summary=false", f"paths.data_dir={tmp_path}/data")
    result = train(cfg)
    run = MlflowClient(f"sqlite:///{other}/mlflow.db").get_run(result["run_id"])
    assert run.info.artifact_uri.startswith((other / "artifacts").as_uri())
    assert run.data.tags["store.tracking_uri"] == f"sqlite:///{other}/mlflow.db"
    assert run.data.tags["store.artifact_uri"] == run.info.artifact_uri
    assert (other / "artifacts").is_dir() and not (tmp_path / "checkout" / "mlruns").exists()  # no orphans
    # a server decides itself; credentials never reach a tag; an explicit location wins
    assert store_artifact_location({"tracking_uri": "http://mlflow.internal:5000"}) is None
    assert store_artifact_location({"tracking_uri": "http://x", "artifact_location": str(tmp_path)}) \
        == tmp_path.as_uri()
    from defect_detection.tracking.mlflow_run import without_credentials

    assert without_credentials("https://me:secret@mlflow.internal:443/x") == "https://***@mlflow.internal:443/x"


# -- 5 + 6. `make serve` on the project's store; base64 images, path roots, per-row errors ----------

@pytest.mark.slow  # ~40 s: mlflow models serve starts uvicorn and loads torch
def test_make_serve_scores_base64_refuses_paths_outside_its_roots_and_keeps_good_rows(tmp_path):
    import base64
    import json
    import urllib.error
    import urllib.request

    from defect_detection import project_root
    from defect_detection.tracking.registry import find_candidates, promote
    from tests.test_predict_serve import _free_port

    root = tmp_path / "project"
    bundle = make_bundle(root / "bundle.pt", threshold=0.45)
    make_run(root, {"val/auroc": 0.9, "test/threshold": 0.45}, bundle=bundle)
    client = MlflowClient(tracking_uri(root))
    experiment = client.get_experiment_by_name("defect-detection").experiment_id
    promote(client, find_candidates(client, [experiment], "val/auroc")[0], name="defect-classifier",
            metric="val/auroc")
    allowed, shell = tmp_path / "allowed", tmp_path / "shell"
    shell.mkdir()
    image = _png(allowed / "a.png", 90)
    secret = _png(tmp_path / "secret.png")
    port, checkout = _free_port(), project_root()
    make = ["make", "-s", "-C", str(checkout), "-o", ".venv/.installed", "serve", f"STORE={root}/mlruns",
            f"PORT={port}", f"SERVE_ROOTS={allowed}"]
    dry = subprocess.run([*make[:2], "-n", *make[2:]], capture_output=True, text=True, timeout=60).stdout
    assert f"MLFLOW_TRACKING_URI=sqlite:///{root}/mlruns/mlflow.db" in dry and "models serve" in dry
    stray_before = (checkout / "mlflow.db").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", ROOTS_ENV)}
    server = subprocess.Popen(make, cwd=shell, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True)
    try:
        wait_for_ping(server, port, poll_s=0.5)
        b64 = base64.b64encode(image.read_bytes()).decode()
        rows = [{"image_b64": b64}, {"image_b64": "not base64!"}, {"path": str(image)},
                {"path": "/etc/shadow"}, {"path": str(tmp_path / "nowhere.png")}, {"path": str(secret)},
                {"path": str(allowed / ".." / "secret.png")}]
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"dataframe_records": rows}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            out = pd.DataFrame(json.loads(r.read())["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
    assert len(out) == len(rows)
    assert list(out["decision"].iloc[[0, 2]]) == [out["decision"].iloc[0]] * 2 != ["error"] * 2
    assert out["p_defect"].iloc[0] == pytest.approx(out["p_defect"].iloc[2], abs=1e-6)  # bytes = path
    assert pd.isna(out["error"].iloc[0]) and pd.isna(out["error"].iloc[2])
    assert "image_b64: not valid base64" in out["error"].iloc[1]
    refused = set(out["error"].iloc[3:])  # existing, missing, outside, escaping with ..: one line
    assert len(refused) == 1 and refused.pop().startswith("path refused: this server reads paths only under")
    assert (out["decision"].iloc[1:2].tolist() + out["decision"].iloc[3:].tolist()) == ["error"] * 5
    assert not (shell / "mlflow.db").exists() and (checkout / "mlflow.db").exists() == stray_before


def test_pyfunc_in_process_reads_paths_unless_roots_are_set(bundle, tmp_path, monkeypatch):
    from defect_detection.tracking.pyfunc import allowed_roots

    monkeypatch.delenv(ROOTS_ENV, raising=False)
    monkeypatch.delenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", raising=False)
    assert allowed_roots() is None  # in-process: the caller could read the file anyway
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    assert allowed_roots() == []  # served: no path is read by default
    monkeypatch.setenv(ROOTS_ENV, f"{tmp_path}{os.pathsep}/data")
    assert allowed_roots() == [tmp_path.resolve(), Path("/data").resolve()]
    assert allowed_roots(["/srv"]) == [Path("/srv")]


def test_served_pyfunc_scores_base64_and_good_rows_and_refuses_every_path_alike(tmp_path, monkeypatch):
    """The serving policy of the logged model, in-process with MLflow's serving flag set (the
    HTTP round trip is the slow test above)."""
    import base64

    import mlflow

    from defect_detection.tracking.mlflow_run import fluent_tracking_uri

    root = tmp_path / "project"
    run_id = make_run(root, {"val/auroc": 0.9}, bundle=make_bundle(root / "bundle.pt", threshold=0.45))
    with fluent_tracking_uri(tracking_uri(root)):
        model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    image, secret = _png(tmp_path / "ok" / "a.png", 90), _png(tmp_path / "secret.png")
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    b64 = base64.b64encode(image.read_bytes()).decode()
    frame = pd.DataFrame({"image_b64": [b64, "@@", None, None, None],
                          "path": [None, None, str(image), str(secret), str(tmp_path / "nowhere.png")]})
    out = model.predict(frame)
    assert out["decision"].iloc[0] in ("good", "defect") and pd.isna(out["error"].iloc[0])
    assert "not valid base64" in out["error"].iloc[1]
    assert len(set(out["error"].iloc[2:])) == 1 and "path refused" in out["error"].iloc[2]  # no roots set
    monkeypatch.setenv(ROOTS_ENV, str(tmp_path / "ok"))
    out = model.predict(frame)
    assert out["p_defect"].iloc[2] == pytest.approx(out["p_defect"].iloc[0], abs=1e-6)
    assert out["error"].iloc[3] == out["error"].iloc[4] and "path refused" in out["error"].iloc[3]
    assert list(out["decision"].iloc[3:]) == ["error", "error"]
