"""Building a run's parts from its config: input geometry, data module, detector module.

What a training run, the cross-validation folds and the benchmarks share.
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from defect_detection.data.datamodule import DefectDataModule
from defect_detection.data.fingerprint import fingerprint
from defect_detection.data.geometry import build_geometry
from defect_detection.data.input_plan import plan_input
from defect_detection.data.transforms import build_eval_transform, build_train_transform
from defect_detection.data.validate import screened_extra, screened_records
from defect_detection.models.families import family
from defect_detection.schema import ModelSettings, data_settings, validate_train_config


def build_input(cfg: DictConfig):
    """The input geometry of the run (conf/input/), data.image_size its working size."""
    size = cfg.data.image_size
    size = OmegaConf.to_container(size, resolve=True) if OmegaConf.is_config(size) else size
    inp = cfg.get("input")
    return build_geometry(OmegaConf.to_container(inp, resolve=True) if inp else None, size)


def build_datamodule(cfg: DictConfig, split=None) -> DefectDataModule:
    """The run's data; `split` replaces the configured split (cross-validation folds)."""
    bad, prints, extra = [], None, {}
    if split is None:
        # every file checked before the split: error lists all bad files, skip drops them (data/validate.py)
        data = data_settings(cfg.data)
        records, bad = screened_records(data)
        extra = screened_extra(data)  # reviewed parts: train only, val and test stay the original ones
        # what a resume compares against (data/fingerprint.json)
        prints = fingerprint([*records, *(r for recs in extra.values() for r in recs)])
        split = instantiate(cfg.split.make)(records)
        if extra:
            split.train += [r for recs in extra.values() for r in recs]
            split.notes.append(f"data.extra_roots: {sum(map(len, extra.values()))} parts added to train")
    if check := family(detector_name(cfg)).check_split:  # data the family cannot learn from: say so now
        check(model_settings(cfg), split)
    geometry, bb = build_input(cfg), cfg.backbone
    plan = plan_input(geometry, split, cfg.data.get("cache", "memory"), int(cfg.data.batch_size),
                      cfg.get("input", {}).get("images_per_batch"), load_masks=needs_masks(cfg))
    eval_tf = build_eval_transform(geometry, bb.mean, bb.std)
    # a family that only memorises the good parts (PatchCore) sees them unaugmented
    train_tf = (build_train_transform(cfg.augmentation, geometry, bb.mean, bb.std)
                if family(detector_name(cfg)).augments else eval_tf)
    datamodule = DefectDataModule(
        split, cfg.data.image_size, train_tf, eval_tf, plan.batch_size, cfg.data.num_workers,
        pin_memory=cfg.data.get("pin_memory", False),
        persistent_workers=cfg.data.get("persistent_workers", True),
        cache=plan.cache, cache_dir=cfg.data.get("cache_dir"), geometry=geometry,
        load_masks=plan.load_masks, sizes=plan.sizes)
    datamodule.bad_images = bad
    datamodule.input_plan = plan
    datamodule.fingerprint = prints
    datamodule.extra = extra
    return datamodule


def needs_masks(cfg: DictConfig) -> bool:
    """Whether training reads the ground-truth masks (a family that learns from them, or tile
    labels from masks)."""
    inp = cfg.get("input") or {}
    tile_labels = inp.get("name") == "tiles" and float(inp.get("tile_loss_weight", 0) or 0) > 0
    return tile_labels or family(detector_name(cfg)).needs_masks


def build_module(cfg: DictConfig, class_counts: tuple[int, int]):
    """The detector family's LightningModule (conf/detector/), with the meta that rebuilds it."""
    geometry = build_input(cfg)
    inp = cfg.get("input") or {}
    aggregate = OmegaConf.to_container(inp.aggregate, resolve=True) if inp.get("aggregate") else None
    name = detector_name(cfg)
    meta = {"family": name, "backbone": cfg.backbone.name, "image_size": cfg.data.image_size,
            "input": geometry.meta(), **({"aggregate": aggregate} if aggregate else {})}
    meta = OmegaConf.to_container(OmegaConf.create(meta), resolve=True)
    return family(name).build_module(model_settings(cfg), class_counts, meta)


def model_settings(cfg: DictConfig) -> ModelSettings:
    """The typed settings a detector family builds from (validated: one UserError per bad value)."""
    return ModelSettings.of(validate_train_config(cfg))


def detector_name(cfg: DictConfig) -> str:
    return str((cfg.get("detector") or {}).get("name", "classifier"))
