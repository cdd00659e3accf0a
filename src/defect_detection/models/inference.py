"""The self-contained inference bundle: weights + preprocessing + class order + threshold.

Everything that decides good/defect at inference lives in one torch file loaded with
weights_only=True, so predict, serve, export and evaluation decide exactly alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from defect_detection import CLASS_NAMES, UserError
from defect_detection.data.images import load_rgb
from defect_detection.models.backbones import build_network


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
    data = torch.load(path, map_location="cpu", weights_only=True)
    if "meta" in data:
        return data["meta"], data["state_dict"]
    if "defect_meta" in data:
        state = {k[len("net."):]: v for k, v in data["state_dict"].items() if k.startswith("net.")}
        return {"class_names": list(CLASS_NAMES), "temperature": 1.0, "threshold_policy": "checkpoint",
                **data["defect_meta"]}, state
    raise UserError(f"{path} is neither an inference bundle nor a checkpoint written by defect-train.")


class Predictor:
    """Scores images with a bundle: paths, PIL images or HxWx3 uint8 arrays of any size."""

    def __init__(self, bundle_path: str | Path, device: str = "cpu", batch_size: int = 32) -> None:
        self.meta, state = _read_bundle(bundle_path)
        self.net = build_network(self.meta["backbone"], pretrained=False)
        self.net.load_state_dict(state, strict=True)
        self.device = torch.device(device)
        self.net.to(self.device).eval()
        self.batch_size = batch_size
        self.mean = torch.tensor(self.meta["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(self.meta["std"]).view(1, 3, 1, 1)

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    def _to_array(self, item) -> np.ndarray:
        size = self.meta["image_size"]
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

    def preprocess(self, items: Sequence) -> torch.Tensor:
        arr = np.stack([self._to_array(i) for i in items])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def p_defect(self, items: Sequence) -> np.ndarray:
        out = []
        for start in range(0, len(items), self.batch_size):
            x = self.preprocess(items[start:start + self.batch_size]).to(self.device)
            logits = self.net(x).float() / self.meta.get("temperature", 1.0)
            out.append(logits.softmax(1)[:, 1].cpu().numpy())
        return np.concatenate(out) if out else np.empty(0, dtype=np.float32)

    def predict(self, items: Iterable) -> pd.DataFrame:
        """p_defect and the pass/fail decision at the bundled threshold."""
        items = list(items)
        p = self.p_defect(items)
        is_defect = p >= self.threshold
        return pd.DataFrame({"p_defect": p.astype(float), "is_defect": is_defect,
                             "decision": np.where(is_defect, CLASS_NAMES[1], CLASS_NAMES[0]),
                             "threshold": self.threshold})


def load_predictor(source: str | Path, device: str = "cpu") -> Predictor:
    """A Predictor from a bundle (.pt), a checkpoint (.ckpt) or an MLflow model URI (runs:/, models:/)."""
    text = str(source)
    if "://" in text or text.startswith(("runs:/", "models:/")):
        import mlflow

        model = mlflow.pyfunc.load_model(text)
        predictor = model.unwrap_python_model().predictor
        predictor.net.to(device)
        predictor.device = torch.device(device)
        return predictor
    return Predictor(source, device=device)
