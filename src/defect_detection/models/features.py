"""Multi-scale feature maps of an ImageNet backbone (stride 8, 16, 32), weights loaded offline.

PatchCore compares stride-8/16 patch features of a frozen backbone; the segmenter builds its
feature pyramid on them. Only the stages up to the deepest stride asked for are built, so a
stride-16 extractor skips the last stage's compute. The weights are the same offline ImageNet
weights the classifier starts from (models/backbones.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from defect_detection.base import UserError
from defect_detection.models.backbones import build_network

# Which feature of each architecture has which stride: timm feature indices for the
# EfficientNet-Lites (their feature_info), torchvision stage names for the ResNets.
FEATURE_LEVELS: dict[str, dict[int, int | str]] = {
    **{f"efficientnet_lite{v}": {4: 1, 8: 2, 16: 3, 32: 4} for v in (0, 1, 2)},
    **{name: {4: "layer1", 8: "layer2", 16: "layer3", 32: "layer4"}
       for name in ("resnet18", "resnet34", "resnet50", "wide_resnet50_2")},
}


def feature_levels(backbone: str) -> dict[int, int | str] | None:
    """Stride -> feature level of a backbone: the table above, or a timm model's own feature_info."""
    if backbone in FEATURE_LEVELS:
        return FEATURE_LEVELS[backbone]
    import timm

    if not timm.is_model(backbone):
        return None
    info = timm.create_model(backbone, pretrained=False, features_only=True).feature_info
    return {int(r): i for i, r in enumerate(info.reduction())}


def check_strides(backbone: str, strides: Sequence[int], key: str = "model.strides") -> list[int]:
    levels = feature_levels(backbone)
    if levels is None:
        raise UserError(f"backbone={backbone} has no feature pyramid for this detector family; use one of "
                        f"{sorted(FEATURE_LEVELS)} or a timm model name.")
    bad = [s for s in strides if s not in levels]
    if bad or not strides:
        raise UserError(f"{key}={list(strides)}: {backbone} has feature maps at strides {sorted(levels)}; "
                        "pick one or more of them (e.g. [8, 16]).")
    return sorted(int(s) for s in strides)


class FeatureExtractor(nn.Module):
    """x (N x 3 x H x W, normalised) -> one feature map per requested stride, shallow to deep."""

    def __init__(self, backbone: str, strides: Sequence[int] = (8, 16), pretrained: bool = True,
                 weights_path: str | None = None, download: bool = True) -> None:
        super().__init__()
        self.backbone, self.strides = backbone, check_strides(backbone, strides)
        known = feature_levels(backbone)
        levels = [known[s] for s in self.strides]
        full = build_network(backbone, pretrained, weights_path, download)
        if backbone.startswith("efficientnet_lite") or backbone not in FEATURE_LEVELS:  # timm models
            import timm

            lite = backbone.startswith("efficientnet_lite")
            arch = f"tf_efficientnet_{backbone.split('_')[1]}" if lite else backbone
            self.body = timm.create_model(arch, pretrained=False, features_only=True,
                                          out_indices=tuple(levels))
            state = full.state_dict()
            self.body.load_state_dict({k: state[k] for k in self.body.state_dict()}, strict=True)
            self.channels = list(self.body.feature_info.channels())
        else:
            from torchvision.models.feature_extraction import create_feature_extractor

            self.body = create_feature_extractor(full, return_nodes={str(n): str(n) for n in levels})
            with torch.no_grad():
                probe = self.body(torch.zeros(1, 3, 64, 64))
            self.channels = [int(v.shape[1]) for v in probe.values()]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.body(x)
        return list(out.values()) if isinstance(out, dict) else list(out)


def _units(body: nn.Module) -> list[nn.Module]:
    """The body's modules in forward order, stages opened one level (timm's `blocks`, ResNet's
    layerN), so freezing can stop at any stride."""
    units: list[nn.Module] = []
    for child in body.children():
        units += list(child.children()) if isinstance(child, nn.Sequential) else [child]
    return units


def modules_through_stride(body: nn.Module, stride: int, probe: int = 64) -> list[nn.Module]:
    """The body's units whose outputs all have a stride <= `stride` (measured on a probe input),
    i.e. everything that computes the features up to and including that stride.

    Strides are read off the leaf modules: a traced torchvision extractor calls its leaves, not
    the blocks that hold them."""
    strides: dict[int, int] = {}

    def record(key: int):
        def hook(_module, _inputs, out) -> None:
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                strides[key] = max(strides.get(key, 0), probe // out.shape[-1])
        return hook

    leaves = [m for m in body.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(record(id(m))) for m in leaves]
    try:
        was = body.training
        body.eval()
        with torch.no_grad():
            body(torch.zeros(1, 3, probe, probe))
        body.train(was)
    finally:
        for h in hooks:
            h.remove()
    chosen = []
    for unit in _units(body):
        seen = [strides[id(m)] for m in unit.modules() if id(m) in strides]
        if seen and max(seen) <= stride:
            chosen.append(unit)
    return chosen
