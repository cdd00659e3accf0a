"""Batched Grad-CAM with Captum: one forward and one backward pass per batch, at one or more layers.

The target class is chosen inside the forward function (a gather on the logits), so "explain the
decision" needs no extra forward pass and the defect probability comes out of the same pass.
Several layers (e.g. a stride-16 block and the stride-32 head) share that one pass (Captum's
compute_layer_gradients_and_eval takes a list of layers); their maps are upsampled to the input,
each scaled to [0, 1] and fused, so the fine layer sharpens the coarse one's evidence.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from captum._utils.gradient import compute_layer_gradients_and_eval
from captum.attr import LayerAttribution
from omegaconf import OmegaConf
from torch import nn

from defect_detection.base import DEFECT, GOOD, UserError

TARGETS = ("defect", "predicted", "good")
FUSIONS = ("mean", "product")
Layers = str | nn.Module | Sequence[str | nn.Module]  # one Grad-CAM layer, or several fused


@dataclass
class CamResult:
    """Maps (N x H x W, each in [0, 1]), p_defect and the explained class, all on the CPU."""

    maps: torch.Tensor
    p_defect: torch.Tensor
    target: torch.Tensor
    seconds: float  # wall time of the Grad-CAM passes (forward + backward + upsampling)

    @property
    def ms_per_image(self) -> float:
        return 1000.0 * self.seconds / max(1, len(self.maps))


def resolve_layer(net: nn.Module, path: str) -> nn.Module:
    """The module a backbone config names, e.g. `net.layer4` (a path on the LightningModule)."""
    name = path[len("net."):] if path.startswith("net.") else path
    try:
        return net.get_submodule(name)
    except AttributeError as err:
        children = [n for n, _ in net.named_children()]
        raise UserError(f"Grad-CAM layer {path} (backbone.gradcam_layer, or layer= of defect-explain) "
                        f"does not name a module of the {type(net).__name__} network ({err}). Use "
                        f"net.<child>[.<child>...]; top-level children: {children}.") from None


def layer_names(spec) -> list[str]:
    """backbone.gradcam_layer as a list: one dotted path, or a list of them (fused)."""
    if spec is None or spec == "" or (not isinstance(spec, str) and len(spec) == 0):
        return []
    if isinstance(spec, str):
        return [spec]
    return [str(s) for s in spec]


def gradcam_layer_for(backbone: str) -> str | list[str]:
    """The Grad-CAM layer(s) of a backbone, read from conf/backbone/<backbone>.yaml (as training does)."""
    from defect_detection.config import config_dir

    path = config_dir() / "backbone" / f"{backbone}.yaml"
    if not path.is_file():
        raise UserError(f"No backbone config {path} to read the Grad-CAM layer of '{backbone}' from: "
                        "pass the layer explicitly (e.g. layer=net.layer4).")
    layer = OmegaConf.load(path).get("gradcam_layer")
    if not layer:
        raise UserError(f"{path} has no gradcam_layer: add one (e.g. gradcam_layer: net.layer4).")
    return str(layer) if isinstance(layer, str) else [str(x) for x in layer]


class _TargetLogit(nn.Module):
    """Returns the logit of the explained class per image and records p_defect on the way."""

    def __init__(self, net: nn.Module, target: str | int, threshold: float, temperature: float) -> None:
        super().__init__()
        self.net, self.target, self.threshold, self.temperature = net, target, threshold, temperature
        self.p_defect: torch.Tensor | None = None
        self.chosen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x).float() / self.temperature
        p = logits.softmax(1)[:, DEFECT].detach()
        if self.target == "predicted":
            cls = (p >= self.threshold).long()
        else:
            value = {"defect": DEFECT, "good": GOOD}.get(self.target, self.target)
            cls = torch.full_like(p, int(value), dtype=torch.long)
        self.p_defect, self.chosen = p, cls
        return logits.gather(1, cls[:, None])


@contextmanager
def _explain_mode(net: nn.Module) -> Iterator[None]:
    """Eval mode, and no parameter gradients: Grad-CAM only needs d(logit)/d(layer output)."""
    was_training = net.training
    flags = [(p, p.requires_grad) for p in net.parameters()]
    net.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        net.train(was_training)


def normalise_maps(cams: torch.Tensor) -> torch.Tensor:
    """ReLU, then each map divided by its maximum (an all-zero map stays zero: no evidence)."""
    cams = cams.clamp_min(0)
    peak = cams.flatten(1).amax(1).clamp_min(1e-12).view(-1, *([1] * (cams.dim() - 1)))
    return cams / peak


def _modules(net: nn.Module, layer: Layers) -> list[nn.Module]:
    specs = [layer] if isinstance(layer, (str, nn.Module)) else list(layer)
    if not specs:
        raise UserError("No Grad-CAM layer given: set backbone.gradcam_layer (a dotted path or a list).")
    return [resolve_layer(net, s) if isinstance(s, str) else s for s in specs]


def fuse_maps(maps: list[torch.Tensor], fusion: str = "mean") -> torch.Tensor:
    """Per-layer maps (each N x H x W in [0, 1]) as one: their mean, or their geometric mean
    (product: a pixel needs evidence at every depth)."""
    if fusion not in FUSIONS:
        raise UserError(f"explain.fusion={fusion} is not one of {list(FUSIONS)}.")
    if len(maps) == 1:
        return maps[0]
    stacked = torch.stack(maps)
    fused = stacked.mean(0) if fusion == "mean" else stacked.clamp_min(0).prod(0) ** (1.0 / len(maps))
    return normalise_maps(fused)


def compute_cams(net: nn.Module, layer: Layers, images: torch.Tensor, *,
                 target: str | int = "defect", threshold: float = 0.5, batch_size: int = 16,
                 temperature: float = 1.0, fusion: str = "mean") -> CamResult:
    """Grad-CAM maps of normalised images (N x 3 x H x W), upsampled to H x W and scaled to [0, 1].

    layer: a module or dotted path (net.layer4), or a list of them: one forward and one backward
    pass gives every layer's Grad-CAM, fused by `fusion` (mean or product).
    target: "defect", "good", a class index, or "predicted" (the decision p_defect >= `threshold`,
    with p_defect = softmax(logits / temperature) as the Predictor computes it).
    """
    if isinstance(target, str) and target not in TARGETS:
        raise UserError(f"explain.target={target} is not one of {list(TARGETS)}.")
    if fusion not in FUSIONS:
        raise UserError(f"explain.fusion={fusion} is not one of {list(FUSIONS)}.")
    modules = _modules(net, layer)
    device = next(net.parameters()).device
    wrapper = _TargetLogit(net, target, threshold, temperature)
    maps, probs, chosen = [], [], []
    seconds = 0.0
    with _explain_mode(net):
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size].to(device, torch.float32)
            began = time.perf_counter()
            grads, evals = compute_layer_gradients_and_eval(wrapper, modules, x, target_ind=0)
            per_layer = []
            for grad, act in zip(grads, evals):  # LayerGradCam's formula, per layer
                g, a = grad[0].float(), act[0].float()
                weights = g.mean(dim=tuple(range(2, g.dim())), keepdim=True)
                cam = (weights * a).sum(1, keepdim=True).clamp_min(0).detach()
                up = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
                per_layer.append(normalise_maps(up[:, 0]))
            m = fuse_maps(per_layer, fusion).cpu()
            seconds += time.perf_counter() - began
            maps.append(m)
            probs.append(wrapper.p_defect.cpu())
            chosen.append(wrapper.chosen.cpu())
    if not maps:
        size = tuple(images.shape[-2:]) if images.dim() == 4 else (0, 0)
        return CamResult(torch.empty(0, *size), torch.empty(0), torch.empty(0, dtype=torch.long), 0.0)
    return CamResult(torch.cat(maps), torch.cat(probs), torch.cat(chosen), seconds)


def load_mask(path: str | Path, size: int) -> torch.Tensor:
    """A ground-truth mask resized exactly like its image (whole image to size x size), as bool,
    by the one resize rule of the input geometries (Geometry.prepare_mask)."""
    from PIL import Image

    from defect_detection.data.geometry import Square, size_hw

    try:
        with Image.open(path) as im:
            mask = im.convert("L")
    except OSError as err:
        raise UserError(f"Cannot read mask {path}: {err}. Remove or replace the file.") from err
    return torch.from_numpy(Square(size=size_hw(size)).prepare_mask(mask))


def native_maps(net: nn.Module, images: torch.Tensor, batch_size: int = 16) -> CamResult:
    """A family's own map (net.anomaly_map: PatchCore's patch distances), each scaled to [0, 1]
    like Grad-CAM's: one forward pass per batch. p_defect is NaN here: the family's scores come
    from its scoring pass, not from the maps."""
    device = next(net.parameters()).device
    maps = []
    seconds = 0.0
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size].to(device, torch.float32)
                began = time.perf_counter()
                m = net.anomaly_map(x).float()
                m = m - m.flatten(1).amin(1).view(-1, 1, 1)
                maps.append(normalise_maps(m).cpu())
                seconds += time.perf_counter() - began
    finally:
        net.train(was_training)
    if not maps:
        empty = torch.empty(0, *images.shape[-2:])
        return CamResult(empty, torch.empty(0), torch.empty(0, dtype=torch.long), 0.0)
    out = torch.cat(maps)
    p = torch.full((len(out),), float("nan"))
    return CamResult(out, p, torch.full((len(out),), DEFECT, dtype=torch.long), seconds)


def map_method(net: nn.Module, method: str = "auto") -> str:
    """Which map a run shows: explain.method, `auto` = the family's own (PatchCore: its anomaly
    map; the classifier: Grad-CAM)."""
    own = "anomaly_map" if hasattr(net, "anomaly_map") else "gradcam"
    method = own if method in (None, "", "auto") else str(method)
    if method not in ("gradcam", "anomaly_map"):
        raise UserError(f"explain.method={method}: use auto, gradcam or anomaly_map.")
    if method == "anomaly_map" and own != "anomaly_map":
        raise UserError("explain.method=anomaly_map needs a detector with its own map (detector=patchcore); "
                        "the classifier's map is gradcam.")
    if method == "gradcam" and own == "anomaly_map":
        raise UserError("explain.method=gradcam needs a trained classifier; detector=patchcore shows its "
                        "anomaly_map (explain.method=auto).")
    return method


def geometry_cams(net: nn.Module, layer: Layers | None, images: list[torch.Tensor], geometry, *,
                  target: str | int = "defect", threshold: float = 0.5, batch_size: int = 16,
                  temperature: float = 1.0, method: str = "auto",
                  fusion: str = "mean") -> tuple[list[torch.Tensor], float]:
    """Maps of prepared, normalised images (each 3 x H x W) under an input geometry: one map per
    image over its prepared pixels (tiles: each tile's map, stitched with overlaps averaged).
    method: gradcam, anomaly_map or auto (the family's own). Returns (maps, seconds)."""
    method = map_method(net, method)

    def maps_of(x: torch.Tensor) -> CamResult:
        if method == "anomaly_map":
            return native_maps(net, x, batch_size)
        return compute_cams(net, layer, x, target=target, threshold=threshold, batch_size=batch_size,
                            temperature=temperature, fusion=fusion)

    if geometry.name != "tiles":
        if not images:
            return [], 0.0
        result = maps_of(torch.stack(images))
        return list(result.maps), result.seconds
    tiles = [geometry.cut(im) for im in images]
    if not tiles:
        return [], 0.0
    result = maps_of(torch.cat(tiles))
    maps, start = [], 0
    for im, t in zip(images, tiles):
        stitched = geometry.stitch(result.maps[start:start + len(t)], tuple(im.shape[-2:]))
        start += len(t)
        maps.append(normalise_maps(stitched[None])[0])
    return maps, result.seconds
