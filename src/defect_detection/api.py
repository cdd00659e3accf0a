"""The Python API: what every `defect-*` command calls, for notebooks and scripts too.

    from defect_detection import fit, evaluate, Inspector

    result = fit("data=folder", "data.root=/lines/l3", experiment="auto")
    print(result.run_id, result.metrics["test/auroc"], result.threshold, result.model_uri)
    inspector = Inspector.load(result.model_uri)           # or "models:/defect-classifier@champion"
    table = inspector.predict(["a.png", "b.png"])          # decision, p_defect, threshold per image
    inspector.explain(["a.png"], "overlays/")              # Grad-CAM / anomaly-map overlays
    inspector.export("model.onnx")                         # ONNX (or format="openvino"), parity-checked

Each function takes Hydra overrides (the same words as the command line, composed from the same
configs: `fit("detector=patchcore", "data.root=...")`) or an already composed `config=` (what the
commands pass). A folder of your own configs joins the search path with `config_dir=`, as
`--config-dir` does for the commands. Nothing here prints or exits: results come back as objects,
and problems you can fix as `UserError`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from defect_detection.base import UserError, project_root
from defect_detection.config import CONFIG_DIR

DEFAULT_MODEL = "models:/defect-classifier@champion"


def compose_config(config_name: str, overrides: Sequence[str] = (), config_dir: str | Path | None = None,
                   task: str | None = None) -> DictConfig:
    """A command's config (train, eval, predict, ...) composed as the command would compose it.

    Outside a Hydra app there is no Hydra output folder, so `paths.output_dir` (unless given)
    becomes a fresh `<project root>/outputs/<task>/<time>-<token>` folder."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [str(o) for o in overrides] + search_path(config_dir)
    if not any(o.split("=", 1)[0].lstrip("+~") == "paths.output_dir" for o in overrides):
        stamp = f"{datetime.now():%Y-%m-%d_%H-%M-%S}-{secrets.token_hex(3)}"
        overrides.append(f"paths.output_dir=${{paths.root_dir}}/outputs/{task or config_name}/{stamp}")
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app (a command) already
        return compose(config_name, overrides=overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name, overrides=overrides)


def search_path(config_dir: str | Path | None) -> list[str]:
    """The override that puts a user's config folder on Hydra's search path ([] for None)."""
    if config_dir is None:
        return []
    folder = Path(config_dir).expanduser().resolve()
    if not folder.is_dir():
        raise UserError(f"config_dir={config_dir}: no such folder (it should hold config groups such as "
                        "data/my_line.yaml).")
    return [f"hydra.searchpath=[file://{folder}]"]


# -- fit ---------------------------------------------------------------------------------------------

@dataclass
class FitResult:
    """What a training run (or the auto recipe's winner) left: where it is and what it scored."""

    run_id: str | None
    threshold: float
    val: dict[str, float]
    test: dict[str, float]
    model_uri: str | None = None
    auto_parent_run_id: str | None = None
    candidates: pd.DataFrame | None = None
    sweep_value: float | None = None  # the config's optimized_metric (val), what sweeps maximise
    details: dict = field(default_factory=dict, repr=False)

    @property
    def metrics(self) -> dict[str, float]:
        return {**self.val, **self.test}


def fit(*overrides: str, experiment: str | None = None, config: DictConfig | None = None,
        config_dir: str | Path | None = None) -> FitResult:
    """Train one run (or, with experiment="auto", the auto recipe's candidates) and log it to MLflow.

    `overrides`: Hydra overrides as on the command line; `experiment`: an experiment overlay
    (conf/experiment/, e.g. "auto"); `config`: an already composed train config instead."""
    from defect_detection.tracking.resume import launch_overrides

    words = [*overrides, *([f"experiment={experiment}"] if experiment else []), *search_path(config_dir)]
    if config is None:
        config = compose_config("train", words)
    else:
        words = words or launch_overrides()  # the command line's own words (the resume hint)
    return fit_config(config, words)


def fit_config(cfg: DictConfig, overrides: Sequence[str] | None = None) -> FitResult:
    """fit() of a composed config; `overrides` are what a resume hint repeats (default: the
    command line's)."""
    from defect_detection.tracking.resume import launch_overrides
    from defect_detection.tracking.sweeps import in_multirun, record_failed_trial

    overrides = list(launch_overrides() if overrides is None else overrides)
    if (cfg.get("auto") or {}).get("enabled"):  # experiment=auto: candidates under one parent run
        from defect_detection.auto.entry import run_auto_recipe

        raw = run_auto_recipe(cfg, overrides)
    elif in_multirun():  # one failing trial must not end the sweep: its run is FAILED with the error
        from defect_detection.pipeline.fit import train

        try:
            raw = train(cfg, overrides)
        except Exception as err:
            import logging

            run_id = record_failed_trial(cfg, err)
            logging.getLogger(__name__).error("Trial failed (MLflow run %s): %s: %s", run_id,
                                              type(err).__name__, err)
            return FitResult(run_id, float("nan"), {}, {}, sweep_value=float("nan"))
    else:
        from defect_detection.pipeline.fit import train

        raw = train(cfg, overrides)
    return _fit_result(cfg, raw)


def _fit_result(cfg: DictConfig, raw: dict) -> FitResult:
    metric = cfg.get("optimized_metric")
    value = raw.get("val", {}).get(metric) if metric else None
    run_id = raw.get("run_id")
    logged = bool(cfg.get("log_model", True)) and bool(cfg.get("logger")) and run_id
    return FitResult(run_id=run_id, threshold=float(raw.get("threshold", float("nan"))),
                     val=dict(raw.get("val", {})), test=dict(raw.get("test", {})),
                     model_uri=f"runs:/{run_id}/model" if logged else None,
                     auto_parent_run_id=raw.get("auto_parent_run_id"), candidates=raw.get("candidates"),
                     sweep_value=None if value is None else float(value), details=raw)


# -- evaluate, data, promote, compare ------------------------------------------------------------

def evaluate(model: str | Path | None = None, *overrides: str, config: DictConfig | None = None,
             config_dir: str | Path | None = None) -> dict:
    """Score `model` (runs:/, models:/, a bundle or a checkpoint) on a data config and log the report
    to a new MLflow run; returns run id, metrics and the report folder. A model from a run is
    scored on that run's own test split by default (subset=test; subset=new: images added since)."""
    from defect_detection.pipeline.evaluate import evaluate as run

    if config is None:
        config = compose_config("eval", [*([f"model={model}"] if model else []), *overrides], config_dir)
    return run(config)


def summarize_data(*overrides: str, config: DictConfig | None = None,
                   config_dir: str | Path | None = None):
    """What `defect-data` shows: counts per split, the audit, sample grids (written to out_dir)."""
    from defect_detection.pipeline.data_summary import data_summary

    config = config if config is not None else compose_config("data_summary", overrides, config_dir)
    return data_summary(config)


def promote(*overrides: str, config: DictConfig | None = None, config_dir: str | Path | None = None):
    """Register the best finished run's model and move the champion alias (the existing guard)."""
    from defect_detection.pipeline.promote import run_promotion

    return run_promotion(config if config is not None else compose_config("promote", overrides, config_dir))


def compare(*overrides: str, config: DictConfig | None = None, config_dir: str | Path | None = None):
    """Rank an experiment's (or a sweep's) runs by a metric: the table `defect-compare` prints."""
    from defect_detection.pipeline.compare import compare as run

    return run(config if config is not None else compose_config("compare", overrides, config_dir))


def monitor(*overrides: str, config: DictConfig | None = None, config_dir: str | Path | None = None):
    """`defect-monitor`: a window of the prediction log against the model's reference; returns the
    checks and whether an alarm was raised (the command exits 3 then)."""
    from defect_detection.pipeline.monitor import monitor as run

    return run(config if config is not None else compose_config("monitor", overrides, config_dir))


def review(*overrides: str, config: DictConfig | None = None, config_dir: str | Path | None = None):
    """`defect-review`: serve the review page (until stopped), or with `export=<folder>` write the
    judged parts as a dataset and return its manifest."""
    from defect_detection.pipeline.review import review as run

    return run(config if config is not None else compose_config("review", overrides, config_dir))


def challenge(*overrides: str, config: DictConfig | None = None, config_dir: str | Path | None = None):
    """`defect-challenge`: a retrained model against the champion on the same parts (the champion
    run's test split and the held-back reviewed parts); promote=true goes through the guard."""
    from defect_detection.pipeline.challenge import challenge as run

    return run(config if config is not None else compose_config("challenge", overrides, config_dir))


# -- predict, explain, export --------------------------------------------------------------------

def predict(images=None, *overrides: str, model: str | Path | None = None, config: DictConfig | None = None,
            config_dir: str | Path | None = None) -> pd.DataFrame:
    """`defect-predict`: score a folder, glob, file or list into a CSV (config `output`); one row per
    input, unreadable or refused inputs with their reason."""
    from defect_detection.pipeline.predict import predict as run

    if config is None:
        words = [*([f"images={_hydra_value(images)}"] if images is not None else []),
                 *([f"model={model}"] if model else []), *overrides]
        config = compose_config("predict", words, config_dir)
    return run(config)


def explain(images=None, *overrides: str, model: str | Path | None = None, config: DictConfig | None = None,
            config_dir: str | Path | None = None) -> list[Path]:
    """`defect-explain`: one overlay per image and overlays.csv."""
    from defect_detection.pipeline.explain import explain as run

    if config is None:
        words = [*([f"inputs={_hydra_value(images)}"] if images is not None else []),
                 *([f"model={model}"] if model else []), *overrides]
        config = compose_config("explain_cmd", words, config_dir, task="explain")
    return run(config)


def export(source: str | Path, out: str | Path | None = None, images: Sequence[str | Path] = (), *args,
           **kwargs) -> dict:
    """`defect-export`: ONNX or OpenVINO, fp32 or int8, written only after the parity gate
    (pipeline/export.py's export(); same arguments)."""
    from defect_detection.pipeline.export import export as run

    return run(str(source), out, images, *args, **kwargs)


def _hydra_value(value) -> str:
    """A path or a list of paths as a Hydra override value."""
    if isinstance(value, (str, Path)):
        return _quoted(value)
    return "[" + ",".join(_quoted(v) for v in value) + "]"


def _quoted(value) -> str:
    text = str(value).replace("\\", "\\\\").replace("'", "\\'")
    return f"'{text}'"


class Inspector:
    """A trained model ready to inspect parts, deciding exactly as its evaluation did.

    Load it from a registry alias, a run, a bundle, a checkpoint or an exported file; it scores
    paths, PIL images or arrays, explains them, and exports itself."""

    def __init__(self, predictor, source: str) -> None:
        self.predictor, self.source = predictor, source

    @classmethod
    def load(cls, model: str | Path = DEFAULT_MODEL, *, device: str = "cpu", runtime: str = "auto",
             tracking_uri: str | None = None, batch_size: int = 32) -> Inspector:
        """`model`: `models:/<name>@<alias>`, `models:/<name>/<version>`, `runs:/<id>/model`, a bundle
        .pt, a checkpoint .ckpt, or an exported .onnx / .xml. `tracking_uri`: the MLflow store for
        runs:/ and models:/ (default MLFLOW_TRACKING_URI, else this project's mlruns/)."""
        from defect_detection.models.loading import load_predictor
        from defect_detection.tracking.mlflow_run import fluent_tracking_uri

        with fluent_tracking_uri(tracking_uri or default_tracking_uri()):
            predictor = load_predictor(str(model), device=device, runtime=runtime, batch_size=batch_size)
        return cls(predictor, str(model))

    @property
    def threshold(self) -> float:
        return self.predictor.threshold

    @property
    def meta(self) -> dict:
        """What the model carries: family, backbone, input geometry, threshold and its policy."""
        return dict(self.predictor.meta)

    def predict(self, images: Iterable, *, maps: bool = False, on_error: str = "skip") -> pd.DataFrame:
        """One row per image: p_defect, decision, threshold (and `error` for an unreadable path with
        on_error="skip"). images: paths, a folder, PIL images or H x W x 3 arrays. maps=True adds a
        `map` column: the model's evidence map (Grad-CAM, or the anomaly map of PatchCore and the
        segmenter) at each image's own resolution, as a float array."""
        from defect_detection.pipeline.predict import score

        items = [images] if isinstance(images, (str, Path)) else list(images)
        paths = all(isinstance(i, (str, Path)) for i in items)
        if paths:
            from defect_detection.explain.writer import input_entries

            entries = input_entries(items)
            bad = [(str(p), why) for p, why in entries if why]
            if bad and on_error == "fail":
                raise UserError(bad[0][1])
            table = score(self.predictor, [p for p, why in entries if not why], on_error, progress=False)
            if bad:
                rows = pd.DataFrame({"path": [p for p, _ in bad], "p_defect": float("nan"),
                                     "decision": "error", "threshold": self.threshold,
                                     "error": [w for _, w in bad]})
                table = pd.concat([table, rows], ignore_index=True)
        else:
            table = self.predictor.predict(items).drop(columns=["is_defect"])
        if maps:
            table["map"] = self._maps([p for p in table["path"]] if paths else items, table)
        return table

    def _maps(self, items: list, table: pd.DataFrame) -> list:
        from defect_detection.explain.gradcam import gradcam_layer_for
        from defect_detection.explain.maps import original_maps

        layer = gradcam_layer_for(self.predictor.meta["backbone"])
        ok = [k for k in range(len(items)) if table["decision"].iloc[k] != "error"]
        found = original_maps(self.predictor, [items[k] for k in ok], layer)
        out = [None] * len(items)
        for k, m in zip(ok, found):
            out[k] = m
        return out

    def explain(self, images: Iterable, out_dir: str | Path, **options) -> list[Path]:
        """Write `<out_dir>/<name>_gradcam.png` per image and overlays.csv (explain/writer.py's
        write_overlays options: target, layer, alpha, colormap, fusion)."""
        from defect_detection.explain.writer import expand_inputs, write_overlays

        items = [images] if isinstance(images, (str, Path)) else list(images)
        return write_overlays(self.predictor, expand_inputs(items), out_dir, **options)

    def export(self, out: str | Path | None = None, *, format: str = "onnx", quantize: str | None = None,
               images: Sequence[str | Path] = (), calibration: Sequence[str | Path] = (),
               force: bool = False, tracking_uri: str | None = None) -> dict:
        """This model as ONNX or OpenVINO (fp32, or int8 calibrated on validation images), written only
        after the parity check; returns the export report."""
        from defect_detection.tracking.mlflow_run import fluent_tracking_uri

        uri = tracking_uri or default_tracking_uri()
        with fluent_tracking_uri(uri):
            return export(self.source, out, images, fmt=format, quantize=quantize, calibration=calibration,
                          force=force, tracking_uri=uri)


def default_tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else this project's store (<project root>/mlruns/mlflow.db)."""
    import os

    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlruns' / 'mlflow.db'}"
