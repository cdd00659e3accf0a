"""Fold eval-mode BatchNorm into the convolution before it, for scoring only.

In evaluation BatchNorm is a fixed per-channel affine map, so it can be merged into the preceding
convolution's weights and bias (torch's own fuse_conv_bn_eval does the arithmetic). That removes
one full pass over every activation map: on the 2-core reference CPU EfficientNet-Lite0 scored
the bottle images 1.40x faster (scripts/benchmark.py, `bn_folded_over_plain_eval`) while
p_defect moved by ~1e-6.

The folded network is a separate copy used to score; the trained network stays as it is, because
checkpoints, training and Grad-CAM (whose target layers sit before BatchNorm) need the original.
"""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(net: nn.Module) -> nn.Module:
    """An eval-mode copy of `net` with every Conv2d → BatchNorm2d pair merged into one Conv2d.

    Pairs are a convolution directly followed by a BatchNorm among one module's children (how
    torchvision ResNets and timm EfficientNets register them, in call order; the unit tests check
    the folded copy against the original for every registered backbone). timm's BatchNormAct2d
    keeps its activation. Anything else is left untouched. Folded weights keep the memory format
    (channels_last or not) of the convolution they replace.
    """
    folded = copy.deepcopy(net).eval()
    for parent in list(folded.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
                continue
            if bn.running_mean is None or conv.out_channels != bn.num_features:
                continue  # batch statistics even in eval, or not the conv's own BatchNorm
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, _after_norm(bn))
    return folded


def _after_norm(bn: nn.BatchNorm2d) -> nn.Module:
    """What the BatchNorm module did besides normalising: timm's BatchNormAct2d applies dropout
    (identity in eval) and an activation after the affine map."""
    act = getattr(bn, "act", None)
    return act if isinstance(act, nn.Module) else nn.Identity()
