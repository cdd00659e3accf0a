"""torch.load with weights_only=True and a one-line UserError instead of torch's message.

torch's own error for a file it will not load safely suggests retrying with weights_only=False,
which runs whatever code the file carries: never pass that advice on. The reason given here says
what the file is instead (not a PyTorch file, truncated, or holding Python objects).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from defect_detection.base import UserError


def why_unloadable(err: BaseException) -> str:
    """A short reason for a failed weights_only torch.load, without torch's unsafe advice."""
    text = str(err)
    if isinstance(err, EOFError) or "PytorchStreamReader" in text or "central directory" in text:
        return "it is empty, truncated or corrupt"
    if "Unsupported global" in text or "GLOBAL" in text:
        return ("it holds pickled Python objects, which are never loaded (loading them could run "
                "code)")
    if isinstance(err, (pickle.UnpicklingError, UnicodeDecodeError, ValueError)) or "load key" in text:
        return "it is not a PyTorch file"
    return f"{type(err).__name__}"


def safe_torch_load(path: str | Path, what: str):
    """torch.load(path, weights_only=True) on CPU; UserError '<path> is not a loadable <what>: ...'."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except IsADirectoryError:
        raise UserError(f"{path} is a folder, not a {what}.") from None
    except Exception as err:  # truncated zip, foreign pickle, a PNG: anything is not a file to trust
        raise UserError(f"{path} cannot be loaded as a {what}: {why_unloadable(err)}.") from None
