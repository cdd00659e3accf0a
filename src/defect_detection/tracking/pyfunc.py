"""The MLflow pyfunc flavour of the inference bundle, safe to put behind `mlflow models serve`.

Logged as a *model from code* (MLflow's recommendation): the stored code file
(tracking/pyfunc_model.py) only imports this installed package, nothing is cloudpickled, and the
weights travel as `artifacts/bundle.pt` (loaded weights_only). The project's own loaders
(predict, eval, explain, export from runs:/ or models:/ URIs) never run the stored code: they read
the bundle alone (models/inference.py). `mlflow models serve` does execute the stored code file:
whoever can write the artifact store can change what a server runs (README, Safety).

A served model must not read whatever server path a client names (a file-existence oracle), so
when served it reads paths only under the allowed roots (env DEFECT_SERVE_ROOTS, os.pathsep-
separated, or model_config={"allowed_roots": [...]}; none by default) and takes the image itself
as base64 (`image_b64`). model_config={"runtime": "openvino"} (or "onnx") scores with that
runtime. Each row gets a decision or an `error`, so one bad row does not fail the request.

A request has a budget (model_config, overridable when served through MLflow's
MLFLOW_PYFUNC_INFERENCE_CONFIG): at most `max_rows` rows, `max_request_pixels` decoded pixels and
`max_request_bytes` of image bytes; rows beyond get an error saying which bound they passed. Images
are decoded and prepared one at a time (a 9000 x 9000 PNG is 243 MB decoded, 150 kB prepared),
and the decoded memory is handed back to the OS after the request.
"""

from __future__ import annotations

import base64
import binascii
import gc
import os
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image

from defect_detection.base import UserError

PIP_REQUIREMENTS = ["torch", "torchvision", "timm", "pillow", "pandas", "numpy", "mlflow"]
ROOTS_ENV = "DEFECT_SERVE_ROOTS"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
# What a load may override (MLflow lets model_config, or the MLFLOW_PYFUNC_INFERENCE_CONFIG JSON
# when served, change only keys logged with the model). runtime: torch, onnx or openvino; the
# bundle is then exported in memory (fp32) and parity-checked before it scores.
MODEL_CONFIG = {"runtime": "torch", "max_rows": 256, "max_request_pixels": 200_000_000,
                "max_request_bytes": 256 * 2**20,
                # conf/predict.yaml's prediction_log keys; url null: beside MLFLOW_TRACKING_URI's
                # sqlite store, else ./predictions.db
                "prediction_log": {"enabled": True, "url": None, "audit_fraction": 0.02,
                                   "borderline_log_odds": 1.0, "maps": True},
                "model_uri": None}  # what the log names (set it when serving models:/name@alias)
# Set by MLflow's scoring server (mlflow/pyfunc/scoring_server) before it serves requests.
_SERVING_ENV = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
REFUSED = ("path refused: this server reads paths only under its allowed roots ({}); "
           "send the image itself as image_b64")


@dataclass
class RequestBudget:
    """What one request may still decode; each row is charged before its pixels are decoded."""

    max_rows: int
    max_pixels: int
    max_bytes: int
    rows: int = 0
    pixels: int = 0
    bytes: int = 0

    @classmethod
    def from_config(cls, config: dict) -> RequestBudget:
        def value(key: str) -> int:
            v = config.get(key, MODEL_CONFIG[key])
            return int(v) if v else 0  # 0 / null: no bound

        return cls(value("max_rows"), value("max_request_pixels"), value("max_request_bytes"))

    def row(self) -> None:
        self.rows += 1
        if self.max_rows and self.rows > self.max_rows:
            raise UserError(f"not scored: this server scores at most {self.max_rows} rows per request "
                            "(max_rows); send the rest in another request")

    def charge(self, n_bytes: int = 0, pixels: int = 0) -> None:
        if self.max_bytes and self.bytes + n_bytes > self.max_bytes:
            raise UserError(f"not scored: the request's images exceed {self.max_bytes:,} bytes "
                            "(max_request_bytes); send fewer or smaller images per request")
        if self.max_pixels and self.pixels + pixels > self.max_pixels:
            raise UserError(f"not scored: the request's images exceed {self.max_pixels:,} decoded pixels "
                            "(max_request_pixels); send fewer or smaller images per request")
        self.bytes += n_bytes
        self.pixels += pixels


class DefectPyfunc(mlflow.pyfunc.PythonModel):
    """predict() takes a DataFrame with an `image_b64`, `path` or `image` column, a list of paths,
    or image arrays; returns p_defect, is_defect, decision, threshold and error per row (and a
    `note` when an image had to be adapted, e.g. upscaled to fit a tile)."""

    def load_context(self, context) -> None:
        from defect_detection.models.loading import load_predictor

        config = getattr(context, "model_config", None) or {}
        runtime = config.get("runtime") or "torch"
        self.predictor = load_predictor(context.artifacts["bundle"], runtime=runtime)
        self.allowed_roots = config.get("allowed_roots")
        self.config = dict(config)
        self.recorder = _serving_recorder(config, self.predictor)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        items = _items(model_input)
        budget = RequestBudget.from_config(getattr(self, "config", {}))
        roots = allowed_roots(getattr(self, "allowed_roots", None))
        arrays: list[np.ndarray | None] = [None] * len(items)
        errors: list[str | None] = [None] * len(items)
        notes: list[str | None] = [None] * len(items)
        seen: list[tuple] = [(None, None, None)] * len(items)  # (hw, stats, content hash) for the log
        for k, item in enumerate(items):
            try:
                budget.row()
                arrays[k], notes[k], seen[k] = self._prepared(item, roots, budget)
            except Exception as err:  # one bad row is that row's error, never the request's
                errors[k] = row_error(err)
        ok = [k for k, a in enumerate(arrays) if a is not None]
        began = time.perf_counter()
        p = self._scores([arrays[k] for k in ok], errors, ok)
        self._log(items, ok, p, arrays, seen, time.perf_counter() - began)
        del arrays
        if budget.pixels > RELEASE_AFTER_PIXELS:  # a full collection costs ~0.5 s in a served process
            release_memory()
        out = pd.DataFrame({"p_defect": np.nan, "is_defect": False, "decision": "error",
                            "threshold": self.predictor.threshold, "error": errors}, index=range(len(items)))
        for k, value in zip(ok, p):
            if not np.isnan(value):
                out.loc[k, ["p_defect", "is_defect", "decision"]] = [
                    float(value), bool(value >= self.predictor.threshold),
                    "defect" if value >= self.predictor.threshold else "good"]
        out["is_defect"] = out["is_defect"].astype(bool)
        if any(notes):
            out["note"] = notes
        if isinstance(model_input, pd.DataFrame) and "path" in model_input.columns:
            out.insert(0, "path", list(model_input["path"]))
        return out

    def _prepared(self, item, roots: list[Path] | None, budget: RequestBudget):
        """(the geometry's prepared array, note, (hw, stats, hash)) of one item; the decoded pixels
        are freed on return."""
        image = _image(item, roots, budget)
        try:
            geometry = self.predictor.geometry
            hw = (image.height, image.width)
            note = getattr(geometry, "upscale_note", lambda hw: None)(hw)
            prepared = geometry.prepare(image)
            if getattr(self, "recorder", None) is None:
                return prepared, note, (hw, None, None)
            from defect_detection.monitoring.image_stats import image_stats
            from defect_detection.monitoring.recorder import content_hash

            raw = base64.b64decode(item) if isinstance(item, _B64) else item
            return prepared, note, (hw, image_stats(prepared, hw), content_hash(raw))
        finally:
            image.close()

    def _log(self, items: list, ok: list[int], p: np.ndarray, arrays: list, seen: list,
             scoring_seconds: float) -> None:
        """The scored rows into the prediction log (its failures are warnings, never the request's)."""
        recorder = getattr(self, "recorder", None)
        if recorder is None:
            return
        try:
            rows, part_of = [], {}  # part_of: a row's index in the request (its prepared array)
            for k, value in zip(ok, p):
                if np.isnan(value):
                    continue
                hw, stats, digest = seen[k]
                decision = "defect" if value >= self.predictor.threshold else "good"
                row = recorder.log.row(source="serve", model=recorder.model, p_defect=float(value),
                                       threshold=self.predictor.threshold, decision=decision,
                                       image_path=str(items[k]) if isinstance(items[k], str) and
                                       not isinstance(items[k], _B64) else None,
                                       content_hash=digest, stats=stats)
                flagged = decision == "defect" or row["borderline"]
                if (flagged or row["audit"]) and isinstance(items[k], _B64):  # the review queue shows it
                    row["image_path"] = recorder.log.keep_image(base64.b64decode(items[k]), digest)
                part_of[id(row)] = k
                rows.append(row)
            self._maps(recorder, rows, part_of, arrays, seen, scoring_seconds)
            recorder.log.record(rows)
            recorder.log.flush()
        except Exception as err:  # logging must never cost the response
            import logging

            logging.getLogger(__name__).warning("prediction log: %s: %s", type(err).__name__, err)

    def _maps(self, recorder, rows: list[dict], part_of: dict[int, int], arrays: list, seen: list,
              scoring_seconds: float) -> None:
        """Maps of the flagged and borderline rows within the recorder's time budget (the
        prepared arrays are still in memory: no decoding)."""
        if not hasattr(self.predictor, "net"):
            return
        from defect_detection.monitoring.recorder import draw_map

        def draw(row: dict) -> bytes:
            k = part_of[id(row)]
            return draw_map(self.predictor, arrays[k], seen[k][0], row["decision"])

        recorder.fill_maps(rows, len(rows), scoring_seconds, draw)

    def _scores(self, arrays: list[np.ndarray], errors: list[str | None], ok: list[int]) -> np.ndarray:
        """p_defect of the prepared arrays; when the batch fails, image by image (failures: NaN + error)."""
        try:
            return self.predictor.p_defect_prepared(arrays)
        except Exception:
            out = np.full(len(arrays), np.nan)
            for j, array in enumerate(arrays):
                try:
                    out[j] = self.predictor.p_defect_prepared([array])[0]
                except Exception as err:
                    errors[ok[j]] = row_error(err)
            return out


def _serving_recorder(config: dict, predictor):
    """The served model's recorder (model_config["prediction_log"]); None when disabled."""
    from defect_detection.monitoring.prediction_log import ModelInfo
    from defect_detection.monitoring.recorder import Recorder, model_info, open_log
    from defect_detection.schema import PredictionLogSchema

    settings = PredictionLogSchema.model_validate(config.get("prediction_log") or {"enabled": False})
    # the store the model was loaded from: the environment's, else the one set in this process
    # (mlflow.set_tracking_uri, as a notebook or a test does); its log goes beside it
    uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri() or ""
    plog = open_log(settings, uri, Path.cwd())
    if plog is None:
        return None
    run_id = predictor.meta.get("run_id")
    if config.get("model_uri") and uri:  # models:/name@alias: its registered name and version too
        info = model_info(config["model_uri"], uri, predictor.meta)
    else:
        info = ModelInfo(uri=config.get("model_uri") or (f"runs:/{run_id}/model" if run_id else None),
                         run_id=run_id)
    return Recorder(plog, info, "serve", maps=settings.maps, map_budget=settings.map_budget)


def row_error(err: BaseException) -> str:
    """The text of one row's error: our own messages as they are, anything else with its type."""
    return str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"


# Requests that decoded more than this many pixels (about 100 MB of RGB) hand their buffers back
# to the OS afterwards; smaller ones leave it to the allocator (gc.collect took 0.52 s of a 2.4 s
# request of 16 photos of 224 px: measured with cProfile on a 2-core CPU).
RELEASE_AFTER_PIXELS = 32_000_000


def release_memory() -> None:
    """Hand freed decode buffers back to the OS (glibc keeps large freed blocks otherwise: a request
    of six 9000 x 9000 PNGs left 2.2 GB held)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class _B64(str):
    """A base64-encoded image file (a row of the image_b64 column)."""


def allowed_roots(configured=None) -> list[Path] | None:
    """The folders paths may be read from; None: any path (in-process use without a root set)."""
    if configured is None and os.environ.get(ROOTS_ENV):
        configured = [r for r in os.environ[ROOTS_ENV].split(os.pathsep) if r]
    if configured is not None:
        return [Path(r).expanduser().resolve() for r in configured]
    serving = os.environ.get(_SERVING_ENV, "").lower() == "true"
    return [] if serving else None


def _image(item, roots: list[Path] | None, budget: RequestBudget) -> Image.Image:
    """The RGB image of one row, its bytes and pixels charged to the request's budget first."""
    import io

    from defect_detection.data.images import load_rgb, load_rgb_bytes
    from defect_detection.models.inference import as_pil

    if isinstance(item, _B64):
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError):
            raise UserError("image_b64: not valid base64 (send the image file's bytes, "
                            "base64-encoded)") from None
        budget.charge(n_bytes=len(data), pixels=_header_pixels(lambda: Image.open(io.BytesIO(data))))
        return load_rgb_bytes(data, "image_b64")
    if isinstance(item, (str, Path)):
        text = str(item)
        if "\x00" in text:
            raise UserError("path: contains a NUL byte, so it is not a file name; send a real path or "
                            "the image itself as image_b64")
        if roots is not None:
            resolved = Path(os.path.realpath(Path(text).expanduser()))
            if not any(resolved == r or r in resolved.parents for r in roots):
                # the same line whether or not the path exists: no existence oracle
                raise UserError(REFUSED.format(", ".join(map(str, roots)) or f"none set; {ROOTS_ENV}"))
        size = os.path.getsize(text) if os.path.isfile(text) else 0
        budget.charge(n_bytes=size, pixels=_header_pixels(lambda: Image.open(text)))
        return load_rgb(text)
    image = as_pil(item)
    budget.charge(pixels=image.width * image.height)
    return image


def _header_pixels(opener) -> int:
    """Pixels an image will decode to, from its header (0 when unreadable: the decode then says why)."""
    try:
        with opener() as im:
            return int(im.width) * int(im.height)
    except Exception:
        return 0


def _items(model_input) -> list:
    if isinstance(model_input, pd.DataFrame):
        if "image_b64" in model_input.columns:
            b64 = list(model_input["image_b64"])
            paths = list(model_input["path"]) if "path" in model_input.columns else [None] * len(b64)
            return [_B64(b) if isinstance(b, str) and b else p for b, p in zip(b64, paths)]
        if "path" in model_input.columns:
            return list(model_input["path"])
        if "image" in model_input.columns:
            return [np.asarray(v, dtype=np.uint8) for v in model_input["image"]]
        raise UserError("DataFrame input needs an 'image_b64', 'path' or 'image' column.")
    if isinstance(model_input, np.ndarray):
        return [model_input] if model_input.ndim == 3 else list(model_input)
    if isinstance(model_input, (str, Path)):
        return [model_input]
    return list(model_input)


def log_pyfunc(bundle_path: str | Path, name: str = "model"):
    """Log the bundle as a pyfunc model from code on the active run; returns MLflow's ModelInfo."""
    return mlflow.pyfunc.log_model(
        name=name, python_model=str(MODEL_CODE), artifacts={"bundle": str(bundle_path)},
        pip_requirements=PIP_REQUIREMENTS, model_config=MODEL_CONFIG,
    )
