"""What every layer shares: the user-error type, the class order, and where a checkout is.

Kept apart from the package's __init__ (which also exposes the Python API) so that any module can
import these without importing the layers above it.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.2.0"  # the one place: pyproject.toml reads it (dynamic version)

GOOD, DEFECT = 0, 1
CLASS_NAMES = ("good", "defect")


class UserError(Exception):
    """A problem the user can fix (bad path, bad value, missing weights); shown without traceback."""


def checkout_root() -> Path | None:
    """The source checkout this package runs from (an editable install), or None when installed
    from a wheel: a checkout has pyproject.toml, conf/train.yaml and src/defect_detection."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if ((parent / "pyproject.toml").is_file() and (parent / "conf" / "train.yaml").is_file()
                and (parent / "src" / "defect_detection").is_dir()):
            return parent
    return None


def project_root() -> Path:
    """Where outputs, data and the MLflow store live by default: the checkout when running from
    one (today's behaviour), else the current folder (MLflow's own convention: ./mlruns)."""
    return checkout_root() or Path.cwd()


def config_root() -> Path:
    """The packaged configs (conf/ of the checkout, shipped inside the wheel as defect_detection/conf)."""
    return (Path(__file__).resolve().parent / "conf").resolve()
