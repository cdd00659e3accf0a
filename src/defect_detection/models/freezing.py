"""Freezing policies: which parts of the backbone train, with frozen BatchNorm kept in eval."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from defect_detection.base import UserError


def resolve_trainable(net: nn.Module, trainable: str | Sequence[str],
                      stages: Mapping[str, Sequence[str]]) -> list[str]:
    """Module-name prefixes to train; stage aliases (last_stage, head) come from the backbone."""
    if trainable == "all":
        return [""]
    names = dict(net.named_modules())
    prefixes: list[str] = []
    for item in trainable:
        for prefix in stages.get(item, [item]):
            if prefix not in names:
                raise UserError(
                    f"freezing.trainable names '{item}' -> '{prefix}', which this backbone lacks. "
                    f"Stage aliases: {sorted(stages)}; top-level modules: "
                    f"{[n for n in names if n and '.' not in n]}.")
            prefixes.append(prefix)
    return prefixes


def apply_freezing(net: nn.Module, prefixes: Sequence[str]) -> list[nn.Module]:
    """Set requires_grad from the prefixes; return the frozen BatchNorm modules."""
    def trains(name: str) -> bool:
        return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)

    for name, param in net.named_parameters():
        param.requires_grad = trains(name)
    return [m for name, m in net.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not trains(name)]
