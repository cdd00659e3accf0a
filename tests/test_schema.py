import pytest

from defect_detection import UserError
from defect_detection.schema import validate_train_config


@pytest.mark.parametrize("override, culprit", [
    ("optimizer.lr=0", "optimizer.lr=0"),
    ("optimizer.lr=-1e-3", "optimizer.lr=-0.001"),
    ("split.make.val_fraction=0.9", "sum must be below 1"),
    ("threshold=fixed threshold.value=1.5", "threshold.value=1.5"),
    ("data.batch_size=0", "data.batch_size=0"),
    ("data.image_size=16", "data.image_size=16 is smaller than efficientnet_lite0 allows"),
    ("threshold=max_recall_at_fp threshold.max_fp=-1", "threshold.max_fp=-1"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0"),
    ("loss.weights=[1,-2]", "loss.weights"),
])
def test_bad_values_name_key_value_and_range(cfg_factory, override, culprit):
    cfg = cfg_factory(*override.split())
    with pytest.raises(UserError) as info:
        validate_train_config(cfg)
    assert culprit in str(info.value)


def test_all_errors_are_reported_together(cfg_factory):
    with pytest.raises(UserError) as info:
        validate_train_config(cfg_factory("optimizer.lr=0", "data.batch_size=0"))
    assert "optimizer.lr" in str(info.value) and "data.batch_size" in str(info.value)


def test_default_config_is_valid(cfg_factory):
    validate_train_config(cfg_factory(fast=False))
