"""Bad layouts and config values end in one message naming the culprit; a crash leaves a FAILED run
with its traceback; the same config and seed give the same numbers twice."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from pytorch_lightning.callbacks import Callback

from defect_detection import UserError
from defect_detection.data.records import check_records, read_folder, read_mvtec
from defect_detection.pipeline.builders import build_datamodule
from defect_detection.pipeline.fit import train
from defect_detection.schema import validate_train_config
from tests.conftest import compose_train

FAST = ("log_model=false", "explain=none", "log_data_summary=false", "data.categories=[disc]")


def _img(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)
    return path


# -- layout -----------------------------------------------------------------------------------

def test_missing_or_looping_root_names_the_path(tmp_path):
    with pytest.raises(UserError, match=f"Folder dataset root not found: {tmp_path / 'nope'}"):
        read_folder(tmp_path / "nope")
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(UserError, match=f"MVTec root {tmp_path / 'loop'} is a broken symlink or a symlink"):
        read_mvtec(tmp_path / "loop", ["bottle"])
    _img(tmp_path / "ds" / "good" / "a.png")
    with pytest.raises(UserError, match=f"defect/ folder not found: {tmp_path / 'ds' / 'defect'}"):
        read_folder(tmp_path / "ds")


def test_unknown_category_lists_the_ones_present(tmp_path):
    _img(tmp_path / "widget" / "train" / "good" / "0.png")
    message = r"Category 'gadget' not found: .*gadget\. Categories present .*'widget'"
    with pytest.raises(UserError, match=message):
        read_mvtec(tmp_path, ["gadget"])


def test_category_without_good_images_is_an_error(tmp_path):
    (tmp_path / "widget" / "train" / "good").mkdir(parents=True)
    _img(tmp_path / "widget" / "test" / "crack" / "0.png")
    with pytest.raises(UserError, match=f"No good training images in {tmp_path / 'widget/train/good'}"):
        read_mvtec(tmp_path, ["widget"])


def test_category_without_defects_is_a_warning_naming_where_they_belong(tmp_path, caplog):
    _img(tmp_path / "widget" / "train" / "good" / "0.png")
    _img(tmp_path / "widget" / "test" / "good" / "0.png")
    _img(tmp_path / "gadget" / "train" / "good" / "0.png")
    _img(tmp_path / "gadget" / "test" / "dent" / "0.png")
    records = read_mvtec(tmp_path, ["widget", "gadget"])  # the pooled dataset still has both classes
    check_records(records, str(tmp_path))
    expected = f"Category 'widget' has no defect images (expected {tmp_path / 'widget/test'}/<defect_type>"
    assert expected in caplog.text
    with pytest.raises(UserError, match=f"No defect images found in {tmp_path}.*test/<type>/"):
        check_records(read_mvtec(tmp_path, ["widget"]), str(tmp_path))  # alone it cannot train


def test_masks_without_images_and_images_without_masks_are_named(tmp_path, caplog):
    cat = tmp_path / "widget"
    _img(cat / "train" / "good" / "0.png")
    _img(cat / "test" / "crack" / "000.png")
    _img(cat / "test" / "crack" / "001.png")
    _img(cat / "ground_truth" / "crack" / "000_mask.png")
    _img(cat / "ground_truth" / "crack" / "007_mask.png")  # its image was deleted
    _img(cat / "ground_truth" / "hole" / "000_mask.png")  # a whole defect folder is missing
    (cat / "test" / "dent").mkdir()
    with caplog.at_level(logging.WARNING):
        records = read_mvtec(tmp_path, ["widget"])
    text = caplog.text
    assert f"1 image(s) have no mask in {cat / 'ground_truth/crack'} (expected 001_mask.png)" in text
    assert f"{cat / 'test/crack/001.png'}" in text
    assert f"1 mask(s) in {cat / 'ground_truth/crack'} have no image" in text and "007_mask.png" in text
    assert f"Masks in {cat / 'ground_truth/hole'} have no images: expected a folder {cat / 'test/hole'}" \
        in text
    assert f"{cat / 'test/dent'} holds no images" in text
    masks = {Path(r.path).name: r.mask_path for r in records if r.defect_type == "crack"}
    assert masks == {"000.png": str(cat / "ground_truth/crack/000_mask.png"), "001.png": None}

    caplog.clear()
    _img(tmp_path / "f" / "good" / "0.png")
    _img(tmp_path / "f" / "defect" / "scratch" / "a.png")
    _img(tmp_path / "f" / "masks" / "scratch" / "b_mask.png")
    with caplog.at_level(logging.WARNING):
        read_folder(tmp_path / "f")
    assert "1 image(s) have no mask" in caplog.text and "1 mask(s) in" in caplog.text


def test_empty_split_after_splitting_names_the_split_and_the_fix(cfg_factory, tmp_path):
    for i in range(2):
        _img(tmp_path / "tiny" / "good" / f"{i}.png", i)
        _img(tmp_path / "tiny" / "defect" / "crack" / f"{i}.png", 200 + i)
    cfg = cfg_factory("data=folder", f"data.root={tmp_path / 'tiny'}", "data.image_size=32", fast=False)
    with pytest.raises(UserError, match=r"The (test|val) split is empty after splitting \(\d+/\d+/\d+ "
                                        r"train/val/test\).*split.val_fraction / split.test_fraction"):
        build_datamodule(cfg)


# -- config -----------------------------------------------------------------------------------

@pytest.mark.parametrize("override, culprit", [
    ("data.on_bad_image=ignore", "data.on_bad_image='ignore'"),
    ("data.max_image_pixels=-5", "data.max_image_pixels=-5"),
])
def test_bad_reliability_values_name_key_and_allowed_values(cfg_factory, override, culprit):
    with pytest.raises(UserError, match=culprit):
        validate_train_config(cfg_factory(override))


# -- crashes and determinism ---------------------------------------------------------------------

class Boom(Callback):
    """A bug inside training: raises at the first training batch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        raise RuntimeError("boom inside the training loop")


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("reliability")
    return {"mlruns": base / "mlruns", "data": base / "data", "base": base}


def _cfg(shared, name: str, *overrides: str):
    return compose_train(shared["base"] / name, f"paths.mlruns_dir={shared['mlruns']}",
                         f"paths.data_dir={shared['data']}", *FAST, *overrides)


def test_exception_inside_training_marks_the_run_failed_with_its_traceback(shared):
    cfg = _cfg(shared, "crash", "+callbacks.boom={_target_:tests.test_reliability.Boom}")
    with pytest.raises(RuntimeError, match="boom inside the training loop"):
        train(cfg)
    client = MlflowClient(cfg.logger.tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name(cfg.experiment_name).experiment_id],
                               "attributes.status = 'FAILED'")
    assert run.data.tags["error"] == "RuntimeError: boom inside the training loop"
    text = Path(client.download_artifacts(run.info.run_id, "error/traceback.txt")).read_text()
    assert "Traceback" in text and "in on_train_batch_end" in text and "boom inside the training loop" in text


@pytest.mark.slow
def test_same_config_and_seed_give_identical_metrics_and_weights(shared):
    results = []
    for name in ("first", "second"):
        cfg = _cfg(shared, name, "trainer.max_epochs=2")
        result = train(cfg)
        weights = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
        results.append((result, weights["state_dict"]))
    (a, wa), (b, wb) = results
    assert a["run_id"] != b["run_id"]
    assert a["val"] == b["val"] and a["test"] == b["test"] and a["threshold"] == b["threshold"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
