"""The self-contained inference bundle: weights + preprocessing + class order + threshold.

Everything that decides good/defect at inference lives in one torch file loaded with
weights_only=True, so predict, serve, export and evaluation decide exactly alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from defect_detection.base import CLASS_NAMES, UserError
from defect_detection.data.geometry import Geometry, build_geometry, header_hw
from defect_detection.data.images import load_rgb
from defect_detection.devices import bf16_supported
from defect_detection.models.aggregation import image_logits
from defect_detection.models.batchnorm_folding import fold_batchnorm
from defect_detection.models.checkpointing import DIGEST_KEY, OWNER_KEY
from defect_detection.models.digest import state_digest, verify_digest
from defect_detection.models.families import family
from defect_detection.models.safe_load import safe_torch_load

log = logging.getLogger(__name__)


def save_bundle(path: str | Path, net: torch.nn.Module, *, backbone: str, image_size: int | Sequence[int],
                mean: Sequence[float], std: Sequence[float], threshold: float,
                threshold_policy: str = "fixed", temperature: float = 1.0,
                extra: dict | None = None) -> Path:
    """`extra`: family, input geometry and tile aggregation (what makes predict cut and pool
    images exactly as evaluation did); absent keys mean the classifier on square input."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = int(image_size) if isinstance(image_size, (int, np.integer)) else [int(v) for v in image_size]
    meta = {"backbone": backbone, "image_size": size, "mean": [float(m) for m in mean],
            "std": [float(s) for s in std], "threshold": float(threshold),
            "threshold_policy": threshold_policy, "temperature": float(temperature),
            "class_names": list(CLASS_NAMES), **(extra or {})}
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    meta["weights_sha256"] = state_digest(state)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"meta": meta, "state_dict": state}, tmp)
    tmp.replace(path)
    return path


def _read_bundle(path: str | Path) -> tuple[dict, dict]:
    """(meta, net state_dict) from a bundle .pt or a Lightning .ckpt written by training."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Model file not found: {path}.")
    data = safe_torch_load(path, "model (an inference bundle or a defect-train checkpoint)")
    if isinstance(data, dict) and "meta" in data:
        verify_digest(data["state_dict"], data["meta"].get("weights_sha256"), path)
        return data["meta"], data["state_dict"]
    if isinstance(data, dict) and "defect_meta" in data:
        verify_digest(data.get("state_dict", {}), data.get(DIGEST_KEY), path)
        state = {k[len("net."):]: v for k, v in data["state_dict"].items() if k.startswith("net.")}
        meta = {"class_names": list(CLASS_NAMES), "temperature": 1.0, "threshold_policy": "checkpoint",
                **data["defect_meta"], **({"run_id": data[OWNER_KEY]} if data.get(OWNER_KEY) else {})}
        if not meta.get("threshold_chosen"):
            log.warning("%s carries no val-chosen threshold (it was written before the run chose one, "
                        "or by an older version): it decides at %.4g. Use the run's model "
                        "(runs:/<run id>/model) or pass a checkpoint of a finished run.", path,
                        float(meta.get("threshold", 0.5)))
            meta["threshold_policy"] = "none chosen (checkpoint default)"
        return meta, state
    raise UserError(f"{path} is neither an inference bundle nor a checkpoint written by defect-train.")


def as_pil(item) -> Image.Image:
    """RGB PIL image of a path (decoded like the training cache), PIL image or HxW[x3|4] array."""
    if isinstance(item, (str, Path)):
        return load_rgb(item)
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    arr = np.asarray(item)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise UserError(f"Expected an HxWx3 image array, got shape {arr.shape}.")
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    return Image.fromarray(arr[..., :3])


def _item_hw(item) -> tuple[int, int]:
    """(h, w) of a path (from its header), PIL image or array, as as_pil would see it."""
    if isinstance(item, (str, Path)):
        return header_hw(str(item))
    if isinstance(item, Image.Image):
        return item.height, item.width
    shape = np.asarray(item).shape
    return int(shape[0]), int(shape[1])


def bundle_geometry(meta: dict) -> Geometry:
    """The input geometry a bundle was trained with (square at image_size for older bundles)."""
    return build_geometry(meta.get("input"), meta["image_size"])


class BasePredictor:
    """What every predictor shares: bundle meta, the input geometry, tile pooling and the
    thresholded decision.

    Subclasses (Predictor: eager PyTorch; OnnxPredictor: ONNX Runtime) set `meta` and
    `batch_size` and implement `_tile_logits(x)`: raw two-class logits of a normalised
    T x 3 x h x w batch of network inputs (whole images, or tiles with input=tiles).
    """

    meta: dict
    batch_size: int = 32
    # called as observer(item, (h, w) of the photo, prepared H x W x 3 array) for every image decoded:
    # what the prediction log takes its image statistics from, without decoding twice
    observer = None

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def geometry(self) -> Geometry:
        cached = self.__dict__.get("_geometry")
        if cached is None or cached[0] is not self.meta:
            cached = self.__dict__["_geometry"] = (self.meta, bundle_geometry(self.meta))
        return cached[1]

    def _to_array(self, item) -> np.ndarray:
        """H x W x 3 uint8 network-side pixels of one item (the geometry's prepare)."""
        image = as_pil(item)
        prepared = self.geometry.prepare(image)
        if self.observer is not None:
            self.observer(item, (image.height, image.width), prepared)
        return prepared

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.meta["mean"], dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(self.meta["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def _normalise(self, arr: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1).float()[None] / 255.0
        return ((x - self.mean) / self.std)[0]

    def prepare(self, items: Sequence) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(normalised network inputs T x 3 x h x w, tiles per image or None when one each),
        exactly as the eval transform and the tile collate make them."""
        return self._inputs([self._to_array(i) for i in items])

    def _inputs(self, arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prepare() of arrays the geometry has already prepared (H x W x 3 uint8)."""
        images = [self._normalise(a) for a in arrays]
        if self.geometry.name != "tiles":
            return (torch.stack(images) if images else torch.empty(0, 3, *self.geometry.size)), None
        tiles = [self.geometry.cut(im) for im in images]
        return torch.cat(tiles), torch.tensor([len(t) for t in tiles], dtype=torch.long)

    def preprocess(self, items: Sequence) -> torch.Tensor:
        """The normalised network inputs of `items` (T x 3 x h x w)."""
        return self.prepare(items)[0]

    def _tile_logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _p_of(self, tile_logits: torch.Tensor, counts: torch.Tensor | None) -> np.ndarray:
        """p_defect per image: tiles pooled as training pooled them, then the temperature."""
        logits = image_logits(tile_logits.float(), counts, **(self.meta.get("aggregate") or {}))
        return (logits / float(self.meta.get("temperature", 1.0))).softmax(1)[:, 1].numpy()

    def _scores(self, x: torch.Tensor) -> np.ndarray:
        """p_defect of each network input taken as a whole image (one tile each)."""
        return self._p_of(self._tile_logits(x), None)

    def _logits_in_chunks(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self._tile_logits(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return torch.cat(parts) if parts else torch.empty(0, 2)

    def p_defect(self, items: Sequence) -> np.ndarray:
        """p_defect of paths, PIL images or arrays, decoded and prepared a chunk at a time."""
        return self._p_in_chunks(list(items), self._to_array)

    def p_defect_prepared(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """p_defect of images the geometry has already prepared (what serving decodes one by one)."""
        return self._p_in_chunks(list(arrays), lambda a: a)

    def _p_in_chunks(self, items: list, to_array) -> np.ndarray:
        per_chunk = self.batch_size
        if self.geometry.name == "tiles" and items:  # about batch_size tiles per forward pass
            first = to_array(items[0]).shape[:2]
            per_chunk = max(1, self.batch_size // self.geometry.n_tiles(first))
        out = []
        for start in range(0, len(items), per_chunk):
            x, counts = self._inputs([to_array(i) for i in items[start:start + per_chunk]])
            out.append(self._p_of(self._logits_in_chunks(x), counts))
        return np.concatenate(out) if out else np.empty(0, dtype=np.float32)

    def predict(self, items: Iterable) -> pd.DataFrame:
        """p_defect and the pass/fail decision at the bundled threshold (and a `note` column when
        an image was prepared unusually: smaller than a tile, so upscaled)."""
        items = list(items)
        p = self.p_defect(items)
        is_defect = p >= self.threshold
        table = pd.DataFrame({"p_defect": p.astype(float), "is_defect": is_defect,
                              "decision": np.where(is_defect, CLASS_NAMES[1], CLASS_NAMES[0]),
                              "threshold": self.threshold})
        notes = self.notes(items)
        if any(notes):
            table["note"] = notes
        return table

    def notes(self, items: Sequence) -> list[str | None]:
        """Per item, how the geometry had to adapt it (None: prepared as in training)."""
        note = getattr(self.geometry, "upscale_note", None)
        if note is None:
            return [None] * len(items)
        return [note(_item_hw(i)) for i in items]


class Predictor(BasePredictor):
    """Scores images with a bundle: paths, PIL images or HxWx3 uint8 arrays of any size.

    channels_last (default on), BatchNorm folded into the convolutions for scoring (default on;
    `net` itself stays unfolded for Grad-CAM) and torch.inference_mode are plain speed-ups with
    identical results up to ~1e-6; bf16=True runs the network under bfloat16 autocast, faster on
    CPUs with AVX-512 BF16/AMX at a small cost in accuracy (scripts/benchmark.py measures max
    |delta p_defect|).
    """

    def __init__(self, bundle_path: str | Path, device: str = "cpu", batch_size: int = 32,
                 channels_last: bool = True, bf16: bool = False, fold_batchnorm: bool = True) -> None:
        self.meta, state = _read_bundle(bundle_path)
        self.net = family(self.meta.get("family", "classifier")).build_net(self.meta)
        self.net.load_state_dict(state, strict=True)
        self.device = torch.device(device)
        self.net.to(self.device).eval()
        self.batch_size = batch_size
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.bf16 = bf16
        self.fold_batchnorm = fold_batchnorm
        if bf16 and not bf16_supported(self.device):
            log.warning("bf16 autocast requested but %s has no native bfloat16: it will be slow.", device)

    @torch.inference_mode()
    def _tile_logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self._scoring_net()(x)
        return logits.float().cpu()

    def __getstate__(self) -> dict:  # the folded copy is rebuilt on demand, never pickled
        return {k: v for k, v in self.__dict__.items() if k != "_folded"}

    def _scoring_net(self) -> torch.nn.Module:
        """The folded copy, built on first use from `net` as it is then (device, format); models
        pickled before folding existed have no `fold_batchnorm` and score with `net`."""
        if not getattr(self, "fold_batchnorm", False):
            return self.net
        folded = self.__dict__.get("_folded")
        if folded is None or next(folded.parameters()).device != next(self.net.parameters()).device:
            folded = self.__dict__["_folded"] = fold_batchnorm(self.net)  # keeps net's memory format
        return folded
