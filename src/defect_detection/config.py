"""Hydra/OmegaConf glue: where the configs live and the resolvers they use."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from defect_detection.base import UserError, __version__, config_root, project_root
from defect_detection.redact import redact

# The packaged configs: conf/ of the checkout, or defect_detection/conf inside an installed wheel.
CONFIG_DIR = str(config_root())


F = TypeVar("F", bound=Callable)


def command(main: Callable[[], object]) -> Callable[[], object]:
    """A console script: `--version` answers with this package's version (Hydra's own --version
    would print Hydra's), anything else goes to the Hydra app `main`."""

    @functools.wraps(main)
    def run():
        if "--version" in sys.argv[1:]:
            print(version_line())
            return None
        return main()

    return run


def version_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    return (f"defect-detection {__version__} (torch {of('torch')}, pytorch-lightning "
            f"{of('pytorch-lightning')}, hydra-core {of('hydra-core')}, mlflow {of('mlflow')})")


def exit_on_user_error(task: F) -> F:
    """Print a UserError as one `error: ...` line and exit 1, not a traceback.

    Goes between @hydra.main and the task: Hydra prints a traceback for any exception that leaves
    the task function, so the conversion has to happen inside it."""

    @functools.wraps(task)  # Hydra unwraps __wrapped__ to name the job after the task's module
    def wrapper(*args, **kwargs):
        try:
            return task(*args, **kwargs)
        except UserError as err:
            raise SystemExit(f"error: {redact(str(err))}") from None
        except MissingMandatoryValue as err:  # a `???` key the command line did not set
            key = err.full_key or "a required value"
            raise SystemExit(f"error: {key} is required: pass {key}=<value> on the command line "
                             f"(see the comments in the command's config for what it takes).") from None

    return wrapper  # type: ignore[return-value]


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(project_root()))
    if not OmegaConf.has_resolver("auto_num_workers"):  # data.num_workers: 0 on CPU, more with a GPU
        OmegaConf.register_new_resolver("auto_num_workers", _auto_num_workers)
    if not OmegaConf.has_resolver("cuda_available"):  # data.pin_memory: only useful with a GPU
        OmegaConf.register_new_resolver("cuda_available", _cuda_available)


def _auto_num_workers() -> int:
    from defect_detection.data.datamodule import auto_num_workers

    return auto_num_workers()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def config_dir() -> Path:
    path = Path(CONFIG_DIR)
    if not (path / "train.yaml").is_file():
        raise RuntimeError(f"Config folder not found at {path}: the package is incomplete; reinstall it "
                           "(pip install defect-detection, or pip install -e . in a checkout).")
    return path


register_resolvers()
