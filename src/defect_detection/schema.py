"""The composed config, validated and typed: fail before any data is read or weights loaded.

Hydra already rejects unknown group options; this catches values that compose fine but cannot
work (a negative learning rate, split fractions that leave nothing to train on, a threshold
outside [0, 1]) and names the key, the value and the allowed range.

The same models are the typed settings the parts below the pipeline take (a family gets
ModelSettings, the data reader DataSchema, the map gallery ExplainSchema, calibration
CalibrationSchema): a signature says what a module needs, and the whole DictConfig stays with the
pipeline that composed it. Instantiable groups (optimizer, scheduler, data.records, split.make)
keep their Hydra `_target_` keys; `instantiable()` hands them to hydra.utils.instantiate.
"""

from __future__ import annotations

from typing import Literal, TypeVar

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from defect_detection.base import UserError
from defect_detection.data.geometry import size_hw
from defect_detection.data.images import DEFAULT_MAX_PIXELS
from defect_detection.naming import ALLOWED, name_problem


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


M = TypeVar("M", bound=BaseModel)


class OptimizerSchema(_Loose):
    lr: float = Field(gt=0, le=10)
    weight_decay: float = Field(default=0.0, ge=0)


class SplitMakeSchema(_Loose):
    val_fraction: float = Field(ge=0, lt=1)
    test_fraction: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _leaves_training_data(self):
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g}"
                             " leaves no training data; the sum must be below 1")
        return self


class SplitSchema(_Loose):
    make: SplitMakeSchema

    @model_validator(mode="before")
    @classmethod
    def _no_misplaced_fractions(cls, values):
        # `+split.val_fraction=0.9` (Hydra's suggested spelling) adds a key nothing reads
        keys = ("val_fraction", "test_fraction", "seed")
        misplaced = [k for k in keys if isinstance(values, dict) and k in values]
        if misplaced:
            raise ValueError(f"split.{misplaced[0]} is not read: the split's settings live under "
                             f"split.make; set split.make.{misplaced[0]}={values[misplaced[0]]} instead")
        return values


class ThresholdSchema(_Loose):
    policy: Literal["fixed", "max_recall_at_fp", "min_fp_at_recall", "f1_max", "cost", "fp_rate_bound",
                    "cross_val"]
    value: float = Field(default=0.5, ge=0, le=1)
    max_fp: int = Field(default=0, ge=0)
    min_recall: float = Field(default=0.95, ge=0, le=1)
    cost_fp: float = Field(default=1.0, ge=0)
    cost_fn: float = Field(default=1.0, ge=0)
    fallback: float = Field(default=0.5, ge=0, le=1)
    max_fp_rate: float = Field(default=0.05, gt=0, lt=1)
    estimator: Literal["normal", "robust_normal", "bootstrap", "exp_tail"] = "normal"
    confidence: float = Field(default=0.95, gt=0, lt=1)
    folds: int = Field(default=3, ge=2)
    fragile_log_odds: float = Field(default=1.0, gt=0)


class DataSchema(_Loose):
    name: str = "folder"
    root: str | None = None
    image_size: int | list[int]
    batch_size: int = Field(ge=1)
    num_workers: int = Field(default=0, ge=0)
    categories: list[str] = Field(min_length=1)
    on_bad_image: Literal["error", "skip"] = "error"
    max_image_pixels: int | None = Field(default=DEFAULT_MAX_PIXELS, ge=0)
    records: dict = Field(default_factory=dict)  # the reader, instantiated by data/validate.py
    extra_roots: list[str] = Field(default_factory=list)  # folders whose parts join the train split

    @field_validator("categories")
    @classmethod
    def _names(cls, values: list[str]) -> list[str]:
        for value in values:  # a category names its sample grid, gallery folder and metrics
            if problem := name_problem(value):
                raise ValueError(f"{value!r} cannot be a category: it becomes part of file names and "
                                 f"{problem}; use {ALLOWED}")
        return values


class AutoSchema(_Loose):
    enabled: bool = False
    budget_minutes: float = Field(default=20, gt=0)
    elongated_aspect: float = Field(default=2.0, ge=1)
    large_factor: float = Field(default=3.0, gt=0)
    min_train_defects: int = Field(default=10, ge=0)
    tie_se: float = Field(default=1.0, ge=0)
    max_candidates: int | None = Field(default=None, ge=1)
    native_factor: float = Field(default=1.5, gt=0)
    native_max_pixels: int = Field(default=500_000, ge=1024)
    only: list[str] | None = None


class BackboneSchema(_Loose):
    name: str
    pretrained: bool = True
    weights_path: str | None = None
    download: bool = True  # fetch missing ImageNet weights through torchvision / timm (needs internet)
    min_image_size: int = Field(default=32, ge=1)
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)
    channels_last: bool = False
    fold_batchnorm: bool = False
    gradcam_layer: str | list[str] | None = None
    stages: dict[str, list[str]] = Field(default_factory=dict)


class DetectorSchema(_Loose):
    """conf/detector/: the family and its own settings (each family reads its own keys)."""

    name: str = "classifier"  # models/families/ checks it against the families it knows
    strides: list[int] = Field(default_factory=lambda: [8, 16])
    neighbourhood: int = Field(default=3, ge=1)
    coreset_ratio: float = Field(default=0.1, gt=0, le=1)
    max_bank: int = Field(default=16384, ge=1)
    reweight: int = Field(default=0, ge=0)
    width: int = Field(default=64, ge=1)
    frozen_stride: int = Field(default=8, ge=0)
    pixel_loss_weight: float = Field(default=1.0, ge=0)
    mask_fraction: float = 1.0
    topk: int = Field(default=3, ge=1)
    grid_stride: int = Field(default=16, ge=1)
    patch_loss_weight: float = Field(default=1.0, ge=0)
    head_lr: float = Field(default=1.0e-3, gt=0)
    steps: int = Field(default=400, ge=1)
    cache_gb: float = Field(default=6.0, ge=0)
    feature_dtype: Literal["auto", "bfloat16", "float32"] = "auto"


class ExplainSchema(_Loose):
    """conf/explain/: the maps a run logs of its test split."""

    enabled: bool = True
    method: str = "auto"
    fusion: str = "mean"
    pointing_radius_px: float = 15.0
    pro_fpr_limit: float = 0.3
    target: str = "defect"
    n_per_group: int = Field(default=4, ge=0)
    max_images: int | None = None
    batch_size: int = Field(default=16, ge=1)
    alpha: float = 0.5
    colormap: str = "jet"


class CalibrationSchema(_Loose):
    method: str = "none"
    n_bins: int = Field(default=10, ge=1)
    max_iter: int = Field(default=100, ge=1)


class LossSchema(_Loose):
    name: Literal["weighted_ce", "ce", "focal"]
    gamma: float = Field(default=2.0, ge=0)
    weights: Literal["auto"] | list[float] | None = None

    @model_validator(mode="after")
    def _two_positive_weights(self):
        if isinstance(self.weights, list) and (len(self.weights) != 2 or min(self.weights) <= 0):
            raise ValueError(f"loss.weights={self.weights}: use auto, null or two positive numbers "
                             "[w_good, w_defect]")
        return self


class FreezingSchema(_Loose):
    trainable: Literal["all"] | list[str]
    bn_eval: bool = True


class AggregateSchema(_Loose):
    how: Literal["max", "topk_mean", "smooth_max"] = "max"
    k: int = Field(default=3, ge=1)
    tau: float = Field(default=1.0, gt=0)


class InputSchema(_Loose):
    name: Literal["square", "letterbox", "tiles"] = "square"
    aggregate: AggregateSchema = AggregateSchema()
    images_per_batch: int | None = Field(default=None, ge=1)
    tile_loss_weight: float = Field(default=0.0, ge=0)
    tile_min_pixels: int = Field(default=1, ge=1)


class TrainerSchema(_Loose):
    max_epochs: int = Field(ge=1)


class TrainSchema(_Loose):
    seed: int
    data: DataSchema
    split: SplitSchema
    backbone: BackboneSchema
    freezing: FreezingSchema
    loss: LossSchema
    threshold: ThresholdSchema
    optimizer: OptimizerSchema
    trainer: TrainerSchema
    input: InputSchema = InputSchema()
    auto: AutoSchema = AutoSchema()
    detector: DetectorSchema = DetectorSchema()
    scheduler: dict | None = None
    explain: ExplainSchema | None = None
    calibration: CalibrationSchema | None = None

    @model_validator(mode="after")
    def _image_fits_backbone(self):
        size = self.input.model_extra.get("tile_size") if self.input.name == "tiles" else None
        key = "input.tile_size" if size is not None else "data.image_size"
        size = self.data.image_size if size is None else size
        try:
            side = min(size_hw(size, key))
        except UserError as err:
            raise ValueError(str(err)) from None
        if side < self.backbone.min_image_size:
            raise ValueError(f"{key}={size} is smaller than {self.backbone.name} allows "
                             f"(each side >= {self.backbone.min_image_size})")
        return self


def _walk(error: dict, values: dict) -> tuple[list, object, int | None]:
    """(the error's path through the values, the value there, where a union's branch name was
    dropped): pydantic puts the branch (`int`, `list[int]`) into `loc` for union fields."""
    path, value, branch = [], values, None
    for part in error["loc"]:
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        else:
            branch = len(path) if branch is None else branch
            continue
        path.append(part)
    return path, value, branch


def _describe_all(errors: list[dict], values: dict) -> list[str]:
    """One line per invalid value: `key=value: why`; a union field's branches are folded into one
    line (`data.image_size='abc': ...valid integer; or ...valid list`), deepest path first."""
    walked = [(_walk(e, values), e["msg"].removeprefix("Value error, ")) for e in errors]
    by_field: dict[tuple, list] = {}
    for (path, value, branch), message in walked:
        field = tuple(path[:branch]) if branch is not None else tuple(path)
        by_field.setdefault(field, []).append((path, value, message))
    lines = []
    for items in by_field.values():
        deepest = max(len(p) for p, _, _ in items)
        kept = [(p, v, m) for p, v, m in items if len(p) == deepest]
        path, value = kept[0][0], kept[0][1]
        messages = list(dict.fromkeys(m for p, _, m in kept if p == path))
        key = ".".join(str(p) for p in path)
        text = "; or ".join(messages)
        if not key:
            lines.append(text)
        else:  # a section's own rule (split.make's fractions) names the section, not its dict
            lines.append(f"{key}: {text}" if isinstance(value, dict) else f"{key}={value!r}: {text}")
    return lines


def _validate(schema: type[M], values: dict, prefix: tuple = ()) -> M:
    try:
        return schema.model_validate(values)
    except ValidationError as err:
        errors = [{**e, "loc": (*prefix, *e["loc"])} for e in err.errors()]
        lines = _describe_all(errors, {prefix[0]: values} if prefix else values)
        raise UserError("Invalid configuration:\n  " + "\n  ".join(lines)) from None


def validate_train_config(cfg: DictConfig) -> TrainSchema:
    """The typed settings of a composed train config, or one UserError listing every invalid value."""
    return _validate(TrainSchema, OmegaConf.to_container(cfg, resolve=True))


def validate_data_config(data: DictConfig) -> DataSchema:
    """The data group alone (defect-data, defect-eval): the same rules as training."""
    return _validate(DataSchema, OmegaConf.to_container(data, resolve=True), ("data",))


def data_settings(data: DictConfig | DataSchema) -> DataSchema:
    return data if isinstance(data, DataSchema) else validate_data_config(data)


class PredictionLogSchema(_Loose):
    """conf/predict.yaml's prediction_log (also the served model's model_config keys)."""

    enabled: bool = True
    url: str | None = None
    batch_size: int = Field(default=256, ge=1)
    audit_fraction: float = Field(default=0.02, ge=0, le=1)
    borderline_log_odds: float = Field(default=1.0, ge=0)
    maps: bool = True
    map_budget: float = Field(default=0.03, ge=0)  # maps' time as a share of the scoring pass's
    image_dir: str | None = None  # served parts' images kept for review (null: beside a SQLite log)


class ModelSettings(BaseModel):
    """What a detector family builds its module from (models/families/)."""

    model_config = ConfigDict(extra="forbid")
    backbone: BackboneSchema
    detector: DetectorSchema
    freezing: FreezingSchema
    loss: LossSchema
    optimizer: OptimizerSchema
    scheduler: dict | None = None
    input: InputSchema = InputSchema()
    seed: int = 0

    @classmethod
    def of(cls, train: TrainSchema) -> ModelSettings:
        return cls(backbone=train.backbone, detector=train.detector, freezing=train.freezing, loss=train.loss,
                   optimizer=train.optimizer, scheduler=train.scheduler, input=train.input, seed=train.seed)


def instantiable(section: BaseModel | dict | None) -> dict | None:
    """A typed section with its Hydra `_target_` keys, as hydra.utils.instantiate takes it."""
    if section is None:
        return None
    return section.model_dump() if isinstance(section, BaseModel) else dict(section)
