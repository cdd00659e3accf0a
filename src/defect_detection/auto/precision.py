"""Which training precision each auto-recipe candidate uses.

bf16-mixed trained the classifier 1.97x faster than fp32 (Lite0, bottle) on a CPU with native
bfloat16 (AVX-512 BF16 / AMX) and changed none of its test decisions on bottle or synthetic parts
over 5 split seeds; the segmenter's changed, and PatchCore trains nothing. So `precision=auto`
switches it on only for families marked `bf16_training` and only on such CPUs (elsewhere
bfloat16 is emulated and slower). Scoring (val, test, the bundle) is fp32 either way
(DetectorModule._score), so the threshold and the exported model agree. GPU runs keep the
trainer's own precision (trainer=gpu_bf16 is one word away).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from defect_detection.base import UserError
from defect_detection.devices import bf16_supported
from defect_detection.models.families import family

CHOICES = ("auto", "32-true", "bf16-mixed")


def trains_on_cpu(trainer: Mapping) -> bool:
    accelerator = str(trainer.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def check_setting(setting: str) -> str:
    setting = str(setting)
    if setting not in CHOICES:
        raise UserError(f"auto.precision={setting}: use one of {', '.join(CHOICES)} (auto: bf16-mixed for "
                        "the classifier on a CPU with native bfloat16, else the trainer's own precision).")
    return setting


def native_bf16_cpu(trainer: Mapping) -> bool:
    return trains_on_cpu(trainer) and bf16_supported(torch.device("cpu"))


def precision_overrides(setting: str, trainer: Mapping, family_name: str) -> list[str]:
    """The trainer.precision override one candidate of `family_name` gets (none: the trainer's
    own). The user's own trainer.precision=... comes after it and wins."""
    setting = check_setting(setting)
    if setting != "auto":
        return [f"trainer.precision={setting}"]
    if family(family_name).bf16_training and native_bf16_cpu(trainer):
        return ["trainer.precision=bf16-mixed"]
    return []


def describe(setting: str, trainer: Mapping) -> str:
    """One line for the log and the parent run's `auto_precision` tag."""
    setting = check_setting(setting)
    if setting != "auto":
        return f"auto.precision={setting} for every candidate"
    if native_bf16_cpu(trainer):
        return ("bf16-mixed training for the classifier (this CPU has native bfloat16); other families "
                f"train in {trainer.get('precision')}")
    return f"trainer.precision={trainer.get('precision')}: " + (
        "this CPU has no native bfloat16" if trains_on_cpu(trainer) else "not a CPU run")
