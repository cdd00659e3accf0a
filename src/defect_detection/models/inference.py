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

from defect_detection import CLASS_NAMES, UserError
from defect_detection.data.images import load_rgb
from defect_detection.models.backbones import build_network
from defect_detection.models.batchnorm_folding import fold_batchnorm
from defect_detection.models.safe_load import safe_torch_load

log = logging.getLogger(__name__)


def save_bundle(path: str | Path, net: torch.nn.Module, *, backbone: str, image_size: int,
                mean: Sequence[float], std: Sequence[float], threshold: float,
                threshold_policy: str = "fixed", temperature: float = 1.0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"backbone": backbone, "image_size": int(image_size), "mean": [float(m) for m in mean],
            "std": [float(s) for s in std], "threshold": float(threshold),
            "threshold_policy": threshold_policy, "temperature": float(temperature),
            "class_names": list(CLASS_NAMES)}
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"meta": meta, "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}, tmp)
    tmp.replace(path)
    return path


def _read_bundle(path: str | Path) -> tuple[dict, dict]:
    """(meta, net state_dict) from a bundle .pt or a Lightning .ckpt written by training."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Model file not found: {path}.")
    data = safe_torch_load(path, "model (an inference bundle or a defect-train checkpoint)")
    if isinstance(data, dict) and "meta" in data:
        return data["meta"], data["state_dict"]
    if isinstance(data, dict) and "defect_meta" in data:
        state = {k[len("net."):]: v for k, v in data["state_dict"].items() if k.startswith("net.")}
        return {"class_names": list(CLASS_NAMES), "temperature": 1.0, "threshold_policy": "checkpoint",
                **data["defect_meta"]}, state
    raise UserError(f"{path} is neither an inference bundle nor a checkpoint written by defect-train.")


def image_array(item, size: int) -> np.ndarray:
    """size x size x 3 uint8 RGB array of a path, PIL image or HxWx3 / HxW array of any size.

    Paths decode and resize exactly like the training cache (load_resized), so a file scores
    the same at inference as in evaluation.
    """
    if isinstance(item, (str, Path)):
        im = load_rgb(item)
    elif isinstance(item, Image.Image):
        im = item.convert("RGB")
    else:
        arr = np.asarray(item)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, -1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise UserError(f"Expected an HxWx3 image array, got shape {arr.shape}.")
        if arr.dtype != np.uint8:
            arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr[..., :3])
    if im.size != (size, size):
        im = im.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


class BasePredictor:
    """What every predictor shares: bundle meta, preprocessing and the thresholded decision.

    Subclasses (Predictor: eager PyTorch; OnnxPredictor: ONNX Runtime) set `meta` and
    `batch_size` and implement `_scores(x)`: p_defect of one normalised N x 3 x S x S batch.
    """

    meta: dict
    batch_size: int = 32

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    def _to_array(self, item) -> np.ndarray:
        return image_array(item, self.meta["image_size"])

    @property
    def mean(self) -> torch.Tensor:
        return torch.tensor(self.meta["mean"], dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def std(self) -> torch.Tensor:
        return torch.tensor(self.meta["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def preprocess(self, items: Sequence) -> torch.Tensor:
        """Normalised float32 N x 3 x S x S batch, exactly as the eval transform makes it."""
        arr = np.stack([self._to_array(i) for i in items])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    def _scores(self, x: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def p_defect(self, items: Sequence) -> np.ndarray:
        out = [self._scores(self.preprocess(items[start:start + self.batch_size]))
               for start in range(0, len(items), self.batch_size)]
        return np.concatenate(out) if out else np.empty(0, dtype=np.float32)

    def predict(self, items: Iterable) -> pd.DataFrame:
        """p_defect and the pass/fail decision at the bundled threshold."""
        items = list(items)
        p = self.p_defect(items)
        is_defect = p >= self.threshold
        return pd.DataFrame({"p_defect": p.astype(float), "is_defect": is_defect,
                             "decision": np.where(is_defect, CLASS_NAMES[1], CLASS_NAMES[0]),
                             "threshold": self.threshold})


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast runs natively here (CPU: AVX-512 BF16 or AMX; CUDA: Ampere+)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


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
        self.net = build_network(self.meta["backbone"], pretrained=False)
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
    def _scores(self, x: torch.Tensor) -> np.ndarray:
        x = x.to(self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self._scoring_net()(x)
        logits = logits.float() / self.meta.get("temperature", 1.0)
        return logits.softmax(1)[:, 1].cpu().numpy()

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


def load_predictor(source: str | Path, device: str = "cpu", *, bf16: bool = False,
                   batch_size: int = 32) -> BasePredictor:
    """A predictor from a bundle (.pt), a checkpoint (.ckpt), an MLflow model URI (runs:/,
    models:/) or an exported ONNX model (.onnx, scored with ONNX Runtime; `defect-export`)."""
    text = str(source)
    if "://" in text or text.startswith(("runs:/", "models:/")):
        import mlflow

        model = mlflow.pyfunc.load_model(text)
        predictor = model.unwrap_python_model().predictor
        predictor.net.to(device)
        predictor.device = torch.device(device)
        predictor.bf16, predictor.batch_size = bf16, batch_size
        return predictor
    if text.endswith(".onnx"):
        from defect_detection.models.onnx_predictor import OnnxPredictor

        return OnnxPredictor(source, batch_size=batch_size)
    return Predictor(source, device=device, batch_size=batch_size, bf16=bf16)
