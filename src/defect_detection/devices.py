"""The device a command scores on, checked before any model is loaded.

`device=cuda` on a machine without a GPU failed inside the model loader and was reported as a bad
model name; the fix is the device, so the message says so."""

from __future__ import annotations

import torch

from defect_detection.base import UserError


def check_device(device: str, key: str = "device") -> torch.device:
    try:
        found = torch.device(str(device))
    except (RuntimeError, TypeError):
        raise UserError(f"{key}={device!r} is not a device: use cpu, cuda or cuda:<index>.") from None
    if found.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{key}={device}: PyTorch sees no CUDA GPU on this machine "
                            "(torch.cuda.is_available() is False). Use device=cpu, or a machine with a "
                            "GPU, its driver and a CUDA build of torch.")
        if found.index is not None and found.index >= torch.cuda.device_count():
            raise UserError(f"{key}={device}: this machine has {torch.cuda.device_count()} GPU(s), "
                            f"numbered from 0.")
    elif found.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{key}={device}: Apple's MPS is not available here; use device=cpu.")
    return found


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast runs natively here (CPU: AVX-512 BF16 or AMX; CUDA: Ampere+)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
