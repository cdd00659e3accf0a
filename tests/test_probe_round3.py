"""The probe of issue 33 (round three of bad inputs and misuses), one test per case, on tiny data.

Each test failed before its fix; scripts/misuse_probe.py runs the same cases through the commands.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from mlflow import MlflowClient
from PIL import Image

from defect_detection import UserError
from defect_detection.config import CONFIG_DIR
from defect_detection.pipeline.fit import train
from tests.conftest import compose_train
from tests.test_promote import make_bundle, make_run, tracking_uri

STOP = "+callbacks.stop={_target_:tests.test_resume.SignalAt,epoch:1,name:SIGTERM,once:%s}"


def _png(path: Path, rng: np.random.Generator, size=(40, 40), defect: bool = False) -> Path:
    arr = (120 + rng.normal(0, 8, (*size, 3))).clip(0, 255).astype(np.uint8)
    if defect:
        arr[size[0] // 2 : size[0] // 2 + 3, 5:-5] = 250
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def _line(root: Path, n_good: int = 15, n_defect: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n_good):
        _png(root / "good" / f"g{i:02d}.png", rng)
    for i in range(n_defect):
        _png(root / "defect" / "scratch" / f"d{i:02d}.png", rng, defect=True)
    return root


def _folder_cfg(root: Path, data: Path, *extra: str):
    epochs = [] if any(e.startswith("trainer.max_epochs=") for e in extra) else ["trainer.max_epochs=1"]
    return compose_train(
        root,
        "data=folder",
        f"data.root={data}",
        "data.image_size=32",
        "data.batch_size=8",
        "explain=none",
        "callbacks.early_stopping=null",
        "callbacks.progress_bar=null",
        *epochs,
        *extra,
        fast=False,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One finished run on a small folder line: (root, data, cfg, result)."""
    base = tmp_path_factory.mktemp("round3")
    data = _line(base / "line")
    cfg = _folder_cfg(base, data)
    return base, data, cfg, train(cfg)


# -- 1. a user-given name that becomes a path ------------------------------------------------------


@pytest.mark.parametrize("category", ["../../X", "/tmp/some/existing/x", "a/b", "..", "bad\x00name"])
def test_a_category_that_would_leave_its_folder_is_refused_before_anything_is_written(tmp_path, category):
    from defect_detection.pipeline.data_summary import data_summary
    from defect_detection.schema import validate_train_config

    data = _line(tmp_path / "line", 4, 3)
    with pytest.raises(UserError, match=r"cannot be a category: it becomes part of file names"):
        validate_train_config(_folder_cfg(tmp_path, data, f"data.category={category!r}"))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "data_summary",
            overrides=[
                "data=folder",
                f"data.root={data}",
                f"data.category={category!r}",
                f"out_dir={tmp_path / 'out'}",
                f"paths.root_dir={tmp_path}",
            ],
        )
    with pytest.raises(UserError, match="cannot be a category"):
        data_summary(cfg)
    assert not (tmp_path / "out").exists() and not list(tmp_path.parent.glob("X*"))


def test_file_safe_keeps_a_name_in_its_folder():
    from defect_detection.naming import check_name, file_safe

    assert [file_safe(n) for n in ("../../X", "a/b", "..", "ok name", "x\\y")] == [
        ".._.._X",
        "a_b",
        "_",
        "ok name",
        "x_y",
    ]
    assert check_name("line-3.A", "data.category") == "line-3.A"


# -- 2. a checkpoint continues only the run that wrote it; a FINISHED run is never rewritten ---------


def test_resuming_a_run_whose_folder_another_run_reused_is_refused(tmp_path):
    from defect_detection.pipeline.resume import prepare_resume

    data = _line(tmp_path / "line")
    same = ("trainer.max_epochs=1", f"paths.output_dir={tmp_path / 'shared-out'}")
    first = train(_folder_cfg(tmp_path, data, *same))
    second = train(_folder_cfg(tmp_path, data, *same))  # Lightning writes last-v1.ckpt beside last.ckpt
    folder = tmp_path / "shared-out" / "checkpoints"
    (folder / "last.ckpt").write_bytes((folder / "last-v1.ckpt").read_bytes())  # e.g. a resume of the second
    with pytest.raises(
        UserError, match=rf"was written by run {second['run_id']}, not by run {first['run_id']}"
    ):
        prepare_resume(
            _folder_cfg(tmp_path, data, *same, "ckpt_path=last", f"resume_run_id={first['run_id']}")
        )


# -- 3. one process per run ------------------------------------------------------------------------


def test_a_live_run_cannot_be_joined_or_its_folder_reused(trained, tmp_path):
    from defect_detection.tracking.run_lock import LOCK_NAME, RunLock, live_holder, refuse_if_live

    base, data, cfg, result = trained
    folder = tmp_path / "checkpoints"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        folder.mkdir()
        import socket

        (folder / LOCK_NAME).write_text(
            json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "run_id": "abc"})
        )
        assert live_holder(folder)["run_id"] == "abc"
        with pytest.raises(
            UserError, match=r"Cannot resume: run abc is still training in .*pid \d+.*Wait for"
        ):
            refuse_if_live(folder, "abc", "Cannot resume")
        with pytest.raises(
            UserError, match="Cannot start: run abc is still training.*another paths.output_dir"
        ):
            train(_folder_cfg(tmp_path, data, f"paths.output_dir={tmp_path}"))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert live_holder(folder) is None  # a dead pid frees the lock
    lock = RunLock(folder)
    lock.acquire("mine")
    assert json.loads((folder / LOCK_NAME).read_text())["run_id"] == "mine"
    lock.release()
    assert not (folder / LOCK_NAME).exists()


# -- 4. credentials never leave the process --------------------------------------------------------


def test_credentials_in_the_tracking_uri_are_masked_in_params_config_logs_and_summary(tmp_path):
    from defect_detection.redact import RedactFilter, redact
    from defect_detection.tracking.mlflow_run import config_yaml, flatten
    from defect_detection.tracking.summary import summary_lines

    uri = "https://ci:hunter2@mlflow.example:443/?token=abc123&x=1"
    cfg = compose_train(tmp_path, f"logger.tracking_uri='{uri}'")
    assert "hunter2" not in json.dumps(flatten(cfg)) and "abc123" not in json.dumps(flatten(cfg))
    assert "hunter2" not in config_yaml(
        cfg
    ) and "https://***@mlflow.example:443/?token=***&x=1" in config_yaml(cfg)
    lines = summary_lines({}, 0.5, "fixed", "val", run_id="r", experiment_id="1", tracking_uri=uri)
    assert not any("hunter2" in line for line in lines)
    record = logging.LogRecord("x", logging.INFO, "f", 1, "store %s", (uri,), None)
    RedactFilter().filter(record)
    assert "hunter2" not in record.getMessage() and "abc123" not in record.getMessage()
    assert redact("postgresql://u:p@ss@db:5432/mlflow") == "postgresql://***@db:5432/mlflow"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        hydra_cfg = compose("train", return_hydra_config=True).hydra.job_logging
    assert hydra_cfg.handlers.console.filters == ["redact"] and hydra_cfg.handlers.file.filters == ["redact"]


# -- 5. serving has a decode budget ----------------------------------------------------------------


def test_a_served_request_is_bounded_by_rows_pixels_and_bytes(tmp_path, monkeypatch):
    import mlflow

    from defect_detection.tracking.mlflow_run import fluent_tracking_uri

    root = tmp_path / "project"
    run_id = make_run(root, {"val/auroc": 0.9}, bundle=make_bundle(root / "bundle.pt"))
    big = tmp_path / "big.png"
    Image.new("RGB", (2000, 1500), (120, 120, 120)).save(big)  # 3 MP each
    b64 = base64.b64encode(big.read_bytes()).decode()
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    with fluent_tracking_uri(tracking_uri(root)):
        model = mlflow.pyfunc.load_model(
            f"runs:/{run_id}/model", model_config={"max_rows": 4, "max_request_pixels": 7_000_000}
        )
    out = model.predict(pd.DataFrame({"image_b64": [b64] * 5}))
    assert list(out["decision"].iloc[:2] != "error") == [True, True]
    assert "exceed 7,000,000 decoded pixels (max_request_pixels)" in out["error"].iloc[2]
    assert "exceed 7,000,000" in out["error"].iloc[3]
    assert "at most 4 rows per request (max_rows)" in out["error"].iloc[4]
    with fluent_tracking_uri(tracking_uri(root)):
        small = mlflow.pyfunc.load_model(f"runs:/{run_id}/model", model_config={"max_request_bytes": 100})
    assert "(max_request_bytes)" in small.predict(pd.DataFrame({"image_b64": [b64]}))["error"].iloc[0]


# -- 6. a resume on changed data is refused ----------------------------------------------------------


def test_resume_after_the_data_folder_changed_is_refused_naming_the_counts(tmp_path):
    import signal

    data = _line(tmp_path / "line")
    same = ("trainer.max_epochs=2", STOP % (tmp_path / "fired"))
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):
            train(_folder_cfg(tmp_path, data, *same))
    finally:
        signal.signal(signal.SIGTERM, handler)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("defect-detection").experiment_id])
    assert "data/fingerprint.json" in [a.path for a in client.list_artifacts(run.info.run_id, "data")]
    rng = np.random.default_rng(9)
    _png(data / "good" / "new1.png", rng)
    _png(data / "good" / "new2.png", rng)
    (data / "good" / "g00.png").unlink()
    with pytest.raises(
        UserError,
        match=r"cannot be continued on these data: since it started, 2 added "
        r"\(.*new1.png.*\); 1 removed \(.*g00.png\)",
    ):
        train(_folder_cfg(tmp_path, data, *same, f"resume_run_id={run.info.run_id}"))
    assert client.get_run(run.info.run_id).info.status == "KILLED"  # untouched


# -- 7. defect-eval scores a run's model on that run's own split -------------------------------------


def test_eval_after_images_were_added_scores_the_runs_test_split_and_names_the_new_set(trained, tmp_path):
    from defect_detection.pipeline.evaluate import evaluate

    base, data, cfg, result = trained
    client = MlflowClient(cfg.logger.tracking_uri)
    split = pd.read_csv(client.download_artifacts(result["run_id"], "data/splits.csv", str(tmp_path)))
    rng = np.random.default_rng(3)
    added = [_png(data / "good" / f"added{i}.png", rng) for i in range(5)]
    try:

        def run(subset: str) -> pd.DataFrame:
            with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
                ecfg = compose(
                    "eval",
                    overrides=[
                        f"paths.root_dir={base}",
                        f"paths.output_dir={tmp_path}/o",
                        f"model=runs:/{result['run_id']}/model",
                        "data=folder",
                        f"data.root={data}",
                        "data.image_size=32",
                        f"subset={subset}",
                        f"report_dir={tmp_path / subset}",
                    ],
                )
            out = evaluate(ecfg)
            return pd.read_csv(next((tmp_path / subset).rglob("predictions.csv"))), out

        test, out = run("test")
        assert set(test["path"]) == set(split.loc[split.split == "test", "path"])
        tags = client.get_run(out["run_id"]).data.tags
        assert tags["split_source"] == f"run:{result['run_id']}" and "5 image(s)" in tags["warning"]
        new, _ = run("new")
        assert set(new["path"]) == {str(p) for p in added}
    finally:
        for p in added:
            p.unlink()


# -- 8. damaged caches and checkpoints are noticed -----------------------------------------------------


def test_a_disk_cache_damaged_in_place_is_re_decoded_with_a_warning(tmp_path, caplog):
    from defect_detection.data.cache import cached_images
    from defect_detection.data.records import ImageRecord

    rng = np.random.default_rng(0)
    records = [ImageRecord(str(_png(tmp_path / f"{i}.png", rng)), 0, "c", "good") for i in range(4)]
    first = cached_images(records, 32, "disk", tmp_path / "cache")
    expected = [first[i].clone() for i in range(4)]
    [npy] = list((tmp_path / "cache").glob("*.npy"))
    raw = bytearray(npy.read_bytes())
    raw[-100:] = bytes(100)  # the last image's last bytes zeroed: same size, other pixels
    npy.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        again = cached_images(records, 32, "disk", tmp_path / "cache")
    assert "1 of 4 entries are damaged (checksum mismatch" in caplog.text
    assert all(torch.equal(again[i], expected[i]) for i in range(4))


def test_a_bundle_or_checkpoint_whose_weights_changed_is_refused(tmp_path, trained):
    from defect_detection.models.inference import _read_bundle

    path = make_bundle(tmp_path / "bundle.pt")
    data = torch.load(path, weights_only=True)
    key = next(k for k, v in data["state_dict"].items() if v.is_floating_point() and v.numel() > 100)
    data["state_dict"][key] = data["state_dict"][key].contiguous()
    data["state_dict"][key].view(-1)[7] += 1e-3  # one weight off: what a flipped bit does
    torch.save(data, path)
    with pytest.raises(UserError, match="is damaged: its weights no longer match the digest"):
        _read_bundle(path)
    base, _, cfg, result = trained
    ckpt = Path(result["best_checkpoint"])
    flipped = tmp_path / "flipped.ckpt"
    data = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in data["state_dict"].items() if v.is_floating_point() and v.numel() > 100)
    data["state_dict"][key] = data["state_dict"][key].contiguous()
    data["state_dict"][key].view(-1)[3] *= -1
    torch.save(data, flipped)
    with pytest.raises(UserError, match="flipped.ckpt is damaged"):
        _read_bundle(flipped)


# -- 9. nothing stored is unpickled or executed by the project's own loaders --------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_file_in_place_of_any_stored_model_file_never_runs(trained, tmp_path):
    from defect_detection.models.loading import load_predictor
    from defect_detection.tracking.mlflow_run import fluent_tracking_uri

    base, data, cfg, result = trained
    client = MlflowClient(cfg.logger.tracking_uri)
    exp = client.get_run(result["run_id"]).info.experiment_id
    [model] = client.search_logged_models([exp], filter_string=f"source_run_id = '{result['run_id']}'")
    model_dir = Path(model.artifact_location.removeprefix("file://"))
    stored = sorted(p.relative_to(model_dir) for p in model_dir.rglob("*") if p.is_file())
    assert not any(p.suffix == ".pkl" for p in stored)  # models from code: nothing is pickled
    assert Path("pyfunc_model.py") in stored and Path("artifacts/bundle.pt") in stored
    marker = tmp_path / "PWNED"
    for name in [*stored, Path("python_model.pkl")]:
        target = model_dir / name
        original = target.read_bytes() if target.exists() else None
        target.write_bytes(pickle.dumps(_Payload(marker)))
        try:
            with fluent_tracking_uri(cfg.logger.tracking_uri):
                predictor = load_predictor(f"runs:/{result['run_id']}/model")
            assert predictor.predict([str(next((data / "good").glob("*.png")))])["decision"].iloc[0] in (
                "good",
                "defect",
            )
            assert name not in (Path("MLmodel"), Path("artifacts/bundle.pt")), name
        except UserError as err:
            assert name in (Path("MLmodel"), Path("artifacts/bundle.pt")), (name, err)
        finally:
            if original is None:
                target.unlink()
            else:
                target.write_bytes(original)
        assert not marker.exists(), name


# -- 10. a run's checkpoints decide at the threshold the run chose ----------------------------------


def test_a_runs_checkpoint_carries_the_val_chosen_threshold(trained, tmp_path, caplog):
    from defect_detection.models.loading import load_predictor

    base, data, cfg, result = trained
    for ckpt in Path(result["best_checkpoint"]).parent.glob("*.ckpt"):
        predictor = load_predictor(ckpt)
        assert (
            predictor.threshold == pytest.approx(result["threshold"])
            and predictor.meta["run_id"] == result["run_id"]
        )
    unstamped = torch.load(result["best_checkpoint"], weights_only=True)
    unstamped["defect_meta"].pop("threshold_chosen")
    torch.save(unstamped, tmp_path / "old.ckpt")
    with caplog.at_level(logging.WARNING):
        load_predictor(tmp_path / "old.ckpt")
    assert "carries no val-chosen threshold" in caplog.text


# -- 11. PatchCore with too few good parts; promotion of a chance-level run -------------------------


def test_patchcore_with_too_few_good_parts_is_refused_and_a_chance_run_is_never_promoted(tmp_path):
    from defect_detection.pipeline.promote import run_promotion
    from defect_detection.tracking.registry import PromotionRefused

    data = _line(tmp_path / "line", n_good=5, n_defect=6)
    with pytest.raises(
        UserError,
        match=r"detector=patchcore needs at least 10 good images in the train split "
        r"and it has 3",
    ):
        train(_folder_cfg(tmp_path, data, "detector=patchcore"))
    root = tmp_path / "store"
    chance = make_run(root, {"val/auroc": 0.5}, bundle=make_bundle(root / "b.pt"))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        pcfg = compose("promote", overrides=[f"paths.root_dir={root}"])
        named = compose("promote", overrides=[f"paths.root_dir={root}", f"run_id={chance}", "force=true"])
    with pytest.raises(UserError, match="No candidate"):
        run_promotion(pcfg)
    with pytest.raises(PromotionRefused, match="val/auroc=0.5: at or below chance"):
        run_promotion(named)


# -- 12, 13, 14. the auto recipe: artifacts beside the store, stopped and resumed as a whole ---------


def test_auto_budget_must_be_positive(tmp_path):
    from defect_detection.auto.entry import run_auto_recipe

    for value in ("0", "-5"):
        cfg = compose_train(tmp_path, "experiment=auto", f"auto.budget_minutes={value}")
        with pytest.raises(UserError, match=rf"auto.budget_minutes={value}: Input should be greater than 0"):
            run_auto_recipe(cfg, [])


def test_experiment_artifacts_go_beside_the_store_on_every_path(tmp_path, monkeypatch):
    from defect_detection.tracking.mlflow_run import get_or_create_experiment

    monkeypatch.chdir(tmp_path)
    store = tmp_path / "elsewhere"
    uri = f"sqlite:///{store}/mlflow.db"
    client = MlflowClient(uri)
    exp = get_or_create_experiment(client, "x", {"tracking_uri": uri})
    assert client.get_experiment(exp).artifact_location == (store / "artifacts").as_uri()
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.slow
def test_auto_stopped_by_sigterm_is_killed_linked_and_resumes_as_a_whole(tmp_path):
    import signal

    from defect_detection.auto.entry import run_auto_recipe

    data = _line(tmp_path / "line", n_good=25)
    overrides = [
        f"paths.root_dir={tmp_path}",
        "data=folder",
        f"data.root={data}",
        "data.image_size=32",
        "data.batch_size=8",
        "explain=none",
        "callbacks.early_stopping=null",
        "experiment=auto",
        "auto.max_candidates=2",
        "trainer.max_epochs=2",
        "callbacks.progress_bar=null",
        STOP % (tmp_path / "fired"),
    ]
    cfg = compose_train(tmp_path, *overrides[1:], fast=False)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as stop:
            run_auto_recipe(cfg, overrides)
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert stop.value.code == 143
    client = MlflowClient(cfg.logger.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("defect-detection").experiment_id])
    [parent] = [r for r in runs if r.data.tags.get("auto") == "parent"]
    children = [r for r in runs if r.data.tags.get("auto") == "candidate"]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    [child] = [r for r in children if r.info.status == "KILLED"]  # patchcore (1 epoch) finished first
    assert parent.info.status == "KILLED" and len(children) == 2
    assert "auto/candidates.md" in [a.path for a in client.list_artifacts(parent.info.run_id, "auto")]
    hint = parent.data.tags["resume_with"]
    assert hint.endswith(f"resume_run_id={parent.info.run_id}")
    again = compose_train(tmp_path, *overrides[1:], f"resume_run_id={child.info.run_id}", fast=False)
    result = run_auto_recipe(again, [*overrides, f"resume_run_id={child.info.run_id}"])
    assert result["auto_parent_run_id"] == parent.info.run_id
    runs = client.search_runs([client.get_experiment_by_name("defect-detection").experiment_id])
    finished = [r for r in runs if r.data.tags.get("auto") in ("candidate", "winner")]
    assert sorted(r.info.status for r in finished) == ["FINISHED", "FINISHED"]
    assert child.info.run_id in {r.info.run_id for r in finished}  # the interrupted one continued
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


# -- 15, 16. one bad row never costs the batch --------------------------------------------------------


def test_a_tiles_model_scores_an_image_smaller_than_a_tile_and_says_so(tmp_path):
    from defect_detection.models.backbones import build_network
    from defect_detection.models.inference import Predictor, save_bundle

    torch.manual_seed(0)
    path = save_bundle(
        tmp_path / "tiles.pt",
        build_network("efficientnet_lite0", pretrained=False),
        backbone="efficientnet_lite0",
        image_size=48,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        threshold=0.5,
        extra={"input": {"name": "tiles", "size": [48, 48], "overlap": 0, "scale": 1.0}},
    )
    rng = np.random.default_rng(0)
    images = [str(_png(tmp_path / "ok.png", rng, (48, 96))), str(_png(tmp_path / "small.png", rng, (20, 20)))]
    out = Predictor(path).predict(images)
    assert list(out["decision"].isin(["good", "defect"])) == [True, True]
    assert (
        pd.isna(out["note"].iloc[0])
        and "smaller than one 48 x 48 tile: upscaled to 48 x 48" in out["note"].iloc[1]
    )


def test_nul_bytes_and_non_utf8_names_are_one_row_error_each(trained, tmp_path, monkeypatch):
    import mlflow

    from defect_detection.data.validate import check_image
    from defect_detection.pipeline.predict import predict
    from defect_detection.tracking.mlflow_run import fluent_tracking_uri
    from tests.test_predict_serve import predict_cfg

    base, data, cfg, result = trained
    good = next((data / "good").glob("*.png"))
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    monkeypatch.setenv("DEFECT_SERVE_ROOTS", str(data))
    with fluent_tracking_uri(cfg.logger.tracking_uri):
        model = mlflow.pyfunc.load_model(f"runs:/{result['run_id']}/model")
    out = model.predict(pd.DataFrame({"path": [f"{data}/good/a\x00b.png", str(good)]}))
    assert "contains a NUL byte" in out["error"].iloc[0] and out["decision"].iloc[1] != "error"
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "fine.png").write_bytes(good.read_bytes())
    odd = folder / os.fsdecode(b"bad\xff.png")
    odd.write_bytes(good.read_bytes())
    table = predict(
        predict_cfg(
            tmp_path,
            f"model=runs:/{result['run_id']}/model",
            f"images={folder}",
            f"tracking_uri={cfg.logger.tracking_uri}",
        )
    )
    csv = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(csv) == 2 == len(table) and "bad\\xff.png" in csv["path"].iloc[0]
    assert "not valid UTF-8" in csv["error"].iloc[0] and csv["decision"].iloc[1] != "error"
    assert "not valid UTF-8 (shown as bad\\xff.png); rename the file" in check_image(str(odd))


# -- 17, 18, 19. checked up front, and one line each ----------------------------------------------------


def test_predict_checks_its_output_before_loading_or_scoring(tmp_path):
    from defect_detection.pipeline.predict import predict
    from tests.test_predict_serve import predict_cfg

    (tmp_path / "a-folder").mkdir()
    cfg = predict_cfg(
        tmp_path, "model=/no/such/model.pt", f"images={tmp_path}", f"output={tmp_path / 'a-folder'}"
    )
    with pytest.raises(UserError, match=r"output=.*a-folder is a folder: name the CSV file"):
        predict(cfg)


def test_two_first_runs_create_a_new_sqlite_store_one_at_a_time(tmp_path):
    uri = f"sqlite:///{tmp_path}/new/mlflow.db"
    code = (
        "import sys; from defect_detection.tracking.mlflow_run import ensure_local_store, "
        "get_or_create_experiment; from mlflow import MlflowClient; ensure_local_store(sys.argv[1]); "
        "print(get_or_create_experiment(MlflowClient(sys.argv[1]), 'x', {'tracking_uri': sys.argv[1]}))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, uri], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-2000:] for _, e in outs]
    assert len({o.strip() for o, _ in outs}) == 1  # one experiment, the same id for all


def test_missing_values_bad_sizes_links_and_devices_get_one_clear_line(tmp_path, trained):
    from defect_detection.data.validate import checked_image_paths
    from defect_detection.models.loading import load_predictor
    from defect_detection.schema import validate_train_config

    for module, missing in (
        ("defect_detection.predict", "images"),
        ("defect_detection.explain_cmd", "inputs"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", module, f"paths.root_dir={tmp_path}", "model=x.pt"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert f"error: {missing} is required: pass {missing}=<value>" in done.stderr
    with pytest.raises(
        UserError,
        match=r"data.image_size='abc': Input should be a valid integer.*; or Input "
        r"should be a valid list",
    ):
        validate_train_config(compose_train(tmp_path, "data.image_size=abc"))
    inside, outside = tmp_path / "in", tmp_path / "out.png"
    inside.mkdir()
    Image.new("RGB", (8, 8)).save(outside)
    (inside / "link.png").symlink_to(outside)
    [(_, reason)] = checked_image_paths(inside)
    assert "pass follow_symlinks=true" in reason
    assert "\nfollow_symlinks: false" in (Path(CONFIG_DIR) / "predict.yaml").read_text()
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"device=cuda: PyTorch sees no CUDA GPU on this machine"):
            load_predictor(trained[3]["best_checkpoint"], device="cuda")
